"""``stego.load`` / ``stego.save_pretrained``: the functional forms of
:meth:`Segmenter.from_pretrained` and :meth:`Segmenter.save_pretrained` (format:
:mod:`stego.models.files`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stego.models.files import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE
from stego.models.segmenter import Segmenter

__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "WEIGHTS_FILE", "load", "save_pretrained"]


def save_pretrained(
    model: Segmenter,
    directory: str | Path,
    *,
    train_config: dict[str, Any] | None = None,
    include_backbone: bool = False,
) -> Path:
    """Write ``model`` to ``directory`` (created); returns the directory."""
    return model.save_pretrained(
        directory, train_config=train_config, include_backbone=include_backbone
    )


def load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    backbone_weights: str | Path | None = None,
) -> Segmenter:
    """Rebuild a :class:`Segmenter` saved by :func:`save_pretrained` (local dir or hub id)."""
    return Segmenter.from_pretrained(path, device=device, backbone_weights=backbone_weights)
