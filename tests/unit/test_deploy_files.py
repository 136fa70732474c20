"""The deployment files name what the server really has: its routes, its options, its settings."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

from runtime.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def serve_args(argv: list[str]) -> argparse.Namespace:
    assert argv[:2] == ["voxloop", "serve"], argv
    return build_parser().parse_args(argv[1:])


def test_the_image_runs_serve_as_a_non_root_user_with_the_embedded_models() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    found = re.search(r"^CMD (\[.*\])$", text, flags=re.M)
    assert found is not None
    cmd = json.loads(found.group(1))
    args = serve_args(cmd)
    assert (args.host, args.port, args.drain_timeout) == ("0.0.0.0", 8080, 30.0)
    assert re.search(r"^USER voxloop$", text, flags=re.M)
    assert "'.[embedded,phone]'" in text
    assert "/readyz" in text


def test_compose_runs_two_workers_on_shared_postgres_and_redis() -> None:
    doc = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text(encoding="utf-8"))
    workers = [s for name, s in doc["services"].items() if name.startswith("voxloop-")]
    assert len(workers) == 2
    for worker in workers:
        env = worker["environment"]
        assert env["VOXLOOP_DATABASE_URL"].startswith("postgresql://")
        assert env["VOXLOOP_REDIS_URL"] == "redis://redis:6379/0"
        # Docker waits longer than the drain before it kills a worker.
        assert int(worker["stop_grace_period"].rstrip("s")) > 30
    caddy = (ROOT / "deploy/Caddyfile").read_text(encoding="utf-8")
    assert "voxloop-1:8080 voxloop-2:8080" in caddy and "health_uri /readyz" in caddy


def test_kubernetes_probes_use_the_servers_routes_and_outlast_the_drain() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes.yaml").read_text(encoding="utf-8")))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = serve_args(container["args"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pause + args.drain_timeout
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "voxloop_live_sessions"
    # Every route named here exists in the app, and every setting is one the server reads.
    app = (ROOT / "runtime/server/app.py").read_text(encoding="utf-8")
    assert 'Route("/readyz"' in app and 'Route("/healthz"' in app
    assert '"voxloop_live_sessions"' in (ROOT / "runtime/sessions/metrics.py").read_text("utf-8")
    secret = next(d for d in docs if d["kind"] == "Secret")
    commands = (ROOT / "docs/commands.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in commands for name in secret["stringData"])
