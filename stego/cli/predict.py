"""``stego predict``: label maps and colour overlays for image files and folders."""

from __future__ import annotations

import argparse
from pathlib import Path

from stego.cli.features import add_process_arguments, launch_processes


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "predict",
        help="predict label maps and overlays for image files / folders with a trained model",
        description=(
            "Predict every image (recursively, any Pillow format, each at its own size) and write "
            "OUT/labels/<path>.png (uint8 ids), OUT/overlays/<path>.png, OUT/clusters.json "
            "(legend) and OUT/skipped.txt. Rerunning the same command resumes: finished images "
            "are skipped."
        ),
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGES_OR_DIRS",
        help="image files and/or folders (searched recursively)",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="model folder (config.json + model.safetensors), a run folder whose "
        "model/ holds the final model, a hub id owner/name, or a checkpoint file of the "
        "original STEGO code (.ckpt, read safely and converted in memory)",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument(
        "--crf",
        action="store_true",
        help="sharpen predictions with the dense CRF (slow: ~1 s per image per core)",
    )
    parser.add_argument(
        "--crf-workers",
        type=int,
        default=None,
        metavar="N",
        help="CRF worker processes (default: all CPUs; 1 = serial)",
    )
    parser.add_argument(
        "--no-flip",
        dest="flip",
        action="store_false",
        help="skip the horizontal-flip averaging (2x faster, slightly noisier)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="images per forward pass; images whose network inputs pad to one size share "
        "batches even when their own sizes differ",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="list unreadable images in OUT/skipped.txt instead of stopping",
    )
    parser.add_argument(
        "--probe",
        choices=("class", "cluster", "linear"),
        default=None,
        help="class: class ids of named clusters (the default once `stego name` named them); "
        "cluster: unsupervised cluster ids (the default before); linear: class ids from the "
        "supervised linear probe, when the model has one",
    )
    parser.add_argument(
        "--max-side",
        type=int,
        default=1024,
        help="downscale images whose shorter side exceeds this for the network and "
        "upsample the prediction back (0 = always native size; memory grows "
        "with the square of the pixel count)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="image-decoding worker processes per device (default: CPUs - 1, at most 4; "
        "0 = decode in the main process)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    add_process_arguments(parser)
    parser.set_defaults(func=run)


def resolve_model_dir(path: str) -> str:
    """A model folder as given, or ``<run>/model`` when ``path`` is a training run folder."""
    local = Path(path)
    if not (local / "config.json").is_file() and (local / "model" / "config.json").is_file():
        return str(local / "model")
    return path


def run(args: argparse.Namespace) -> int:
    from stego.infer.predict import predict_paths
    from stego.models.pretrained import load

    group = launch_processes(args)
    device = group.device
    if Path(args.checkpoint).is_file():  # model folders are folders: a file is an original .ckpt
        from stego.models.convert_official import load_official

        print(
            f"reading {args.checkpoint} as an original STEGO checkpoint "
            "(`stego convert-official` saves the conversion once)"
        )
        model = load_official(args.checkpoint, log=print).model.to(device)
    else:
        model = load(resolve_model_dir(args.checkpoint), device=device)
    summary = predict_paths(
        model,
        args.inputs,
        args.out,
        crf=args.crf,
        crf_workers=args.crf_workers,
        flip=args.flip,
        batch_size=args.batch_size,
        device=device,
        skip_bad=args.skip_bad,
        progress=not args.quiet and group.main,
        probe=args.probe,
        max_side=args.max_side or None,
        num_workers=args.workers,
        group=group,
    )
    if not group.main:
        return 0
    print(
        f"predicted {len(summary.written)} images ({summary.images_per_second:.2f} images/s), "
        f"{len(summary.existing)} already done, {len(summary.skipped)} skipped -> {args.out}"
    )
    if summary.skipped:
        print(f"unreadable images are listed in {args.out / 'skipped.txt'}")
    return 0
