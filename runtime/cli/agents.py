"""``voxloop agents``: create, list, get, update and delete stored agents over the REST API."""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import sys
from pathlib import Path
from typing import Any

from runtime.cli.checks import no_user_info, use_ca_bundle, with_scheme
from runtime.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    Unavailable,
    UsageError,
    env_value,
)

DEFAULT_URL = "http://127.0.0.1:8080"

AGENTS_SETTINGS = f"""\
settings:
  VOXLOOP_URL       the agent service's URL when --url is not given (default: {DEFAULT_URL})
  VOXLOOP_API_KEY   the API key (one of the server's VOXLOOP_API_KEYS); --api-key-env
                    names another variable

--url and --api-key-env may come before or after the subcommand; a bare
host:port means http://host:port.
"""


def register(sub: Any) -> None:
    # The connection options are accepted before and after the subcommand: the parent
    # sets the defaults, each subcommand may override them (SUPPRESS keeps the parent's).
    shared = Parser(add_help=False)
    _connection_flags(shared, default=argparse.SUPPRESS)
    a = sub.add_parser(
        "agents",
        help="manage stored agents through the REST API",
        description="Create, list, show, update and delete the agents stored by voxloop serve.",
        epilog=AGENTS_SETTINGS,
    )
    _connection_flags(a, default=None)
    a_sub = a.add_subparsers(dest="agents_command", required=True, parser_class=Parser)

    def add(name: str, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = a_sub.add_parser(
            name, help=text, description=f"{text[0].upper()}{text[1:]}.", parents=[shared],
            epilog=AGENTS_SETTINGS,
        )  # fmt: skip
        return parser

    c = add("create", "create an agent from flags or a JSON file")
    c.add_argument("--file", type=Path, help="the agent as JSON (the REST body)")
    c.add_argument("--name", help="the agent's name")
    c.add_argument("--system-prompt", help="its instructions")
    c.add_argument("--voice", default="ivy", help="voice id (GET /v1/voices lists them)")
    c.add_argument("--greeting", help="spoken verbatim when a conversation starts")
    c.add_argument("--llm-base-url", help="its OpenAI-compatible endpoint (https://…/v1)")
    c.add_argument("--llm-model", help="the model at --llm-base-url")
    c.add_argument("--llm-api-key-env", help="environment variable holding the endpoint's key")
    add("list", "list agents, newest first")
    for name, text in (("get", "show an agent"), ("delete", "delete an agent")):
        add(name, text).add_argument("agent_id", type=agent_id, help="the agent's id (agent_…)")
    k = add("link", "print a single-use browser link to talk to an agent on the page")
    k.add_argument("agent_id", type=agent_id, help="the agent's id (agent_…)")
    k.add_argument(
        "--expires-in", type=int, default=300, metavar="S",
        help="seconds the link may wait before it is opened, 1-600 (default: 300); "
        "the conversation itself may then last up to 3 hours",
    )  # fmt: skip
    k.add_argument("--open", action="store_true", help="open the link in this machine's browser")
    u = add("update", "update fields from a JSON file (present fields replace)")
    u.add_argument("agent_id", type=agent_id, help="the agent's id (agent_…)")
    u.add_argument("--file", type=Path, required=True, help="the fields as JSON")
    a.set_defaults(handler=_cmd_agents)


def _connection_flags(parser: argparse.ArgumentParser, *, default: Any) -> None:
    parser.add_argument(
        "--url",
        default=default,
        help=f"the agent service (default: $VOXLOOP_URL, else {DEFAULT_URL}; host:port is fine)",
    )
    parser.add_argument(
        "--ca-bundle",
        type=Path,
        default=default,
        help="PEM file of extra trusted certificates for an https service behind a private CA "
        "(default: $VOXLOOP_CA_BUNDLE)",
    )
    parser.add_argument(
        "--api-key-env",
        default=default,
        help="environment variable holding the API key (default: VOXLOOP_API_KEY)",
    )


def agent_id(value: str) -> str:
    """An agent id as the command line takes it: letters, digits, ``_`` and ``-`` (``agent_…``).

    Raises:
        argparse.ArgumentTypeError: anything else (it would become another path of the API).
    """
    if not value or not all(c.isascii() and (c.isalnum() or c in "_-") for c in value):
        raise argparse.ArgumentTypeError(
            f"not an agent id: {value!r} (an id is letters, digits, _ and -: agent_…)"
        )
    return value


def service_url(url: str | None) -> str:
    """The agent service URL: ``url``, else ``$VOXLOOP_URL``, else the default (scheme added).

    Raises:
        ValueError: not an http(s) URL with a host, or one holding user information.
    """
    from urllib.parse import urlsplit

    given = url or os.environ.get("VOXLOOP_URL") or DEFAULT_URL
    what = "--url" if url else "VOXLOOP_URL"
    no_user_info(given, what)
    full = with_scheme(given).rstrip("/")
    parts = urlsplit(full)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(c.isspace() for c in full)
    ):
        raise ValueError(f"{what} must be the http:// or https:// address of voxloop serve, "
                         f"not {given!r}")  # fmt: skip
    return full


def _plain_http(url: str, tls: ssl.SSLError | None) -> bool:
    """Whether an https ``url`` failed (with ``tls``) because its server speaks plain http."""
    import asyncio
    from urllib.parse import urlsplit

    from runtime.endpoints import speaks_plain_http

    if tls is None or isinstance(tls, ssl.SSLCertVerificationError):
        return False
    parts = urlsplit(url)
    if parts.scheme != "https" or parts.hostname is None:
        return False
    return asyncio.run(speaks_plain_http(parts.hostname, parts.port or 443))


