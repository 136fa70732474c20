"""Reading the benchmarks' input files (endpoint lists, prompts, conversations, reports)."""

from __future__ import annotations

from pathlib import Path


def read_utf8(path: Path) -> str:
    """The whole text of ``path``, read as UTF-8.

    Raises:
        ValueError: the file cannot be read (the system's reason) or is not UTF-8 text;
            the message names the file.
    """
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start} cannot be read)") from None
