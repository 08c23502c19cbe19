"""``stego view RESULTS``: a local web page to see, name and merge the clusters of a result."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "view",
        help="a local web page of a segment result: clusters, names, images with overlays",
        description="Serve a page on 127.0.0.1 over RESULTS (the --out of `stego segment`): each "
        "cluster with its colour, pixel share and crops of where it is; rename clusters, merge "
        "them by giving two the same name, save (the same as `stego name --names`); browse the "
        "images with their overlays. Everything the page needs ships with stego: no network.",
    )
    parser.add_argument("results", metavar="RESULTS", help="the --out folder of stego segment")
    parser.add_argument(
        "--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one, printed)"
    )
    parser.add_argument(
        "--open", action="store_true", help="also open the page in the default web browser"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stego.view.server import serve

    serve(args.results, args.port, open_browser=args.open)
    return 0
