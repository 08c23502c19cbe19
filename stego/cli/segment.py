"""``stego segment DIR --clusters K [--out OUT]``: the main job, on a folder of unlabeled images."""

from __future__ import annotations

import argparse

from stego.cli.features import add_process_arguments, launch_processes


def register(sub: argparse._SubParsersAction) -> None:
    from stego.segment import MAX_STEPS

    parser = sub.add_parser(
        "segment",
        help="segment a folder of unlabeled images into K kinds of things (the whole method)",
        description="Train STEGO on a folder of images without labels and segment every image: "
        "writes OUT/labels/ (cluster ids), OUT/overlays/, OUT/model/, OUT/contact_sheet.png and "
        "OUT/summary.json. Rerun the same command to continue an interrupted run.",
    )
    parser.add_argument("input", help="folder of images (nested folders and any Pillow format)")
    parser.add_argument(
        "--clusters",
        "-k",
        type=int,
        default=None,
        help="how many kinds of things to find (e.g. 5-30); with --labels, how many clusters "
        "to find before naming them (default 44: naming works best with more clusters than "
        "classes)",
    )
    parser.add_argument(
        "--labels",
        default=None,
        help="folder of label PNGs for some of the images (same relative path and stem, .png; "
        "class id per pixel, 255 = void) and classes.txt (one class name a line, line i = id "
        "i): OUT/labels/ then hold class ids for every image (cluster ids in OUT/clusters/), "
        "predicted by a classifier fit on the labelled pixels (see --naming)",
    )
    parser.add_argument(
        "--naming",
        choices=("classifier", "majority"),
        default="classifier",
        help="with --labels, how classes are given: classifier (default) fits a logistic "
        "regression on the labelled pixels' codes and backbone features and predicts every "
        "pixel with it (better from ~5 labelled images on); majority names each cluster after "
        "its labelled pixels' majority class, as `stego name --labels` does",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: ./NAME-segments in the current folder, NAME = the "
        "input folder's name)",
    )
    parser.add_argument(
        "--backbone",
        default=None,
        help="frozen backbone (default: the architecture of --weights; else the first real "
        "DINOv2 / DINO whose weights are in the Hugging Face cache; else the offline "
        "imgfocus-saliency-vits14, a saliency-tuned ViT-S/14 that is good at figure/ground and "
        "weak at semantic classes)",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="a local checkpoint of the backbone (.pth or .safetensors, e.g. the official "
        "dinov2_vits14_pretrain.pth); its architecture is read from the file unless --backbone "
        "names it",
    )
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="backbone block to read features from (default: last; 10 for the saliency-tuned "
        "offline backbone, which segments better from its middle blocks)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps (default: from the folder size, at most {MAX_STEPS})",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="training resolution (default 224, rounded to the patch size)",
    )
    parser.add_argument(
        "--five-crop",
        choices=("auto", "yes", "no"),
        default="auto",
        help="train on the 4 corners + centre of each image (default: yes for "
        "folders under 500 images)",
    )
    parser.add_argument(
        "--crf",
        action="store_true",
        help="sharpen predictions with a dense CRF (slower; needs stego-seg[crf])",
    )
    parser.add_argument(
        "--method",
        choices=("stego", "cause"),
        default="stego",
        help="training method: stego (default) or cause (CAUSE: a concept clusterbook, then a "
        "head trained against its EMA teacher)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (results are repeatable)")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable images (listed in summary.json) instead of failing",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device of the feature extraction and prediction, e.g. cuda, cpu (default: "
        "cuda if available; training picks its own, as `stego train --accelerator auto`)",
    )
    add_process_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--verbose", action="store_true", help="also show what the libraries print (Lightning)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from stego.segment import default_out_dir, segment_folder

    # --devices N: every process extracts and predicts a share; training runs in the first
    # while the others wait for it: up to 4 h (a large folder on a CPU), not Lightning's 30 min
    group = launch_processes(args, wait=timedelta(hours=4))
    five = {"auto": None, "yes": True, "no": False}[args.five_crop]
    summary = segment_folder(
        args.input,
        args.out or default_out_dir(args.input),
        clusters=args.clusters,
        labels=args.labels,
        backbone=args.backbone,
        weights=args.weights,
        layer=args.layer,
        steps=args.steps,
        resolution=args.resolution,
        five_crop=five,
        crf=args.crf,
        seed=args.seed,
        skip_bad=args.skip_bad,
        progress=not args.quiet,
        verbose=args.verbose,
        method=args.method,
        group=group,
        naming=args.naming,
    )
    if not group.main:
        return 0
    out = summary["outputs"]
    print(f"segmented {summary['n_images']} images in {summary['total_seconds']:.0f} s")
    print(f"  labels:        {out['labels']}")
    if "clusters" in out:
        print(f"  clusters:      {out['clusters']}  (classes: {', '.join(summary['classes'])})")
    print(f"  overlays:      {out['overlays']}")
    print(f"  contact sheet: {out['contact_sheet']}")
    print(f"  model:         {out['model']}  (stego predict --checkpoint {out['model']} ...)")
    if summary.get("images_to_label"):  # label these first to name the clusters (--labels)
        print(f"  label next:    {', '.join(summary['images_to_label'])}")
    print(f"  {summary['backbone']}")
    return 0
