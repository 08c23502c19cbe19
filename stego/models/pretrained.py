"""Save and load trained models as a directory: ``model.safetensors`` + ``config.json``.

No pickle anywhere in the format, so loading a model downloaded from a stranger cannot execute
code. The backbone is stored by name (and weights digest); its weights are included only on
request (``include_backbone=True``), which makes the directory self-contained for offline use.
``config.json`` is written last: a directory without it is an unfinished save and is refused.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from stego.atomic import atomic_write, check_free_space
from stego.errors import StegoError
from stego.models.segmenter import Segmenter, SegmenterMeta

__all__ = ["save_pretrained", "load", "FORMAT_VERSION"]

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_pretrained(
    model: Segmenter,
    directory: str | Path,
    *,
    train_config: dict[str, Any] | None = None,
    include_backbone: bool = False,
) -> Path:
    """Write ``model`` to ``directory`` (created); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in model.state_dict().items()
        if include_backbone or not name.startswith("backbone.")
    }
    data = _safetensors_bytes(state)
    check_free_space(directory, len(data), "the model")
    with atomic_write(directory / WEIGHTS_FILE) as handle:
        handle.write(data)
    meta = model.meta
    meta.backbone_digest = str(getattr(model.backbone, "weights_digest", ""))
    config = {
        "format": "stego",
        "format_version": FORMAT_VERSION,
        "meta": meta.to_dict(),
        "includes_backbone": include_backbone,
        "train_config": train_config,
    }
    with atomic_write(directory / CONFIG_FILE, "w") as handle:
        json.dump(config, handle, indent=2)
    return directory


def _safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(state)


def _resolve(path: str | Path) -> Path:
    local = Path(path)
    if local.is_dir():
        return local
    if local.suffix or local.exists() or str(path).count("/") != 1:
        raise StegoError(
            f"no stego model directory at {path}: expected a folder with {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} (written by `stego train` or `stego.save_pretrained`)"
        )
    try:  # an "owner/name" id on the Hugging Face hub
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id=str(path), allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])
        )
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise StegoError(
            f"could not find a local model directory {path} nor fetch it from the hub ({exc}); "
            "download it first or pass a local path"
        ) from exc


def load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    backbone_weights: str | Path | None = None,
) -> Segmenter:
    """Rebuild a :class:`Segmenter` saved by :func:`save_pretrained` (local dir or hub id)."""
    from stego.models.backbone import build_backbone
    from stego.models.heads import SegmentationHead
    from stego.models.probes import ClusterProbe, LinearProbe

    directory = _resolve(path)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise StegoError(
            f"{directory} has no {CONFIG_FILE}: the save was interrupted or this is not a stego "
            "model; save it again"
        )
    try:
        config = json.loads(config_path.read_text())
        meta = SegmenterMeta.from_dict(config["meta"])
    except (ValueError, KeyError, TypeError) as exc:  # JSON / UTF-8 errors are ValueErrors
        raise StegoError(f"{config_path} is not a valid stego model config ({exc})") from exc
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise StegoError(
            f"{directory} was saved by a newer stego (format {config['format_version']}); "
            "upgrade stego-seg"
        )
    try:
        state = load_file(str(directory / WEIGHTS_FILE))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise StegoError(
            f"{directory / WEIGHTS_FILE} is not a readable safetensors file ({exc}); "
            "download or save the model again"
        ) from exc
    included = bool(config.get("includes_backbone"))
    if included:  # weights come from model.safetensors below
        backbone = build_backbone(meta.backbone, layer=meta.backbone_layer, pretrained=False)
    else:
        backbone = build_backbone(
            meta.backbone, weights=backbone_weights, layer=meta.backbone_layer
        )
    head = SegmentationHead(backbone.embed_dim, meta.code_dim, kind=meta.head_kind)
    cluster = ClusterProbe(
        meta.code_dim if meta.head_kind != "none" else backbone.embed_dim, meta.n_clusters
    )
    linear = None
    if meta.n_classes and any(k.startswith("linear_probe.") for k in state):
        linear = LinearProbe(cluster.clusters.shape[1], meta.n_classes)
    model = Segmenter(backbone, head, cluster, linear, meta)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise StegoError(
            f"{directory / WEIGHTS_FILE} does not match its config ({exc}); save the model again"
        ) from exc
    missing = [k for k in missing if included or not k.startswith("backbone.")]
    if missing or unexpected:
        raise StegoError(
            f"{directory / WEIGHTS_FILE} does not match its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    digest = getattr(backbone, "weights_digest", "")
    if meta.backbone_digest and digest and digest != meta.backbone_digest and not included:
        warnings.warn(
            f"backbone weights differ from the ones this model was trained with "
            f"({digest} != {meta.backbone_digest}); predictions may be poor",
            stacklevel=2,
        )
    return model.to(device).eval()
