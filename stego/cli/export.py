"""``stego export RESULTS --format FORMAT --out PATH``: a segment result in other tools' formats."""

from __future__ import annotations

import argparse

from stego.export import FORMATS


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="write a segment result as COCO, binary masks, a table of areas or Label Studio tasks",
        description="Export RESULTS (the --out of `stego segment`, named or not) with its class "
        "names: " + "; ".join(f"{name}: {text}" for name, (text, _) in FORMATS.items()) + ".",
    )
    parser.add_argument("results", metavar="RESULTS", help="the --out folder of stego segment")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="what to write")
    parser.add_argument(
        "--out",
        required=True,
        help="file to write (a folder for --format masks); replaced atomically",
    )
    parser.add_argument(
        "--image-url",
        default=None,
        help="label-studio: URL prefix of the images (default: Label Studio's "
        "local files, /data/local-files/?d=<absolute path>)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stego.export import export_results

    written = export_results(args.results, args.format, args.out, image_url=args.image_url)
    for path in written:
        print(f"wrote {path}")
    return 0
