"""``stego convert-official``: turn a checkpoint of the original STEGO code into a stego model."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "convert-official",
        help="convert a checkpoint of the original STEGO code (.ckpt) into a stego model folder",
        description=(
            "Read an original STEGO Lightning checkpoint safely (no code in it can run), map its "
            "DINO backbone, head and probes to stego's names and save a self-contained model "
            "folder (backbone weights included) usable by `stego predict` and `stego eval`."
        ),
    )
    parser.add_argument(
        "checkpoint",
        type=Path,
        metavar="CKPT",
        help="the original's checkpoint, e.g. cocostuff27_vit_base_5.ckpt",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="output model folder (config.json + model.safetensors)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        metavar="NAME",
        help="dataset whose class names / colours to attach (default: the "
        "checkpoint's dataset_name, e.g. cocostuff27, cityscapes, potsdam)",
    )
    parser.add_argument(
        "--backbone",
        default=None,
        metavar="NAME",
        help="registry backbone the ViT weights are loaded into (default: from the "
        "checkpoint's model_type and dino_patch_size, e.g. dino-vitb8)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stego.models.convert_official import convert_official

    out = convert_official(
        args.checkpoint, args.out, dataset=args.dataset, backbone=args.backbone, log=print
    )
    print(f"converted {args.checkpoint} -> {out}")
    return 0
