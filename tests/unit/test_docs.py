"""The reference in docs/ covers every command, option and setting; the README's links resolve."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("voxloop",)
) -> Iterator[tuple[str, list[str]]]:
    """Every (sub)command with the option strings it takes, help excluded."""
    options: list[str] = []
    children: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            children.extend(action.choices.items())
        elif not isinstance(action, argparse._HelpAction):
            options.extend(o for o in action.option_strings if o.startswith("--"))
    yield " ".join(path), options
    for name, child in children:
        yield from commands(child, (*path, name))


def section(page: str, command: str) -> str:
    """The text of the ``## `voxloop …` `` section of docs/commands.md that documents ``command``."""
    text = (DOCS / page).read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.M)
    words = command.split()
    for part in parts[1:]:
        heading = part.split("\n", 1)[0]
        if f"`{command}`" in heading or (len(words) > 2 and f"`{' '.join(words[:2])}`" in heading):
            return part
    raise AssertionError(f"docs/{page} has no section for `{command}`")


CLI = [(name, options) for name, options in commands(build_parser()) if name != "voxloop"]


@pytest.mark.parametrize(("command", "options"), CLI, ids=[name for name, _ in CLI])
def test_every_option_of_every_command_is_in_the_commands_page(command: str, options: list[str]):
    if command in ("voxloop bench", "voxloop endpoint", "voxloop secrets"):
        assert not options  # groups only hold their subcommands
        return
    text = section("commands.md", command)
    missing = [o for o in options if not re.search(rf"`{re.escape(o)}[` =]", text)]
    assert not missing, f"docs/commands.md, `{command}`: document {missing}"


def test_the_top_level_options_are_in_the_commands_page():
    text = (DOCS / "commands.md").read_text(encoding="utf-8")
    assert "`--version`" in text and "`--verbose`" in text


def test_every_setting_the_code_reads_is_documented():
    read = set()
    for package in ("runtime", "audio"):
        for source in (ROOT / package).rglob("*.py"):
            read |= set(re.findall(r"\bVOXLOOP_[A-Z0-9_]*[A-Z0-9]\b", source.read_text("utf-8")))
    documented = (DOCS / "commands.md").read_text(encoding="utf-8")
    assert "VOXLOOP_API_KEYS" in read  # the scan finds what it looks for
    missing = sorted(s for s in read if f"`{s}`" not in documented)
    assert not missing, f"add these settings to the Settings table of docs/commands.md: {missing}"


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) < 300


PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_resolve_on_the_code_host(page: Path):
    """Every relative link names a file that exists and a heading it has, as the code host
    writes anchors (mkdocs build --strict checks the site's own anchors)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(#[^)\s]+)?\)", text):
        if "://" in target:
            continue
        path = (page.parent / target) if target else page
        assert path.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            headings = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
            slugs = {slug(h) for h in re.findall(r"^#+ (.+)$", headings, flags=re.M)}
            assert anchor[1:] in slugs, f"{page.name} links to {target}{anchor}: no such heading"


def slug(heading: str) -> str:
    """A heading's anchor on the code host: lower case, marks dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_slug_rule():
    assert slug("`voxloop talk`") == "voxloop-talk"
    assert slug("A client in plain Python (`websockets`)") == "a-client-in-plain-python-websockets"
    assert slug("`voxloop talk` — a conversation") == "voxloop-talk--a-conversation"


def test_the_site_builds_and_renders_what_the_code_host_renders(tmp_path: Path):
    """Python-Markdown differs from the code host's Markdown: a list needs a blank line before it,
    a nested list or a code block inside a list item needs four spaces, and a pipe escaped inside
    a table's code span keeps its backslash. Each shows on the site as raw text."""
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    pages = sorted(tmp_path.glob("*/index.html"))
    assert len(pages) == len(list(DOCS.glob("*.md"))) - 1  # index.md is site/index.html
    for page in [tmp_path / "index.html", *pages]:
        html = page.read_text(encoding="utf-8")
        main = re.sub(r"<pre.*?</pre>", "", html[html.index('role="main"') :], flags=re.S)
        name = page.parent.name or "index"
        assert "|---" not in main, f"docs/{name}.md: a table is not rendered"
        assert "```" not in main, f"docs/{name}.md: a code block is not rendered"
        assert not re.search(r"<p>(- |\d+\. )|\n(- |\d+\. )", main), (
            f"docs/{name}.md: a list is not rendered (a blank line before it; nested items and "
            "code blocks in items indented by four spaces)"
        )
        assert "\\|" not in main, f"docs/{name}.md: write choices as {{a,b}}, not a\\|b"
