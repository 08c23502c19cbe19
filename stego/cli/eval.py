"""``stego eval``: the paper's evaluation protocol on a labelled split (Hungarian matching)."""

from __future__ import annotations

import argparse

from stego.cli.features import add_process_arguments, launch_processes


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="score a trained model on a labelled split (cluster + linear probe, accuracy / mIoU)",
        description=(
            "Evaluate a trained model with the paper's protocol: resize the shorter side to "
            "--resolution and centre-crop, average the code with the flipped image, optional "
            "dense CRF, one confusion matrix over the split, Hungarian matching. Writes "
            "metrics.json, confusion.png, iou.png and examples.png to --out."
        ),
    )
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (uses its model/), model directory, or Lightning .ckpt")
    parser.add_argument("--data-root", required=True,
                        help="folder holding the dataset (as for `stego train`)")
    parser.add_argument("--split", default="val",
                        help="split to score (default: val); never select checkpoints on it")
    parser.add_argument("--out", required=True, help="folder for metrics.json and the figures")
    parser.add_argument("--dataset", default=None,
                        help="dataset name (default: the one the model was trained on); "
                        "its class names define the classes scored")
    parser.add_argument("--label-dir", default=None,
                        help="label PNG folder, only for --dataset folder (ids 0..n-1, 255 void)")
    parser.add_argument("--crf", action="store_true",
                        help="refine predictions with the dense CRF (the paper's headline numbers "
                        "use it; slow: a few images per second per CPU core)")
    parser.add_argument("--crf-workers", type=int, default=None,
                        help="CRF worker processes (default: all CPUs; 1 = in this process)")
    parser.add_argument("--no-flip", dest="flip", action="store_false",
                        help="skip averaging the code with the horizontal flip (2x faster, "
                        "usually slightly lower scores)")
    parser.add_argument("--full-frame", action="store_true",
                        help="score the whole resized image instead of the paper's central square")
    parser.add_argument("--resolution", type=int, default=320,
                        help="shorter side after resizing (default: 320, the paper's)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per forward pass (default: 8); lower it if memory runs out")
    parser.add_argument("--device", default="cpu",
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--report", action="store_true",
                        help="also write a static HTML report (report.html) to --out")
    parser.add_argument("--metric-rule", choices=("strict", "original"), default="strict",
                        help="strict (default): pixels of unmatched extra clusters are errors; "
                        "original: drop them as the original code did (only to compare numbers)")
    parser.add_argument("--examples", type=int, default=8,
                        help="how many images to keep for the example figures (default: 8)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bar (e.g. in logs)")
    add_process_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stego.errors import StegoError
    from stego.eval.protocol import evaluate_checkpoint
    from stego.eval.report import write_report

    for flag, value in (("--resolution", args.resolution), ("--batch-size", args.batch_size)):
        if value < 1:
            raise StegoError(f"{flag} must be >= 1, got {value}")
    if args.examples < 0:
        raise StegoError(f"--examples must be >= 0, got {args.examples}")
    group = launch_processes(args)
    evaluate_checkpoint(
        args.checkpoint,
        args.data_root,
        out=args.out,
        dataset=args.dataset,
        split=args.split,
        label_dir=args.label_dir,
        crf=args.crf,
        crf_workers=args.crf_workers,
        flip=args.flip,
        full_frame=args.full_frame,
        resolution=args.resolution,
        batch_size=args.batch_size,
        device=group.device,
        rule=args.metric_rule,
        progress=args.progress,
        n_figure_images=args.examples,
        echo=print if group.main else None,
        group=group,
    )
    if args.report and group.main:
        print(f"report: {write_report(args.out)}")
    return 0
