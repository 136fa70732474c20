"""The TTFT benchmark against reference endpoints on loopback."""

from __future__ import annotations

import csv
import json
import logging
import ssl
from pathlib import Path

import pytest
import trustme

from runtime.bench.ttft import (
    METRICS,
    BenchSettings,
    BenchTarget,
    TTFTBenchmark,
    load_prompts,
    load_targets,
    voice_messages,
    write_csv,
    write_json,
    write_plot,
)
from runtime.endpoints import StaticResolver
from runtime.llm.reference import ReferenceEndpoint, ReplyPlan


def target(server: ReferenceEndpoint, name: str) -> BenchTarget:
    return BenchTarget(name=name, base_url=server.base_url, model="m")


async def test_reports_every_metric_cold_and_warm(server: ReferenceEndpoint):
    server.plan = ReplyPlan(ttft_ms=5, itl_ms=1)
    bench = TTFTBenchmark(
        [target(server, "ref")], BenchSettings(requests=4, warmup=1, concurrency=2)
    )
    [report] = await bench.run()
    assert [r.phase for r in report.results] == ["cold", "warmup", "warm", "warm", "warm", "warm"]
    assert report.cold is not None and report.cold.new_connection
    doc = report.to_json()
    assert (doc["name"], doc["requests"], doc["ok"], doc["errors"]) == ("ref", 4, 4, {})
    for metric in METRICS:
        stats = doc["metrics"][metric]
        assert stats is not None, metric
        assert set(stats) >= {"p50", "p90", "p95", "p99", "max", "mean"}
        assert stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    m = doc["metrics"]
    assert m["ttft_ms"]["p50"] >= 5
    assert m["first_sentence_ms"]["p50"] >= m["ttft_ms"]["p50"]
    assert m["e2e_ms"]["p50"] >= m["first_sentence_ms"]["p50"]
    # The default prompt is a voice-style multi-turn context.
    bodies = [r.body for r in server.requests if r.body]
    assert bodies[-1]["messages"][:-1] == voice_messages()[:-1]
    assert bodies[0]["messages"][0]["role"] == "system" and len(bodies[0]["messages"]) >= 5
    # The latest user turn varies, the shared context does not.
    assert len({b["messages"][-1]["content"] for b in bodies}) > 1


async def test_failing_and_hanging_endpoints_are_reported_not_fatal():
    async with (
        ReferenceEndpoint(ReplyPlan(fault="status", status=503)) as failing,
        ReferenceEndpoint(ReplyPlan(fault="hang", fault_after=0)) as hanging,
        ReferenceEndpoint(ReplyPlan(fault="status", status=429, retry_after="1")) as limited,
        ReferenceEndpoint() as healthy,
    ):
        targets = [
            target(failing, "failing"),
            target(hanging, "hanging"),
            target(limited, "limited"),
            target(healthy, "ok"),
        ]
        reports = await TTFTBenchmark(
            targets, BenchSettings(requests=2, warmup=0, timeout_s=0.2)
        ).run()
    errors = {r.target.name: r.errors() for r in reports}
    assert errors == {
        "failing": {"server": 2},
        "hanging": {"timeout": 2},
        "limited": {"rate_limit": 2},
        "ok": {},
    }
    assert reports[3].to_json()["ok"] == 2
    assert reports[0].to_json()["metrics"]["ttft_ms"] is None
    # No retries in a benchmark: each failure is one request.
    assert len(failing.requests) == 3


async def test_missing_key_env_and_forbidden_url_are_counted_as_config_errors(
    server: ReferenceEndpoint,
):
    targets = [
        BenchTarget(
            name="nokey", base_url=server.base_url, model="m", api_key_env="VOXLOOP_TEST_UNSET"
        ),
        BenchTarget(name="badurl", base_url="https://0x7f000001/v1", model="m"),
    ]
    reports = await TTFTBenchmark(targets, BenchSettings(requests=2, warmup=0), env={}).run()
    assert reports[0].errors() == {"config": 2}
    assert reports[1].errors() == {"url_policy": 2}


async def test_api_key_from_env_is_sent(server: ReferenceEndpoint):
    t = BenchTarget(name="k", base_url=server.base_url, model="m", api_key_env="MY_KEY")
    await TTFTBenchmark([t], BenchSettings(requests=1, warmup=0), env={"MY_KEY": "sk-bench"}).run()
    assert server.requests[-1].headers["authorization"] == "Bearer sk-bench"


