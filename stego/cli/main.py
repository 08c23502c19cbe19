"""The ``stego`` command line: one subcommand per pipeline stage, a thin layer over the library.

Each subcommand lives in its own module ``stego/cli/<name>.py`` exposing
``register(subparsers)``, which adds its parser and sets ``func`` to a ``run(args) -> int``.
User mistakes raise :class:`stego.errors.StegoError`; they are printed as one line and the
process exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Sequence

from stego import __version__
from stego.errors import StegoError

# The pipeline, in the order a user runs it. `stego --help` lists them in this order.
COMMANDS: tuple[str, ...] = (
    "demo",
    "segment",
    "name",
    "view",
    "export",
    "crop",
    "features",
    "knn",
    "calibrate",
    "train",
    "eval",
    "analyze",
    "predict",
    "report",
    "convert_official",
    "export_onnx",
    "selfcheck",
)

DESCRIPTION = """\
Unsupervised semantic segmentation with STEGO.

Quick start on your own images:   stego segment DIR --clusters K --out OUT
Name the clusters:                stego name OUT --labels LABELS  (or --names "0=sky,1=road")
See, name and merge them:         stego view OUT
Use them elsewhere:               stego export OUT --format coco|masks|areas|label-studio --out PATH
Research pipeline (paper datasets):
  1. stego crop      five-crop a training split once (COCO-Stuff, Cityscapes)
  2. stego features  cache frozen backbone features (optional; training then skips the backbone)
  3. stego knn       nearest-neighbour table of training images
     stego calibrate (optional) propose the loss shifts from your data, without labels
  4. stego train     train the segmentation head and probes
  5. stego eval      the paper's evaluation protocol (Hungarian-matched accuracy / mIoU)
     stego analyze   (optional) compare backbones / blocks / resolutions on a labelled split:
                     how well feature cosine predicts same-class patches (the paper's Fig. 5)
Then: stego predict, stego report, stego convert-official, stego export-onnx.
"""


def one_line(message: str) -> str:
    """``message`` without terminal colour codes, its whitespace runs collapsed to one space
    (errors quoted from other libraries can span lines)."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", message).split())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stego", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"stego {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"stego.cli.{name}").register(sub)
    return parser


def _calm_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning, unless the user chose otherwise.

    Spinning threads keep a core busy between PyTorch's parallel regions; when other processes
    share the cores, every region then waits for a descheduled peer. Measured on the 2-core
    development machine with two other busy processes: a cached training step at 3.8-4.0 steps/s
    with sleeping threads against 1.5 with spinning ones. Read once, when torch loads.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    _calm_openmp()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from stego.train.console import quiet_libraries

    try:
        with quiet_libraries(bool(getattr(args, "verbose", False))):
            return int(args.func(args) or 0)
    except StegoError as exc:
        print(f"stego {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"stego {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
