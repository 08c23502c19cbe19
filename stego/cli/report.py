"""``stego report``: rebuild the static HTML report of an evaluation from its saved outputs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report",
        help="write a static HTML page (scores, IoU bars, confusion, gallery) of an evaluation",
        description=(
            "Build report.html from an evaluation folder (the --out of `stego eval`) or a run "
            "folder holding one. Needs neither the model nor the data; opens offline."
        ),
    )
    parser.add_argument("dir", metavar="DIR",
                        help="evaluation folder with metrics.json, or a run folder containing one")
    parser.add_argument("--out", default=None,
                        help="HTML file to write (default: DIR's evaluation folder/report.html); "
                        "its images go to a sibling <name>_assets/ folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stego.eval.report import write_report

    path = write_report(args.dir, args.out)
    print(f"report: {path}")
    return 0
