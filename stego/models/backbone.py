"""Frozen ViT backbones and the features STEGO uses.

A registry name (``dino-vitb8``, :mod:`stego.models.registry`) maps to a timm architecture;
:mod:`stego.models.weights` builds it with its weights. :class:`Backbone` wraps the timm model:
sizes (width, patch, heads, depth) are read from it; it takes un-normalised images in [0, 1],
normalises them with the model's own mean/std, and returns the patch tokens of one block after
the final norm, optionally the attention keys of that block, and a global descriptor.
"""

from __future__ import annotations

import functools
import types
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stego.errors import StegoError
from stego.models.registry import BACKBONES, BackboneSpec, list_backbones
from stego.models.weights import (
    create_model,
    load_state,
    read_weights_file,
    weights_available,
    weights_digest,
)

# Registry and weight-source names are re-exported so that code importing them from here (or
# from the 0.1 path ``stego.backbones``) keeps working; they are defined in registry / weights.
__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "Backbone",
    "BackboneOutput",
    "build_backbone",
    "list_backbones",
    "resize_pos_grid",
    "load_state",
    "read_weights_file",
    "weights_available",
    "weights_digest",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneOutput(NamedTuple):
    """Features of one block; ``h, w = H / patch, W / patch``."""

    feat: Tensor  # (B, C, h, w) patch tokens after the final norm
    keys: Tensor | None  # (B, heads*head_dim, h, w) attention keys, when asked for
    global_feat: Tensor  # (B, C) mean of feat over patches, L2-normalised


