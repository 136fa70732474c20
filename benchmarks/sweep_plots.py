"""Write the charts of a ``voxloop bench ttft --sweep … --json`` report as standalone SVG files.

The HTML report (``--report``) embeds the same charts; this writes them one file each, for
pages that show images (the docs' worked example)::

    python -m benchmarks.sweep_plots sweep.json docs/images/sweep
    # -> docs/images/sweep-first-sentence.svg, -ttft.svg, -pass-rate.svg, -throughput.svg
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.bench.report import charts, load_document

NAMES = ("first-sentence", "ttft", "pass-rate", "throughput")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sweep report charts as SVG files")
    parser.add_argument("report", type=Path, help="a bench ttft --sweep --json file")
    parser.add_argument("prefix", help="output path prefix; '-NAME.svg' is appended")
    args = parser.parse_args(argv)
    doc = load_document(args.report)
    if doc.get("schema") is None:
        parser.error(f"{args.report} is not a sweep report")
    for name, svg in zip(NAMES, charts(doc), strict=True):
        path = Path(f"{args.prefix}-{name}.svg")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('<?xml version="1.0" encoding="utf-8"?>\n' + svg + "\n", encoding="utf-8")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
