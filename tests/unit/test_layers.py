"""The dependency rule, read from the source: which package may import which.

Every ``import`` and ``from … import`` in a module counts, including those inside
functions and under ``TYPE_CHECKING``: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def imports_of(package: str) -> dict[str, set[str]]:
    base = ROOT / package.replace(".", "/")
    return {str(p.relative_to(ROOT)): imported_modules(p) for p in sorted(base.rglob("*.py"))}


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {name}"
        for module, names in imports_of(package).items()
        for name in names
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )


def test_the_scanner_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from runtime.server.app import Api\n"
        "def f():\n    import runtime.cli.talk\n",
        encoding="utf-8",
    )
    names = imported_modules(probe)
    assert {"runtime.server.app", "runtime.server.app.Api", "runtime.cli.talk"} <= names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        # The session host sits below every network adapter and the CLI.
        ("runtime.sessions", ("runtime.server", "runtime.cli", "runtime.agents")),
        # Stored agents know nothing of HTTP, sessions or the CLI.
        ("runtime.agents", ("runtime.server", "runtime.sessions", "runtime.cli")),
        # The conversation core knows no adapter and no host.
        ("runtime.conversation", ("runtime.server", "runtime.sessions", "runtime.cli")),
        # Sound only.
        ("audio", ("runtime",)),
    ],
)
def test_dependencies_point_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    assert imports_of(package), f"no modules found in {package}"
    assert offenders(package, forbidden) == []


def test_the_websocket_adapter_does_not_import_the_rest_app() -> None:
    realtime = imported_modules(ROOT / "runtime/server/realtime.py")
    assert not {n for n in realtime if n.startswith("runtime.server.app")}
