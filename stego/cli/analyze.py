"""``stego analyze``: the paper's correspondence analysis (its Fig. 5) on a labelled split."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "analyze",
        help="how well feature (and code) cosine predicts same-class patch pairs, per backbone / "
        "block / resolution (choose settings before training)",
        description=(
            "Correspondence analysis (STEGO paper, Fig. 5): sample pairs of patches from a "
            "labelled split (within and across images; a patch's label is the majority of its "
            "pixels, impure or unlabelled patches dropped), score each pair by the cosine of its "
            "two feature vectors at a backbone block and input resolution, and measure how well "
            "that predicts 'same class' (precision-recall curve, average precision). The "
            "positive rate is the AP of a blind guess. Writes analysis.json, analysis.csv and "
            "pr_curves.png to --out. Choose settings on a training split, not on val."
        ),
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="dataset name (camvid, cityscapes27, cocostuff27, ..., or folder)",
    )
    parser.add_argument(
        "--data-root",
        required=True,
        help="folder holding the dataset (for folder: the image folder)",
    )
    parser.add_argument(
        "--split",
        default="val",
        help="labelled split to analyse (default: val; prefer train to choose "
        "settings, so val stays unseen)",
    )
    parser.add_argument(
        "--label-dir",
        default=None,
        help="label PNG folder, only for --dataset folder (ids 0..n-1, 255 void)",
    )
    parser.add_argument(
        "--classes",
        type=int,
        default=None,
        help="number of classes in --label-dir (only for --dataset folder)",
    )
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=["imgfocus-saliency-vits14"],
        help="registry backbones to compare (default: imgfocus-saliency-vits14)",
    )
    parser.add_argument(
        "--layers",
        nargs="+",
        type=int,
        default=None,
        help="blocks to compare, counted from 1 (default: each backbone's last)",
    )
    parser.add_argument(
        "--resolutions",
        nargs="+",
        type=int,
        default=[224],
        help="input sizes (shorter side, centre-cropped square; multiples of the "
        "patch size; default: 224)",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="also score a trained model's codes (run directory, model directory "
        "or .ckpt), at each resolution",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=60,
        help="images drawn from the split with --seed (default: 60; 0 = all)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=20000,
        help="patch pairs per patch grid (default: 20000; memory grows with it, "
        "AP is stable to about 0.01 from a few thousand)",
    )
    parser.add_argument(
        "--within",
        type=float,
        default=0.5,
        help="share of pairs taken within one image (default: 0.5)",
    )
    parser.add_argument(
        "--min-purity",
        type=float,
        default=0.5,
        help="drop patches whose majority label covers less of them (default: 0.5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of image and pair sampling")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="images per forward pass (default: 8)"
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)"
    )
    parser.add_argument(
        "--out", required=True, help="folder for analysis.json, analysis.csv and pr_curves.png"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stego.errors import StegoError
    from stego.eval.analyze import analyze, write_analysis

    for flag, value in (("--pairs", args.pairs), ("--batch-size", args.batch_size)):
        if value < 1:
            raise StegoError(f"{flag} must be >= 1, got {value}")
    if args.images < 0:
        raise StegoError(f"--images must be >= 0 (0 = all), got {args.images}")
    if not 0.0 <= args.min_purity <= 1.0:
        raise StegoError(f"--min-purity must be in [0, 1], got {args.min_purity}")
    result = analyze(
        args.dataset,
        args.data_root,
        split=args.split,
        backbones=args.backbones,
        layers=args.layers,
        resolutions=args.resolutions,
        checkpoint=args.checkpoint,
        n_images=args.images or None,
        n_pairs=args.pairs,
        min_purity=args.min_purity,
        within_fraction=args.within,
        seed=args.seed,
        label_dir=args.label_dir,
        n_classes=args.classes,
        batch_size=args.batch_size,
        device=args.device,
    )
    paths = write_analysis(result, args.out)
    print(result.table())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
