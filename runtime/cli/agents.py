"""``voxloop agents``: create, list, get, update and delete stored agents over the REST API."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from runtime.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    UsageError,
    env_value,
)


def register(sub: Any) -> None:
    a = sub.add_parser("agents", help="manage stored agents through the REST API")
    a.add_argument("--url", default=os.environ.get("VOXLOOP_URL", "http://127.0.0.1:8080"))
    a.add_argument("--api-key-env", default="VOXLOOP_API_KEY", help="env var with the API key")
    a_sub = a.add_subparsers(dest="agents_command", required=True, parser_class=Parser)
    c = a_sub.add_parser("create", help="create an agent from flags or a JSON file")
    c.add_argument("--file", type=Path, help="the agent as JSON (the REST body)")
    c.add_argument("--name")
    c.add_argument("--system-prompt")
    c.add_argument("--voice", default="ivy")
    c.add_argument("--greeting")
    c.add_argument("--llm-base-url")
    c.add_argument("--llm-model")
    c.add_argument("--llm-api-key-env", help="env var holding the endpoint's key")
    a_sub.add_parser("list", help="list agents, newest first")
    for name, text in (("get", "show an agent"), ("delete", "delete an agent")):
        p = a_sub.add_parser(name, help=text)
        p.add_argument("agent_id")
    u = a_sub.add_parser("update", help="update fields from a JSON file (present fields replace)")
    u.add_argument("agent_id")
    u.add_argument("--file", type=Path, required=True)
    a.set_defaults(handler=_cmd_agents)


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
        key = env_value(args.api_key_env)
        body = _agent_body(args) if args.agents_command in ("create", "update") else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    method, path = {
        "create": ("POST", "/v1/agents"),
        "list": ("GET", "/v1/agents"),
        "get": ("GET", "/v1/agents/{id}"),
        "update": ("PUT", "/v1/agents/{id}"),
        "delete": ("DELETE", "/v1/agents/{id}"),
    }[args.agents_command]
    path = path.replace("{id}", getattr(args, "agent_id", ""))
    try:
        with httpx.Client(base_url=args.url, headers={"Authorization": key}, timeout=30) as client:
            response = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        raise CommandError(f"cannot reach {args.url}: {type(exc).__name__}") from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
            param = response.json().get("param")
        except ValueError:
            detail, param = response.text, None
        where = f" ({param})" if param else ""
        raise CommandError(f"HTTP {response.status_code}{where}: {detail}")
    if response.status_code != 204:
        print(json.dumps(response.json(), indent=2))
    return EXIT_OK
