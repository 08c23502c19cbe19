"""``stego crop``: five-crop a training split once (four corners + centre, half size each)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "crop",
        help="five-crop a dataset split once (four corners + centre, each half size)",
        description=(
            "Cut every image (and label) of a split into its four corner crops and its centre "
            "crop, each half the height and width, and store them for training with "
            "crop_type=five. Interrupted runs resume where they stopped; finished splits are "
            "skipped."
        ),
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="dataset name, e.g. cocostuff27, cityscapes27, potsdam3, camvid "
        "(all names: stego.data.DATASETS)",
    )
    parser.add_argument(
        "--data-root",
        required=True,
        help="folder holding the dataset (e.g. the folder with cocostuff/ or cityscapes/ inside)",
    )
    parser.add_argument(
        "--split",
        default="train",
        help="split to crop (default: train; the paper crops train only)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="crop root (default: DATA_ROOT/cropped); crops go to OUT/<dataset>_five_crop_0.5/",
    )
    parser.add_argument(
        "--format",
        choices=("png", "jpg"),
        default="png",
        help="image format: png is lossless (default); jpg is smaller and matches "
        "the original code",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stego.data import write_five_crops

    result = write_five_crops(
        args.dataset,
        args.data_root,
        args.split,
        args.out,
        fmt=args.format,
        progress=not args.no_progress,
    )
    done = result.n_images - result.n_written
    print(
        f"{result.n_crops} crops of {result.n_images} images in {result.folder} "
        f"({result.n_written} cut now, {done} already done)"
    )
    return 0
