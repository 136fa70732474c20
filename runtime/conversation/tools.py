"""Tools the model can call: client-side functions and server-side HTTP tools.

Client tools are answered by the adapter (a WebSocket client, the CLI):
the session emits a tool-call event and waits for :meth:`ToolRunner.submit`
up to the tool's timeout. HTTP tools are called by voxloop itself under the
endpoint URL policy (https + public unless the operator allows more, pinned
connection, no redirects), with a deadline and an 8 KiB cap on what is read
back. Every failure becomes a short error text for the model, never an
exception that ends the reply.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

from runtime.endpoints import Resolver, SystemResolver, URLPolicy
from runtime.errors import URLPolicyError
from runtime.llm.stream import ToolCall
from runtime.llm.transport import PinnedHTTP
from runtime.safetext import safe_json
from runtime.secret import Secret

RESPONSE_CAP: Final = 8 * 1024


def _no_parameters() -> dict[str, Any]:
    return {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class ClientTool:
    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    timeout_s: float = 120.0


@dataclass(frozen=True, slots=True)
class HttpTool:
    name: str
    url: str
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    method: str = "POST"
    headers: Mapping[str, Secret] = field(default_factory=dict)
    timeout_s: float = 10.0


Tool = ClientTool | HttpTool


def openai_tool(tool: Tool) -> dict[str, Any]:
    """The tool in OpenAI function form, for the chat-completions request."""
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": dict(tool.parameters),
        },
    }


ClientCallHook = Callable[[str, str, dict[str, Any]], None]


class ToolRunner:
    """Runs tool calls for one session."""

    def __init__(
        self,
        tools: tuple[Tool, ...],
        *,
        on_client_call: ClientCallHook,
        policy: URLPolicy | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self._tools = {t.name: t for t in tools}
        self._on_client_call = on_client_call
        self._policy = policy or URLPolicy()
        self._resolver = resolver or SystemResolver()
        self._pending: dict[str, asyncio.Future[str]] = {}

    def set_tools(self, tools: tuple[Tool, ...]) -> None:
        """Replace the tools (calls already waiting for a result keep waiting)."""
        self._tools = {t.name: t for t in tools}

    def submit(self, call_id: str, result: str, *, is_error: bool = False) -> bool:
        """An adapter's answer to a client tool call. Returns False for unknown/late ids."""
        future = self._pending.get(call_id)
        if future is None or future.done():
            return False
        future.set_result(f"Error: {result}" if is_error else result)
        return True

    async def run(self, call: ToolCall) -> str:
        """The result text to give the model for ``call``."""
        tool = self._tools.get(call.name)
        if tool is None:
            return f"Error: no tool named {call.name!r}."
        try:
            arguments = safe_json(json.loads(call.arguments or "{}"))
        except ValueError:
            return "Error: the arguments were not valid JSON."
        if not isinstance(arguments, dict):
            return "Error: the arguments must be a JSON object."
        if isinstance(tool, ClientTool):
            return await self._client(tool, call.id, arguments)
        return await self._http(tool, arguments)

    async def _client(self, tool: ClientTool, call_id: str, arguments: dict[str, Any]) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            self._on_client_call(call_id, tool.name, arguments)
            async with asyncio.timeout(tool.timeout_s):
                return await future
        except TimeoutError:
            return f"Error: the {tool.name} tool did not answer in time."
        finally:
            self._pending.pop(call_id, None)

    async def _http(self, tool: HttpTool, arguments: dict[str, Any]) -> str:
        try:
            client = PinnedHTTP(
                tool.url,
                policy=self._policy,
                resolver=self._resolver,
                headers={k: v.reveal() for k, v in tool.headers.items()},
                timeout=httpx.Timeout(tool.timeout_s),
            )
        except URLPolicyError as exc:
            return f"Error: the tool's URL is not allowed ({exc})."
        try:
            async with asyncio.timeout(tool.timeout_s):
                await client.ensure_pinned()
                method = tool.method.upper()
                kwargs: dict[str, Any] = (
                    {"params": arguments} if method == "GET" else {"json": arguments}
                )
                async with client.http.stream(method, client.url.url, **kwargs) as response:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) >= RESPONSE_CAP:
                            break
                    text = bytes(body[:RESPONSE_CAP]).decode("utf-8", errors="replace")
                    if response.status_code >= 300:
                        return f"Error: the tool answered HTTP {response.status_code}."
                    return text
        except URLPolicyError as exc:
            return f"Error: the tool's URL is not allowed ({exc})."
        except TimeoutError:
            return "Error: the tool timed out."
        except httpx.HTTPError as exc:
            return f"Error: the tool could not be reached ({type(exc).__name__})."
        finally:
            await client.aclose()