async def test_outputs_json_csv_and_plots(server: ReferenceEndpoint, tmp_path: Path):
    reports = await TTFTBenchmark([target(server, "a")], BenchSettings(requests=3, warmup=0)).run()
    write_json(reports, tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert set(doc["endpoints"][0]) >= {
        "name",
        "base_url",
        "model",
        "requests",
        "ok",
        "errors",
        "metrics",
    }
    assert doc["endpoints"][0]["metrics"]["ttft_ms"]["p50"] > 0
    write_csv(reports, tmp_path / "r.csv")
    with (tmp_path / "r.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and rows[0]["phase"] == "cold" and float(rows[1]["ttft_ms"]) > 0
    write_plot(reports, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_plot(reports, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "<svg" in html and "ttft_ms" in html
    with pytest.raises(ValueError, match="png"):
        write_plot(reports, tmp_path / "r.gif")


def test_toml_config(tmp_path: Path):
    path = tmp_path / "e.toml"
    path.write_text(
        '[[endpoints]]\nname = "local"\nbase_url = "http://127.0.0.1:8080/v1"\nmodel = "smol"\n'
        '[[endpoints]]\nbase_url = "https://api.example.com/v1"\nmodel = "gpt"\napi_key_env = "K"\n'
    )
    assert load_targets(path) == [
        BenchTarget("local", "http://127.0.0.1:8080/v1", "smol"),
        BenchTarget("https://api.example.com/v1", "https://api.example.com/v1", "gpt", "K"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not = [toml", "not valid TOML"),
        ("x = 1", "no \\[\\[endpoints\\]\\]"),
        ('[[endpoints]]\nmodel = "m"', "base_url is required"),
        ('[[endpoints]]\nbase_url = "u"\nmodel = "m"\ncolour = "red"', "unknown keys: colour"),
        ('[[endpoints]]\nname = 5\nbase_url = "u"\nmodel = "m"', "name must be a non-empty string"),
        ('[[endpoints]]\nbase_url = ["u"]\nmodel = "m"', "base_url must be a non-empty string"),
        ('[[endpoints]]\nbase_url = "u"\nmodel = "m"\napi_key_env = 1', "api_key_env must be a"),
        (
            '[[endpoints]]\nbase_url = "https://ada:pa55@h/v1"\nmodel = "m"',
            "endpoints\\[0\\].base_url holds user information",
        ),
    ],
)
def test_bad_toml_config(tmp_path: Path, text: str, message: str):
    path = tmp_path / "e.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_targets(path)
    assert "pa55" not in str(info.value)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="--requests"):
        BenchSettings(requests=0)
    with pytest.raises(ValueError, match="--concurrency"):
        BenchSettings(concurrency=0)


async def test_prompts_file_is_used_in_turn(server: ReferenceEndpoint, tmp_path: Path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "one"}\n\n{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "two"}]}\n'
    )
    prompts = load_prompts(path)
    await TTFTBenchmark(
        [target(server, "a")], BenchSettings(requests=3, warmup=0, max_tokens=None), prompts=prompts
    ).run()
    bodies = [r.body for r in server.requests if r.body]
    assert [b["messages"][-1]["content"] for b in bodies] == ["one", "two", "one", "two"]
    assert all("max_tokens" not in b for b in bodies)


@pytest.mark.parametrize(
    ("text", "message"), [("{nope", "not valid JSON"), ('{"x": 1}', "expected"), ("", "no prompts")]
)
def test_bad_prompts_file(tmp_path: Path, text: str, message: str):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_prompts(path)


async def test_diagnosis_tells_dns_tls_policy_and_server_failures_apart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="voxloop.bench")
    key = "sk-bench-secret-31"
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("llm.example.test").configure_cert(server_ctx)
    async with (
        ReferenceEndpoint(ssl_context=server_ctx) as tls_server,
        ReferenceEndpoint(ReplyPlan(fault="status", status=500)) as failing,
        ReferenceEndpoint() as plain,
    ):
        plain_http = plain.base_url
        plain_https = "https" + plain_http[4:]
        targets = [
            BenchTarget("dns", "https://nowhere.example.test/v1", "m"),
            BenchTarget("tls", f"https://llm.example.test:{tls_server.port}/v1", "m"),
            BenchTarget("policy", "https://0x7f000001/v1", "m"),
            BenchTarget("server", failing.base_url, "m", api_key_env="BENCH_KEY"),
            # https to a plain-http server: the line every command gives, not OpenSSL's text.
            BenchTarget("plain", plain_https, "m"),
        ]
        reports = await TTFTBenchmark(
            targets,
            BenchSettings(requests=2, warmup=0),
            resolver=StaticResolver({"llm.example.test": ["127.0.0.1"]}),
            env={"BENCH_KEY": key},
        ).run()
    expected = {
        "dns": {"dns": "host 'nowhere.example.test' does not resolve"},
        "tls": {
            "tls": "TLS handshake with the endpoint failed: unable to get local issuer certificate"
        },
        "policy": {"url_policy": "non-canonical numeric IPv4 host '0x7f000001'"},
        # The server quoted the key it was given; the report never does.
        "server": {"server": "endpoint failed (HTTP 500): simulated 500 for the key ********"},
        "plain": {
            "tls": f"{plain_https}: the server at {plain_http.split('/')[2]} speaks plain "
            f"http, not TLS; use {plain_http}"
        },
    }
    assert {r.target.name: r.error_messages() for r in reports} == expected
    assert reports[1].errors() == {"tls": 2} and len(tls_server.requests) == 0
    assert reports[4].errors() == {"tls": 2}

    write_json(reports, tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {e["name"]: e["error_messages"] for e in doc["endpoints"]} == expected
    assert doc["endpoints"][0]["cold"]["message"] == expected["dns"]["dns"]
    write_csv(reports, tmp_path / "r.csv")
    with (tmp_path / "r.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["endpoint"], r["error"], r["message"]) for r in rows} == {
        (name, kind, message) for name, first in expected.items() for kind, message in first.items()
    }
    # With -v, every failed request is one log line with its message.
    lines = [r.getMessage() for r in caplog.records if r.name == "voxloop.bench"]
    assert (
        "tls: warm request 1 failed (tls): TLS handshake with the endpoint failed: "
        "unable to get local issuer certificate" in lines
    )
    assert key not in (tmp_path / "r.json").read_text() + (tmp_path / "r.csv").read_text()
    assert key not in caplog.text
