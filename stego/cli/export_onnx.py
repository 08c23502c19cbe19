"""``stego export-onnx``: export a trained model to ONNX (head only, or with the backbone)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export-onnx",
        help="export the head (+ cluster probe), optionally with the backbone, to ONNX",
        description=(
            "Export a trained model to ONNX and check it with onnxruntime against PyTorch. Head "
            "only: input features (B, C, h, w). With --with-backbone: input images (B, 3, H, W) "
            "in [0, 1] at the fixed --height x --width. Outputs: code and cluster_log_probs."
        ),
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="model folder, or a run folder whose model/ holds the final model",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="FILE", help="output .onnx file")
    parser.add_argument(
        "--with-backbone",
        action="store_true",
        help="include the frozen backbone (input: images instead of features)",
    )
    parser.add_argument(
        "--height",
        type=int,
        default=224,
        help="image height the graph is built for (features: height // patch)",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=224,
        help="image width the graph is built for (features: width // patch)",
    )
    parser.add_argument(
        "--flip",
        action="store_true",
        help="with --with-backbone: average with the horizontal flip as `stego "
        "predict` does (2x slower)",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stego.cli.predict import resolve_model_dir
    from stego.infer.onnx import export_onnx
    from stego.models.pretrained import load

    model = load(resolve_model_dir(args.checkpoint))
    diff = export_onnx(
        model,
        args.out,
        include_backbone=args.with_backbone,
        height=args.height,
        width=args.width,
        opset=args.opset,
        flip=args.flip,
    )
    print(f"wrote {args.out} (onnxruntime vs PyTorch max abs diff {diff:.2e})")
    return 0