def _agent_body(args: argparse.Namespace) -> dict[str, Any]:
    if args.file is not None:
        try:
            doc = json.loads(args.file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {args.file}: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{args.file} must hold a JSON object")
        return doc
    if args.agents_command != "create":
        raise ValueError("--file is required")
    if not (args.name and args.system_prompt):
        raise ValueError("give --file, or at least --name and --system-prompt")
    body: dict[str, Any] = {"name": args.name, "system_prompt": args.system_prompt,
                            "voice": {"voice_id": args.voice}}  # fmt: skip
    if args.greeting:
        body["greeting"] = args.greeting
    if args.llm_base_url:
        if not (args.llm_model and args.llm_api_key_env):
            raise ValueError("--llm-base-url needs --llm-model and --llm-api-key-env")
        key = env_value(args.llm_api_key_env)
        body["llm"] = [{"base_url": args.llm_base_url, "model": args.llm_model, "api_key": key}]
    return body


def _cmd_agents(args: argparse.Namespace) -> int:
    import httpx

    try:
        url = service_url(args.url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    use_ca_bundle(args.ca_bundle)
    from runtime.endpoints import tls_verify

    key_env = args.api_key_env or "VOXLOOP_API_KEY"
    try:
        key = env_value(key_env)
    except ValueError as exc:
        if os.environ.get(key_env):
            raise UsageError(str(exc)) from None
        raise UsageError(
            f"environment variable {key_env} is not set: put one of the server's "
            "VOXLOOP_API_KEYS in it"
        ) from None
    try:
        body = _agent_body(args) if args.agents_command in ("create", "update") else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.agents_command == "link" and not 1 <= args.expires_in <= 600:
        raise UsageError("--expires-in must be from 1 to 600 seconds")
    method, path = {
        "create": ("POST", "/v1/agents"),
        "list": ("GET", "/v1/agents"),
        "link": ("GET", "/v1/agents/{id}"),
        "get": ("GET", "/v1/agents/{id}"),
        "update": ("PUT", "/v1/agents/{id}"),
        "delete": ("DELETE", "/v1/agents/{id}"),
    }[args.agents_command]
    path = path.replace("{id}", getattr(args, "agent_id", ""))
    try:
        with httpx.Client(
            base_url=url, headers={"Authorization": key}, timeout=30, verify=tls_verify()
        ) as client:
            response = client.request(method, path, json=body)
            if args.agents_command == "link" and response.status_code == 200:
                # The agent exists: mint its single-use token.
                method, path = "GET", f"/v1/token?expires_in_seconds={args.expires_in}"
                response = client.request(method, path)
    except httpx.InvalidURL as exc:
        raise UsageError(f"--url {url}: {exc}") from None
    except httpx.HTTPError as exc:
        from runtime.endpoints import plain_http_message, ssl_cause, tls_failure

        # "[Errno 111] Connection refused" -> "connection refused"
        cause = re.sub(r"^\[Errno -?\d+\] ", "", str(exc)).lower() or type(exc).__name__
        tls = ssl_cause(exc)
        if _plain_http(url, tls):
            raise Unavailable(plain_http_message(url)) from None
        if isinstance(tls, ssl.SSLCertVerificationError):
            raise Unavailable(
                f"the agent service at {url} has a certificate this machine does not trust; "
                "for a private CA pass --ca-bundle FILE.pem (or set VOXLOOP_CA_BUNDLE)"
            ) from None
        if tls is not None:
            cause = f"TLS handshake failed: {tls_failure(tls)}"
        raise Unavailable(
            f"cannot reach the agent service at {url} ({cause}); is voxloop serve running "
            "there? (--url or VOXLOOP_URL)"
        ) from None
    answer = _service_answer(response)
    not_voxloop = CommandError(
        f"{method} {url}{path}: HTTP {response.status_code}, not an answer of voxloop serve's "
        "agent service; is --url (or VOXLOOP_URL) voxloop serve's address?"
    )
    if response.status_code >= 400:
        if not isinstance(answer, dict) or "detail" not in answer:
            raise not_voxloop
        param = answer.get("param")
        where = f" ({param})" if param else ""
        hint = f"; check {key_env}" if response.status_code == 401 else ""
        if response.status_code == 404 and url.endswith("/v1") and path.startswith("/v1/"):
            hint = f"; --url (or VOXLOOP_URL) is the server's address, without /v1: {url[:-3]}"
        raise CommandError(
            f"{method} {url}{path}: HTTP {response.status_code}{where}: {answer['detail']}{hint}"
        )
    if response.status_code == 204:
        return EXIT_OK
    if response.status_code not in (200, 201) or answer is None:
        raise not_voxloop
    if args.agents_command == "link":
        token = answer.get("token") if isinstance(answer, dict) else None
        if not isinstance(token, str):
            raise not_voxloop
        return _print_link(url, args.agent_id, token, opening=args.open)
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    return EXIT_OK


def _service_answer(response: Any) -> dict[str, Any] | list[Any] | None:
    """The JSON object or list a response holds, or ``None`` (no body, not JSON, a scalar)."""
    try:
        doc = response.json()
    except ValueError:
        return None
    return doc if isinstance(doc, dict | list) else None


def _print_link(url: str, agent_id: str, token: str, *, opening: bool) -> int:
    """Print (and maybe open) ``URL/#agent=ID&token=TOKEN``: the fragment never reaches a server."""
    from urllib.parse import urlencode

    link = f"{url}/#{urlencode({'agent': agent_id, 'token': token})}"
    print(link)
    if opening:
        import webbrowser

        if not webbrowser.open(link):
            print("voxloop: no browser found here; open the link above by hand", file=sys.stderr)
    return EXIT_OK
