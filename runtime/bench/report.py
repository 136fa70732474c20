"""Sweep reports: one JSON document (for CI), one self-contained HTML page, and comparisons.

The JSON document (:data:`SCHEMA` is its JSON Schema)::

    {"schema": "voxloop-bench-sweep/1", "created": ISO-8601, "settings": {…}, "machine": {…},
     "sweep": {"mode": "concurrency" | "rate", "values": [...]},
     "workload": {"kind": "prompts" | "conversations", …},
     "slo": {"budgets_ms": {"first_sentence_ms": 800}, "target_pass_rate": 0.95},
     "endpoints": [{"name", "base_url", "model", "error", "message", "cold": {…} | null,
                    "stopped_early", "knee": {"max_load_passing", "first_failing"},
                    "steps": [{"load", "window_s", "runs", "requests", "ok", "errors",
                               "error_messages", "throughput": {"requests_per_s",
                               "output_tokens_per_s"}, "metrics": {metric: stats | null},
                               "slo": {"passed", "total", "pass_rate"},
                               "steady": {…}, "client": {…}}]}]}

A plain (one-step) ``voxloop bench ttft --json`` document is read as a sweep
of one step at its concurrency, so ``--compare`` takes either.

The HTML page embeds its plots as inline SVG and its styles inline: it opens
offline and can be mailed or attached to a CI run as one file.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from runtime.bench.files import read_utf8
from runtime.bench.stats import PERCENTILES
from runtime.bench.sweep import SLO, EndpointSweep, SweepSpec

SCHEMA_ID: Final = "voxloop-bench-sweep/1"

_STATS = {
    "type": ["object", "null"],
    "properties": {
        **{f"p{p}": {"type": "number"} for p in PERCENTILES},
        "max": {"type": "number"},
        "mean": {"type": "number"},
        "n": {"type": "number"},
    },
    "required": [*(f"p{p}" for p in PERCENTILES), "max", "mean", "n"],
}
_NUM_OR_NULL = {"type": ["number", "null"]}

SCHEMA: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "voxloop bench ttft sweep report",
    "type": "object",
    "required": [
        "schema",
        "created",
        "settings",
        "machine",
        "sweep",
        "workload",
        "slo",
        "endpoints",
    ],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "created": {"type": "string"},
        "settings": {"type": "object"},
        "machine": {
            "type": "object",
            "required": ["cpus", "python", "platform"],
        },
        "sweep": {
            "type": "object",
            "required": ["mode", "values"],
            "properties": {
                "mode": {"enum": ["concurrency", "rate"]},
                "values": {"type": "array", "items": {"type": "number"}, "minItems": 1},
            },
        },
        "workload": {
            "type": "object",
            "required": ["kind"],
            "properties": {"kind": {"enum": ["prompts", "conversations"]}},
        },
        "slo": {
            "type": "object",
            "required": ["budgets_ms", "target_pass_rate"],
            "properties": {
                "budgets_ms": {"type": "object", "additionalProperties": {"type": "number"}},
                "target_pass_rate": {"type": "number"},
            },
        },
        "endpoints": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "name",
                    "base_url",
                    "model",
                    "error",
                    "cold",
                    "stopped_early",
                    "knee",
                    "steps",
                ],
                "properties": {
                    "name": {"type": "string"},
                    "error": {"type": ["string", "null"]},
                    "knee": {
                        "type": "object",
                        "required": ["max_load_passing", "first_failing"],
                        "properties": {
                            "max_load_passing": _NUM_OR_NULL,
                            "first_failing": _NUM_OR_NULL,
                        },
                    },
                    "steps": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": [
                                "load",
                                "window_s",
                                "runs",
                                "requests",
                                "ok",
                                "errors",
                                "throughput",
                                "metrics",
                                "slo",
                                "steady",
                                "client",
                            ],
                            "properties": {
                                "load": {"type": "number"},
                                "requests": {"type": "integer", "minimum": 0},
                                "ok": {"type": "integer", "minimum": 0},
                                "errors": {
                                    "type": "object",
                                    "additionalProperties": {"type": "integer"},
                                },
                                "throughput": {
                                    "type": "object",
                                    "required": ["requests_per_s", "output_tokens_per_s"],
                                },
                                "metrics": {
                                    "type": "object",
                                    "required": [
                                        "ttft_ms",
                                        "ttst_ms",
                                        "first_sentence_ms",
                                        "e2e_ms",
                                    ],
                                    "additionalProperties": _STATS,
                                },
                                "slo": {
                                    "type": "object",
                                    "required": ["passed", "total", "pass_rate"],
                                    "properties": {"pass_rate": _NUM_OR_NULL},
                                },
                                "client": {
                                    "type": "object",
                                    "required": [
                                        "cpu_ms_per_request",
                                        "busy",
                                        "loop_lag_p99_ms",
                                        "bound",
                                        "reason",
                                    ],
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def machine_facts() -> dict[str, Any]:
    """What the numbers were measured on (the client's machine)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        usable = os.cpu_count() or 0
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "cpu": cpu,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def sweep_document(
    sweeps: Sequence[EndpointSweep],
    spec: SweepSpec,
    slo: SLO,
    *,
    settings: dict[str, Any],
    workload: dict[str, Any],
    steady_tolerance: float,
) -> dict[str, Any]:
    """The JSON document of a sweep run (see the module docstring)."""
    endpoints = []
    for sweep in sweeps:
        best, failing = sweep.knee(slo)
        cold = sweep.cold
        endpoints.append(
            {
                "name": sweep.target.name,
                "base_url": sweep.target.base_url,
                "model": sweep.target.model,
                "error": sweep.error,
                "message": sweep.message,
                "cold": None
                if cold is None
                else {
                    "ok": cold.ok,
                    "error": cold.error,
                    "message": cold.message,
                    "ttft_ms": cold.ttft_ms,
                    "first_sentence_ms": cold.first_sentence_ms,
                    "e2e_ms": cold.e2e_ms,
                },
                "stopped_early": sweep.stopped_early,
                "knee": {"max_load_passing": best, "first_failing": failing},
                "steps": [step.to_json(slo, steady_tolerance) for step in sweep.steps],
            }
        )
    return {
        "schema": SCHEMA_ID,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": settings,
        "machine": machine_facts(),
        "sweep": {"mode": spec.mode, "values": list(spec.values)},
        "workload": workload,
        "slo": slo.to_json(),
        "endpoints": endpoints,
    }


def load_document(path: Path) -> dict[str, Any]:
    """Read a sweep document, or a plain ``bench ttft --json`` one as a one-step sweep.

    Raises:
        ValueError: unreadable, not JSON, or neither kind of document.
    """
    text = read_utf8(path)
    try:
        doc = json.loads(text)
    except ValueError:
        raise ValueError(f"{path} is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("endpoints"), list):
        raise ValueError(f"{path} is not a voxloop bench ttft report")
    if doc.get("schema") == SCHEMA_ID:
        return doc
    if doc.get("schema") is not None:
        raise ValueError(f"{path} has an unknown schema {doc['schema']!r}")
    load = float(doc.get("settings", {}).get("concurrency", 1))
    endpoints = []
    for e in doc["endpoints"]:
        if not isinstance(e, dict) or "metrics" not in e:
            raise ValueError(f"{path} is not a voxloop bench ttft report")
        slo = e.get("slo") or {"passed": None, "total": None, "pass_rate": None}
        step = {
            "load": load,
            "requests": e.get("requests", 0),
            "ok": e.get("ok", 0),
            "errors": e.get("errors", {}),
            "throughput": e.get("throughput", {}),
            "metrics": e["metrics"],
            "slo": slo,
        }
        endpoints.append(
            {
                "name": e.get("name", "?"),
                "knee": {"max_load_passing": None, "first_failing": None},
                "steps": [step],
            }
        )
    return {"schema": None, "sweep": {"mode": "concurrency", "values": [load]},
            "endpoints": endpoints, "slo": doc.get("slo", {})}  # fmt: skip


# -- comparison ---------------------------------------------------------------------

# (label, path into a step, True when higher is better)
COMPARED: Final = (
    ("first sentence p50 ms", ("metrics", "first_sentence_ms", "p50"), False),
    ("first sentence p95 ms", ("metrics", "first_sentence_ms", "p95"), False),
    ("ttft p50 ms", ("metrics", "ttft_ms", "p50"), False),
    ("ttft p95 ms", ("metrics", "ttft_ms", "p95"), False),
    ("ttst p50 ms", ("metrics", "ttst_ms", "p50"), False),
    ("e2e p50 ms", ("metrics", "e2e_ms", "p50"), False),
    ("pass rate", ("slo", "pass_rate"), True),
    ("requests/s", ("throughput", "requests_per_s"), True),
    ("output tok/s", ("throughput", "output_tokens_per_s"), True),
)


@dataclass(frozen=True, slots=True)
class Change:
    endpoint: str
    load: float | None
    label: str
    a: float | None
    b: float | None
    mark: str  # "better" | "worse" | "" (within the threshold) | "new" | "gone"

    @property
    def relative(self) -> float | None:
        if self.a is None or self.b is None or self.a == 0:
            return None
        return (self.b - self.a) / abs(self.a)


def _get(step: dict[str, Any] | None, path: tuple[str, ...]) -> float | None:
    node: Any = step
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return float(node) if isinstance(node, int | float) else None


def compare(a: dict[str, Any], b: dict[str, Any], threshold: float = 0.10) -> list[Change]:
    """Every compared value per endpoint and load, marked where it moved more than ``threshold``.

    Pass rates are compared in points (0.95 → 0.90 is minus 0.05, marked when the
    move is at least ``threshold / 2``); everything else relatively. Endpoints
    and loads in only one run are marked ``new`` or ``gone``.
    """
    changes: list[Change] = []
    ea = {e["name"]: e for e in a["endpoints"]}
    eb = {e["name"]: e for e in b["endpoints"]}
    for name in [*ea, *(n for n in eb if n not in ea)]:
        sa = {s["load"]: s for s in (ea.get(name) or {}).get("steps", [])}
        sb = {s["load"]: s for s in (eb.get(name) or {}).get("steps", [])}
        for load in sorted({*sa, *sb}):
            for label, path, higher_better in COMPARED:
                va, vb = _get(sa.get(load), path), _get(sb.get(load), path)
                if va is None and vb is None:
                    continue
                if load not in sa or va is None:
                    mark = "new"
                elif load not in sb or vb is None:
                    mark = "gone"
                else:
                    if label == "pass rate":
                        moved = vb - va
                        significant = abs(moved) >= threshold / 2
                    else:
                        moved = (vb - va) / abs(va) if va else (vb - va)
                        significant = abs(moved) >= threshold
                    mark = ""
                    if significant:
                        mark = "better" if (moved > 0) == higher_better else "worse"
                changes.append(Change(name, load, label, va, vb, mark))
        ka = ((ea.get(name) or {}).get("knee") or {}).get("max_load_passing")
        kb = ((eb.get(name) or {}).get("knee") or {}).get("max_load_passing")
        if ka is not None or kb is not None:
            mark = ""
            if ka is None or kb is None:
                mark = "better" if ka is None else "worse"
            elif kb != ka:
                mark = "better" if kb > ka else "worse"
            changes.append(Change(name, None, "largest load ≥ 95 %", ka, kb, mark))
    return changes


# -- HTML ---------------------------------------------------------------------------

_COLORS: Final = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")
_W, _H = 460, 280
_L, _R, _T, _B = 58, 16, 28, 42


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    import math

    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return float(m * exp)
    return float(10 * exp)  # pragma: no cover


def _svg_chart(
    title: str,
    xs: Sequence[float],
    xlabel: str,
    series: Sequence[tuple[str, str, bool, Sequence[float | None]]],
    *,
    ylabel: str,
    hline: tuple[float, str] | None = None,
    ymax: float | None = None,
) -> str:
    """A line chart: x at evenly spaced load steps; series (label, color, dashed, ys)."""
    values = [y for _, _, _, ys in series for y in ys if y is not None]
    top = ymax if ymax is not None else _nice_max(max([*values, hline[0] if hline else 0.0]))
    pw, ph = _W - _L - _R, _H - _T - _B
    n = max(1, len(xs) - 1)

    def px(i: int) -> float:
        return _L + (pw * i / n if len(xs) > 1 else pw / 2)

    def py(v: float) -> float:
        return _T + ph - ph * min(v, top) / top

    e = html.escape
    height = _H + 14 * ((len(series) + 1) // 2) + 4
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" '
        f'viewBox="0 0 {_W} {height}" role="img" aria-label="{e(title)}">',
        f'<rect width="{_W}" height="{height}" fill="#fff"/>',
        f'<text x="{_W / 2}" y="16" text-anchor="middle" font-size="13" '
        f'font-weight="bold">{e(title)}</text>',
        f'<rect x="{_L}" y="{_T}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    for k in range(5):
        v = top * k / 4
        y = py(v)
        out.append(f'<line x1="{_L}" x2="{_L + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        label = f"{v:.0%}" if ymax == 1.0 else f"{v:g}"
        out.append(f'<text x="{_L - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">'
                   f"{label}</text>")  # fmt: skip
    for i, x in enumerate(xs):
        out.append(f'<text x="{px(i):.1f}" y="{_T + ph + 14}" text-anchor="middle" '
                   f'font-size="10">{x:g}</text>')  # fmt: skip
    out.append(f'<text x="{_L + pw / 2}" y="{_H - 6}" text-anchor="middle" font-size="11">'
               f"{e(xlabel)}</text>")  # fmt: skip
    out.append(f'<text x="12" y="{_T + ph / 2}" text-anchor="middle" font-size="11" '
               f'transform="rotate(-90 12 {_T + ph / 2})">{e(ylabel)}</text>')  # fmt: skip
    if hline is not None:
        y = py(hline[0])
        out.append(f'<line x1="{_L}" x2="{_L + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#555" '
                   f'stroke-dasharray="2,3"/><text x="{_L + pw - 2}" y="{y - 3:.1f}" '
                   f'text-anchor="end" font-size="10" fill="#555">'
                   f"{e(hline[1])}</text>")  # fmt: skip
    for label, color, dashed, ys in series:
        points = [(px(i), py(y)) for i, y in enumerate(ys) if y is not None]
        if not points:
            continue
        dash = ' stroke-dasharray="6,4"' if dashed else ""
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"'
                   f"{dash}><title>{e(label)}</title></polyline>")  # fmt: skip
        for x, y in points:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
    # legend: rows under the x-axis label, two entries a row
    for k, (label, color, dashed, _) in enumerate(series):
        x = _L + (k % 2) * (pw / 2)
        y = _H + 14 * (k // 2) + 4
        dash = ' stroke-dasharray="6,4"' if dashed else ""
        out.append(f'<line x1="{x:.1f}" x2="{x + 20:.1f}" y1="{y - 4}" y2="{y - 4}" '
                   f'stroke="{color}" stroke-width="2"{dash}/><text x="{x + 24:.1f}" y="{y}" '
                   f'font-size="10">{e(label)}</text>')  # fmt: skip
    out.append("</svg>")
    return "".join(out)


DASH: Final = "\u2013"


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return DASH
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _pct(v: float | None) -> str:
    return DASH if v is None else f"{v:.1%}"


def charts(doc: dict[str, Any]) -> list[str]:
    """The report's SVG charts: latency, pass rate and throughput against the load."""
    xs = doc["sweep"]["values"]
    mode = doc["sweep"]["mode"]
    xlabel = "concurrent callers" if mode == "concurrency" else "arrivals per second"
    budgets = doc["slo"]["budgets_ms"]
    eps = [e for e in doc["endpoints"] if e["steps"]]

    def column(e: dict[str, Any], path: tuple[str, ...]) -> list[float | None]:
        by_load = {s["load"]: s for s in e["steps"]}
        return [_get(by_load.get(x), path) for x in xs]

    out = []
    for metric, title in (
        ("first_sentence_ms", "First speakable segment (p50 solid, p95 dashed)"),
        ("ttft_ms", "Time to first token (p50 solid, p95 dashed)"),
    ):
        series = []
        for k, e in enumerate(eps):
            color = _COLORS[k % len(_COLORS)]
            series.append((f"{e['name']} p50", color, False, column(e, ("metrics", metric, "p50"))))
            series.append((f"{e['name']} p95", color, True, column(e, ("metrics", metric, "p95"))))
        hline = (budgets[metric], f"budget {budgets[metric]:g} ms") if metric in budgets else None
        out.append(_svg_chart(title, xs, xlabel, series, ylabel="ms", hline=hline))
    rates = [
        (e["name"], _COLORS[k % len(_COLORS)], False, column(e, ("slo", "pass_rate")))
        for k, e in enumerate(eps)
    ]
    target = doc["slo"]["target_pass_rate"]
    out.append(
        _svg_chart(
            "Voice SLO pass rate",
            xs,
            xlabel,
            rates,
            ylabel="share of turns",
            hline=(target, f"{target:.0%}"),
            ymax=1.0,
        )
    )
    tput = [
        (
            e["name"],
            _COLORS[k % len(_COLORS)],
            False,
            column(e, ("throughput", "output_tokens_per_s")),
        )
        for k, e in enumerate(eps)
    ]
    out.append(_svg_chart("Output tokens per second", xs, xlabel, tput, ylabel="tokens/s"))
    return out


def write_html(doc: dict[str, Any], path: Path) -> None:
    """One self-contained page (inline SVG and CSS, nothing fetched)."""
    path.write_text(render_html(doc), encoding="utf-8")


def render_html(doc: dict[str, Any]) -> str:
    e = html.escape
    mode = doc["sweep"]["mode"]
    unit = "callers" if mode == "concurrency" else "per s"
    budgets = ", ".join(f"{m} ≤ {v:g} ms" for m, v in doc["slo"]["budgets_ms"].items())
    target = doc["slo"]["target_pass_rate"]
    loads = ", ".join(f"{v:g}" for v in doc["sweep"]["values"])
    parts = [
        "<!doctype html><html lang='en'><meta charset='utf-8'>",
        "<title>voxloop bench ttft — sweep report</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}"
        "table{border-collapse:collapse;margin:8px 0 20px;font-size:13px}"
        "th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}"
        ".fail{color:#b00}.warn{color:#a60}.charts{display:flex;flex-wrap:wrap;gap:12px}"
        "code{background:#f5f5f5;padding:0 3px}</style>",
        "<h1>voxloop bench ttft — sweep report</h1>",
        f"<p>{e(doc['created'])} · {mode} sweep {e(loads)}"
        f" · voice SLO: {e(budgets)}, target {target:.0%} of turns</p>",
        "<h2>Capacity at the voice SLO</h2><table><tr><th>endpoint</th><th>model</th>"
        f"<th>largest {e(mode)} with ≥ {target:.0%} passing</th><th>first failing</th>"
        "<th>notes</th></tr>",
    ]
    for ep in doc["endpoints"]:
        knee = ep["knee"]
        notes = []
        if ep.get("error"):
            notes.append(f"{ep['error']}: {ep.get('message') or ''}")
        if ep.get("stopped_early"):
            notes.append("stopped after a step below the stop threshold")
        if any(s["client"]["bound"] for s in ep["steps"]):
            notes.append("client-bound at some steps (see the table)")
        best, failing = knee["max_load_passing"], knee["first_failing"]
        parts.append(
            f"<tr><td>{e(ep['name'])}</td><td>{e(ep['model'])}</td>"
            f"<td>{'none' if best is None else f'{best:g} {unit}'}</td>"
            f"<td>{'none' if failing is None else f'{failing:g}'}</td>"
            f"<td>{e('; '.join(notes))}</td></tr>"
        )
    parts.append("</table><h2>Curves</h2><div class='charts'>")
    parts.extend(charts(doc))
    parts.append("</div>")
    for ep in doc["endpoints"]:
        parts.append(
            f"<h2>{e(ep['name'])} — {e(ep['model'])} @ {e(ep['base_url'])}</h2><table><tr>"
            f"<th>{e(mode)}</th><th>requests</th><th>ok</th><th>errors</th><th>req/s</th>"
            "<th>out tok/s</th><th>ttft p50</th><th>ttft p95</th><th>ttst p50</th>"
            "<th>first sentence p50</th><th>p95</th><th>p99</th><th>e2e p50</th>"
            "<th>pass rate</th><th>steady</th><th>client ms/req</th><th>client</th></tr>"
        )
        for s in ep["steps"]:
            m = s["metrics"]

            def st(metric: str, which: str, m: dict[str, Any] = m) -> str:
                return _fmt((m.get(metric) or {}).get(which))

            rate = s["slo"]["pass_rate"]
            cls = "" if rate is not None and rate >= target else " class='fail'"
            errors = ", ".join(f"{k}={v}" for k, v in sorted(s["errors"].items())) or DASH
            client = s["client"]
            parts.append(
                f"<tr><td>{s['load']:g}</td><td>{s['requests']}</td><td>{s['ok']}</td>"
                f"<td>{e(errors)}</td><td>{_fmt(s['throughput']['requests_per_s'], 2)}</td>"
                f"<td>{_fmt(s['throughput']['output_tokens_per_s'])}</td>"
                f"<td>{st('ttft_ms', 'p50')}</td><td>{st('ttft_ms', 'p95')}</td>"
                f"<td>{st('ttst_ms', 'p50')}</td><td>{st('first_sentence_ms', 'p50')}</td>"
                f"<td>{st('first_sentence_ms', 'p95')}</td>"
                f"<td>{st('first_sentence_ms', 'p99')}</td>"
                f"<td>{st('e2e_ms', 'p50')}</td><td{cls}>{_pct(rate)}</td>"
                f"<td>{'yes' if s['steady']['steady'] else 'no'} ({s['runs']} run"
                f"{'s' if s['runs'] > 1 else ''})</td>"
                f"<td>{_fmt(client['cpu_ms_per_request'], 2)}</td>"
                f"<td{' class=warn' if client['bound'] else ''}>"
                f"{e(client['reason'] or 'ok')}</td></tr>"
            )
        parts.append("</table>")
        messages = {k: v for s in ep["steps"] for k, v in s.get("error_messages", {}).items()}
        if messages:
            parts.append("<p>First message of each error kind:</p><ul>")
            parts.extend(f"<li><code>{e(k)}</code>: {e(v)}</li>" for k, v in messages.items())
            parts.append("</ul>")
    parts.append("<h2>Settings</h2><table>")
    for k, v in {
        **doc["settings"],
        **{"workload." + k: v for k, v in doc["workload"].items()},
    }.items():
        parts.append(f"<tr><td>{e(k)}</td><td>{e(json.dumps(v))}</td></tr>")
    parts.append("</table><h2>Machine (client)</h2><table>")
    for k, v in doc["machine"].items():
        parts.append(f"<tr><td>{e(k)}</td><td>{e(json.dumps(v))}</td></tr>")
    parts.append("</table></html>\n")
    return "".join(parts)
