"""llama-cpp-python's OpenAI-compatible server, accepting text content parts.

OpenAI's chat format allows a message's ``content`` to be a list of parts
(``[{"type": "text", "text": "…"}]``), and GuideLLM sends every prompt that way.
llama-cpp-python 0.3's server formats the GGUF's chat template with string
contents only (a list fails with ``can only concatenate str (not "list") to
str``), so for the cross-check this starts the same server with text parts
joined into a string before the template sees them; string contents are
untouched, so voxloop's requests are formatted exactly as by the stock server.

Run it in the environment that has ``llama-cpp-python[server]``, with the stock
server's arguments::

    taskset -c 1 /tmp/llama/venv/bin/python benchmarks/llama_server.py \\
        --model SmolLM2-135M-Instruct.Q4_1.gguf --model_alias smollm2 --n_threads 1 --port 8080
"""

from __future__ import annotations

from typing import Any


def _flatten(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" for p in content
        ):
            message = {**message, "content": "".join(str(p.get("text", "")) for p in content)}
        out.append(message)
    return out


def main() -> None:
    from llama_cpp import llama_chat_format  # type: ignore[import-not-found]
    from llama_cpp.server.__main__ import main as serve  # type: ignore[import-not-found]

    formatter = llama_chat_format.Jinja2ChatFormatter
    original = formatter.__call__

    def call(self: Any, *, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        return original(self, messages=_flatten(messages), **kwargs)

    formatter.__call__ = call
    serve()


if __name__ == "__main__":
    main()