def _nearest_multiples(size: int, patch: int) -> str:
    lower, upper = (size // patch) * patch, (size // patch + 1) * patch
    return f"{lower} or {upper}" if lower > 0 else f"{upper}"


def _attention_keys(attn: Any, x: Tensor) -> Tensor:
    """Keys of a timm attention module for normalised tokens ``x`` (B, N, D) -> (B, N, heads*hd)."""
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    width = heads * head_dim
    qkv = getattr(attn, "qkv", None)
    if qkv is not None:
        weight = qkv.weight[width : 2 * width]
        bias = qkv.bias[width : 2 * width] if qkv.bias is not None else None
        k_bias = getattr(attn, "k_bias", None)  # EVA / DINOv3 keep q/k/v biases apart
        if k_bias is not None:
            bias = k_bias if bias is None else bias + k_bias
        k = F.linear(x, weight, bias)  # (B, N, heads*hd)
    elif getattr(attn, "k_proj", None) is not None:
        k = attn.k_proj(x)
    else:
        raise StegoError(f"cannot find the key projection in {type(attn).__name__}")
    k_norm = getattr(attn, "k_norm", None)
    if k_norm is not None and not isinstance(k_norm, nn.Identity):
        B, N, _ = k.shape
        k = k_norm(k.reshape(B, N, heads, head_dim)).reshape(B, N, width)
    return k


def resize_pos_grid(grid: Tensor, size: tuple[int, int], rule: str = "size") -> Tensor:
    """Resize a position-embedding grid (1, D, gh, gw) -> (1, D, h, w), bicubic, no antialias.

    ``"size"``: to the target size, as the DINOv2 reference code and the Hugging Face port do.
    ``"dino"``: DINO v1's rule, by the scale factor ``(h + 0.1) / gh`` (and the same for width;
    the 0.1 keeps the floored output size from falling one short), so source positions are
    ``(i + 0.5) * gh / (h + 0.1) - 0.5`` instead of ``(i + 0.5) * gh / h - 0.5``: a different grid
    whenever the size changes (codes of the original STEGO differ by up to 0.085 otherwise).
    """
    h, w = size
    if rule == "dino":
        gh, gw = grid.shape[-2:]
        scale = ((h + 0.1) / gh, (w + 0.1) / gw)
        out = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    elif rule == "size":
        out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    else:
        raise StegoError(f"unknown position-embedding rule {rule!r}; choose 'size' or 'dino'")
    if tuple(out.shape[-2:]) != (h, w):
        raise StegoError(f"position grid resized to {tuple(out.shape[-2:])}, not {(h, w)}")
    return out


def _reference_pos_embed(self: Any, x: Tensor, rule: str = "size") -> Tensor:
    """Stand-in for timm ``VisionTransformer._pos_embed`` (bound to one model instance).

    Same token layout as timm, but the position grid is resized like the reference code
    (:func:`resize_pos_grid` with ``rule``): bicubic *without* antialiasing (timm antialiases,
    which shifts features by up to ~0.4 when downsampling the 37x37 DINOv2 grid to 16x16).
    x: (B, h, w, D) patch embeddings -> (B, prefix + h*w, D) tokens.
    """
    B, h, w, D = x.shape
    x = x.reshape(B, h * w, D)
    pos = self.pos_embed  # (1, [prefix +] gh*gw, D)
    n_pos_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
    gh, gw = self.patch_embed.grid_size
    if (h, w) != (gh, gw):
        grid = pos[:, n_pos_prefix:].reshape(1, gh, gw, D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
        grid = resize_pos_grid(grid.float(), (h, w), rule)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, D).to(pos.dtype)  # (1, h*w, D)
        pos = torch.cat([pos[:, :n_pos_prefix], grid], dim=1)
    prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
    if self.no_embed_class:
        x = torch.cat([*prefix, x + pos], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1) + pos
    return self.pos_drop(x)


def _use_reference_pos_embed(model: Any, rule: str = "size") -> None:
    """Make a timm ViT with absolute position embeddings resize them like DINO / DINOv2 do."""
    from timm.models.vision_transformer import VisionTransformer

    vit = isinstance(model, VisionTransformer)
    if vit and model.pos_embed is not None and model.dynamic_img_size:
        bound = functools.partial(_reference_pos_embed, rule=rule)
        model._pos_embed = types.MethodType(bound, model)
        model.stego_pos_embed_rule = rule


class Backbone(nn.Module):
    """A frozen timm ViT that always stays in eval mode.

    ``forward(images (B,3,H,W) in [0,1], with_keys=False) -> BackboneOutput``; H and W must be
    multiples of ``patch_size``. ``layer`` counts blocks from 1.
    """

    model: Any  # a timm VisionTransformer or Eva
    _mean: Tensor  # (1, 3, 1, 1)
    _std: Tensor  # (1, 3, 1, 1)

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        layer: int | None = None,
        weights_digest: str = "random",
    ) -> None:
        super().__init__()
        spec = BACKBONES.get(name)
        _use_reference_pos_embed(model, spec.pos_embed if spec is not None else "size")
        self.model = model
        vit: Any = model
        self.name = name
        patch = vit.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.embed_dim = int(vit.embed_dim)
        self.num_blocks = len(vit.blocks)
        self.num_heads = int(vit.blocks[0].attn.num_heads)
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 1))
        if layer is None:
            layer = self.num_blocks
        if not 1 <= layer <= self.num_blocks:
            raise StegoError(
                f"layer {layer} is out of range for {name}: it has {self.num_blocks} blocks; "
                f"choose a layer from 1 to {self.num_blocks} (or None for the last)"
            )
        self.layer = int(layer)
        self.weights_digest = weights_digest
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Backbone:
        """Ignore ``mode``: the backbone is frozen and stays in eval (no dropout, fixed norms)."""
        return super().train(False)

    def check_size(self, height: int, width: int) -> None:
        """Raise :class:`StegoError` unless both sides are multiples of the patch size."""
        p = self.patch_size
        for side, size in (("height", height), ("width", width)):
            if size % p or size <= 0:
                raise StegoError(
                    f"{side} {size} is not a multiple of the patch size {p} of {self.name}; "
                    f"resize or pad to {_nearest_multiples(size, p)}"
                )

    @torch.no_grad()
    def forward(self, images: Tensor, *, with_keys: bool = False) -> BackboneOutput:
        """images (B, 3, H, W) float in [0, 1], not normalised -> :class:`BackboneOutput`."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise StegoError(
                f"{self.name} expects images of shape (B, 3, H, W), got "
                f"{tuple(images.shape)}; add a batch dimension or convert to RGB"
            )
        if not images.is_floating_point():
            raise StegoError(
                f"{self.name} expects float images in [0, 1], got {images.dtype}; "
                "divide uint8 images by 255"
            )
        B, _, H, W = images.shape
        self.check_size(H, W)
        dtype = self.model.patch_embed.proj.weight.dtype
        x = ((images.to(self._mean.dtype) - self._mean) / self._std).to(dtype)  # (B, 3, H, W)

        captured: list[Tensor] = []
        block = self.model.blocks[self.layer - 1]
        hook = None
        if with_keys:
            hook = block.norm1.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            (feat,) = self.model.forward_intermediates(
                x,
                indices=[self.layer - 1],
                norm=True,
                stop_early=True,
                output_fmt="NCHW",
                intermediates_only=True,
            )  # (B, C, h, w)
        finally:
            if hook is not None:
                hook.remove()
        h, w = H // self.patch_size, W // self.patch_size
        keys = None
        if with_keys:
            tokens = _attention_keys(block.attn, captured[0])  # (B, N, heads*hd)
            tokens = tokens[:, self.num_prefix_tokens :]  # drop class and register tokens
            keys = tokens.transpose(1, 2).reshape(B, -1, h, w)  # (B, heads*hd, h, w)
        global_feat = F.normalize(feat.mean(dim=(2, 3)), dim=1)  # (B, C)
        return BackboneOutput(feat=feat, keys=keys, global_feat=global_feat)

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, patch_size={self.patch_size}, embed_dim={self.embed_dim}, "
            f"layer={self.layer}/{self.num_blocks}, weights={self.weights_digest}"
        )


def build_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    layer: int | None = None,
    pretrained: bool = True,
) -> Backbone:
    """Build a frozen registry backbone.

    ``weights`` (a local .pth / .safetensors) wins over ``pretrained``; ``pretrained=False`` gives
    random init; ``layer`` is the 1-based block whose output is used (None = last).
    """
    model, digest = create_model(name, weights=weights, pretrained=pretrained)
    return Backbone(model, name=name, layer=layer, weights_digest=digest)
