"""``voxloop call``: place a phone call through Twilio's REST API to a stored agent.

The call's ``url`` is the server's voice webhook (``VOXLOOP_PUBLIC_URL`` +
``/twilio/voice?agent_id=ID``), the same one a number's incoming calls use, so
when the callee answers the agent greets first.
"""

from __future__ import annotations

import argparse
import os
import re
import urllib.parse
from typing import Any, Final

from runtime.cli.common import CommandError, Parser, Unavailable, UsageError, require

E164: Final = re.compile(r"\+[1-9][0-9]{1,14}")


def register(sub: Any) -> None:
    p: Parser = sub.add_parser(
        "call",
        help="place a phone call through Twilio; the stored agent answers it and greets first",
        description="Place an outgoing call with Twilio's REST API. Needs "
        "VOXLOOP_TWILIO_ACCOUNT_SID, VOXLOOP_TWILIO_AUTH_TOKEN and VOXLOOP_PUBLIC_URL "
        "(where Twilio reaches `voxloop serve`). "
        "Prints the call's sid and status. Exit 1: Twilio refused the call; 2: bad arguments or "
        "settings; 3: Twilio cannot be reached.",
    )
    p.add_argument("to", help="the number to call, E.164 (+15551234567)")
    p.add_argument("--agent-id", required=True, help="the stored agent that talks")
    p.add_argument("--from", dest="from_", required=True, help="your Twilio number, E.164")
    p.add_argument("--timeout", type=int, help="seconds to let it ring (Twilio's default: 60)")
    p.set_defaults(handler=_cmd_call)


def _cmd_call(args: argparse.Namespace) -> int:
    require("twilio")
    from twilio.base.exceptions import TwilioException, TwilioRestException
    from twilio.rest import Client

    from runtime.endpoints import connection_failure

    env = os.environ
    for number, flag in ((args.to, "the number to call"), (args.from_, "--from")):
        if not E164.fullmatch(number):
            raise UsageError(f"{flag} must be an E.164 number such as +15551234567")
    if args.timeout is not None and not 5 <= args.timeout <= 600:
        raise UsageError("--timeout must be from 5 to 600 seconds")
    sid = env.get("VOXLOOP_TWILIO_ACCOUNT_SID", "").strip()
    token = env.get("VOXLOOP_TWILIO_AUTH_TOKEN", "").strip()
    public = env.get("VOXLOOP_PUBLIC_URL", "").strip().rstrip("/")
    if not sid or not token:
        raise UsageError("set VOXLOOP_TWILIO_ACCOUNT_SID and VOXLOOP_TWILIO_AUTH_TOKEN")
    if not public.startswith("https://"):
        raise UsageError(
            "set VOXLOOP_PUBLIC_URL to the https:// address Twilio reaches `voxloop serve` at"
        )
    webhook = f"{public}/twilio/voice?agent_id={urllib.parse.quote(args.agent_id, safe='')}"
    client = Client(sid, token)
    base = env.get("VOXLOOP_TWILIO_API_BASE_URL", "").strip().rstrip("/")
    if base:
        client.api.base_url = base  # a Twilio-compatible API (tests, regional proxies)
    options: dict[str, Any] = {}
    if args.timeout is not None:
        options["timeout"] = args.timeout
    try:
        call = client.calls.create(to=args.to, from_=args.from_, url=webhook, method="POST",
                                   **options)  # fmt: skip
    except TwilioRestException as exc:
        raise CommandError(
            f"Twilio refused the call: HTTP {exc.status}, code {exc.code}: {exc.msg}"
        ) from None
    except (TwilioException, OSError) as exc:
        raise Unavailable(f"cannot reach Twilio: {connection_failure(exc)}") from None
    except Exception as exc:  # requests' connection errors are not OSErrors
        if type(exc).__module__.startswith(("requests", "urllib3")):
            raise Unavailable(f"cannot reach Twilio: {connection_failure(exc)}") from None
        raise
    print(f"{call.sid} {call.status}")
    return 0
