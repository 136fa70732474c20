"""``voxloop call`` against a loopback server speaking Twilio's REST API (the Calls resource of
API 2010-04-01: form-encoded request with HTTP Basic auth, JSON call resource or error back)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

SID = "AC0123456789abcdef0123456789abcdef"
TOKEN = "twilio-auth-token-for-calls"


class TwilioApi(BaseHTTPRequestHandler):
    """``POST /2010-04-01/Accounts/{AccountSid}/Calls.json``, as Twilio answers it."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
        auth = self.headers.get("Authorization", "")
        self.seen.append({"path": self.path, "form": form, "auth": auth,
                          "type": self.headers.get("Content-Type", "")})  # fmt: skip
        expected = "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
        if auth != expected:
            self._reply(401, {"code": 20003, "message": "Authenticate", "more_info":
                              "https://www.twilio.com/docs/errors/20003", "status": 401})  # fmt: skip
            return
        if self.path != f"/2010-04-01/Accounts/{SID}/Calls.json":
            self._reply(404, {"code": 20404, "message": "The requested resource was not found",
                              "more_info": "https://www.twilio.com/docs/errors/20404",
                              "status": 404})  # fmt: skip
            return
        if form.get("To") == "+15550000000":
            self._reply(400, {"code": 21211, "message": "Invalid 'To' Phone Number: +155500XXXXX",
                              "more_info": "https://www.twilio.com/docs/errors/21211",
                              "status": 400})  # fmt: skip
            return
        self._reply(201, {
            "sid": "CA" + "f" * 32, "account_sid": SID, "to": form["To"],
            "to_formatted": form["To"], "from": form["From"], "from_formatted": form["From"],
            "status": "queued", "direction": "outbound-api", "api_version": "2010-04-01",
            "date_created": None, "date_updated": None, "start_time": None, "end_time": None,
            "duration": None, "price": None, "price_unit": "USD", "answered_by": None,
            "caller_name": None, "forwarded_from": None, "group_sid": None,
            "parent_call_sid": None, "phone_number_sid": "PN" + "0" * 32,
            "queue_time": "0", "trunk_sid": None,
            "uri": f"/2010-04-01/Accounts/{SID}/Calls/CA{'f' * 32}.json",
            "subresource_uris": {},
        })  # fmt: skip


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), TwilioApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VOXLOOP_")}
    return subprocess.run(
        [sys.executable, "-m", "runtime.cli", "call", *args], capture_output=True, text=True,
        env={**base, **env}, timeout=60,
    )  # fmt: skip


def settings(api: str, **more: str) -> dict[str, str]:
    return {"VOXLOOP_TWILIO_ACCOUNT_SID": SID, "VOXLOOP_TWILIO_AUTH_TOKEN": TOKEN,
            "VOXLOOP_PUBLIC_URL": "https://voice.example.com",
            "VOXLOOP_TWILIO_API_BASE_URL": api, **more}  # fmt: skip


def test_a_call_is_placed_with_the_agents_webhook(api: str) -> None:
    TwilioApi.seen.clear()
    done = run("+15551230000", "--agent-id", "agent_abc", "--from", "+15559870000",
               "--timeout", "30", **settings(api))  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, f"CA{'f' * 32} queued\n", "")
    (request,) = TwilioApi.seen
    assert request["type"] == "application/x-www-form-urlencoded"
    assert request["form"] == {
        "To": "+15551230000", "From": "+15559870000", "Method": "POST", "Timeout": "30",
        "Url": "https://voice.example.com/twilio/voice?agent_id=agent_abc",
    }  # fmt: skip


def test_twilio_refusing_the_call_is_one_line_and_exit_1(api: str) -> None:
    done = run("+15550000000", "--agent-id", "a", "--from", "+15559870000", **settings(api))
    assert done.returncode == 1
    assert done.stderr == (
        "voxloop: error: Twilio refused the call: HTTP 400, code 21211: "
        "Unable to create record: Invalid 'To' Phone Number: +155500XXXXX\n"
    )
    wrong = settings(api, VOXLOOP_TWILIO_AUTH_TOKEN="not-the-token")
    done = run("+15551230000", "--agent-id", "a", "--from", "+15559870000", **wrong)
    assert done.returncode == 1 and "HTTP 401, code 20003" in done.stderr
    assert "not-the-token" not in done.stderr + done.stdout


def test_bad_arguments_and_settings_exit_2_and_an_unreachable_api_3(api: str) -> None:
    for args, env, message in [
        (("555", "--agent-id", "a", "--from", "+15559870000"), settings(api),
         "the number to call must be an E.164 number"),
        (("+15551230000", "--agent-id", "a", "--from", "+15559870000"),
         {**settings(api), "VOXLOOP_PUBLIC_URL": "http://voice.example.com"},
         "set VOXLOOP_PUBLIC_URL to the https:// address"),
        (("+15551230000", "--agent-id", "a", "--from", "+15559870000"),
         {"VOXLOOP_PUBLIC_URL": "https://voice.example.com"},
         "set VOXLOOP_TWILIO_ACCOUNT_SID and VOXLOOP_TWILIO_AUTH_TOKEN"),
    ]:  # fmt: skip
        done = run(*args, **env)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    closed = settings("http://127.0.0.1:9")
    done = run("+15551230000", "--agent-id", "a", "--from", "+15559870000", **closed)
    assert done.returncode == 3 and done.stderr == (
        "voxloop: error: cannot reach Twilio: connection refused\n"
    ), done.stderr
