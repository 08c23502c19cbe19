"""The on-disk format of a trained model: a directory with ``model.safetensors`` + ``config.json``.

No pickle anywhere in the format, so loading a model downloaded from a stranger cannot execute
code. The backbone is stored by name (and weights digest); its weights are included only on
request, which makes the directory self-contained for offline use. ``config.json`` is written
last: a directory without it is an unfinished save and is refused. This module reads and writes
plain dicts; :class:`stego.models.segmenter.Segmenter` turns them into a model and back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from stego.atomic import atomic_write, check_free_space
from stego.errors import StegoError

__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "WEIGHTS_FILE", "read_model_dir", "write_model_dir"]

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def write_model_dir(
    directory: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any]
) -> Path:
    """Write ``state`` (name -> tensor) and ``config`` (JSON-able) to ``directory``; returns it.

    The weights go first and the config last, each atomically, so a crash never leaves a
    directory that looks complete.
    """
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = save({k: v.detach().cpu().contiguous() for k, v in state.items()})
    check_free_space(directory, len(data), "the model")
    with atomic_write(directory / WEIGHTS_FILE) as handle:
        handle.write(data)
    config = {"format": "stego", "format_version": FORMAT_VERSION, **config}
    with atomic_write(directory / CONFIG_FILE, "w") as handle:
        json.dump(config, handle, indent=2)
    return directory


def read_model_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """The config dict, the weights and the resolved directory of a saved model.

    ``path`` is a local directory or an ``owner/name`` id on the Hugging Face hub.
    """
    directory = _resolve(path)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise StegoError(
            f"{directory} has no {CONFIG_FILE}: the save was interrupted or this is not a stego "
            "model; save it again"
        )
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict) or not isinstance(config["meta"], dict):
            raise TypeError("no meta section")
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
    return config, state, directory


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
