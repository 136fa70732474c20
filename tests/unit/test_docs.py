"""The reference in docs/ covers every command, option and setting; the README's links resolve."""

from __future__ import annotations

import argparse
import re
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


def test_the_readme_links_resolve_and_the_readme_stays_short():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 300
    links = re.findall(r"\]\(([^)#\s]+)(#[^)\s]+)?\)", text)
    local = [(target, anchor) for target, anchor in links if "://" not in target]
    assert len(local) > 10
    for target, anchor in local:
        path = ROOT / target
        assert path.exists(), f"README links to {target}, which does not exist"
        if anchor:
            headings = path.read_text(encoding="utf-8")
            slugs = {slug(h) for h in re.findall(r"^#+ (.+)$", headings, flags=re.M)}
            assert anchor[1:] in slugs, f"README links to {target}{anchor}: no such heading"


def slug(heading: str) -> str:
    """The anchor both the code host and MkDocs give a heading made of words, code and marks."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"\s+", "-", text)


def test_the_slug_rule():
    assert slug("`voxloop talk`") == "voxloop-talk"
    assert slug("A client in plain Python (`websockets`)") == "a-client-in-plain-python-websockets"
