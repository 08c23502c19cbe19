"""Models for evaluation: a run directory, a model directory or a Lightning checkpoint.

:func:`load_for_eval` returns the :class:`~stego.models.segmenter.Segmenter` together with the
training config it came with (the evaluation prepares pixels as the model was trained:
:func:`stego.eval.protocol.evaluate_checkpoint`). Lightning checkpoints are read with
``weights_only=True``, so no code inside a checkpoint is ever executed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stego.errors import StegoError
from stego.models.segmenter import Segmenter

__all__ = ["LoadedModel", "load_for_eval"]


@dataclass
class LoadedModel:
    """A model ready for evaluation, the training config it came with, and its resolved path."""

    model: Segmenter
    config: dict[str, Any] | None
    source: Path


def load_for_eval(checkpoint: str | Path, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a run directory (its final ``model/``), a model directory, or a Lightning ``.ckpt``.

    A run directory without ``model/`` (interrupted run) falls back to
    ``checkpoints/last.ckpt``. Lightning checkpoints are read with ``weights_only=True``: no
    code inside a checkpoint is ever executed.
    """
    from stego.models.pretrained import CONFIG_FILE, load

    path = Path(checkpoint)
    if path.is_file() and path.suffix == ".ckpt":
        return _load_lightning(path, device)
    if (path / CONFIG_FILE).is_file():
        return LoadedModel(load(path, device=device), _model_config(path), path)
    if (path / "model" / CONFIG_FILE).is_file():
        model_dir = path / "model"
        config = _run_config(path) or _model_config(model_dir)
        return LoadedModel(load(model_dir, device=device), config, model_dir)
    if (path / "checkpoints" / "last.ckpt").is_file():
        return _load_lightning(path / "checkpoints" / "last.ckpt", device)
    raise StegoError(
        f"no model at {checkpoint}: pass a run directory (with model/ or checkpoints/last.ckpt), "
        f"a model directory (with {CONFIG_FILE}) or a Lightning .ckpt file"
    )


def _model_config(model_dir: Path) -> dict[str, Any] | None:
    data = json.loads((model_dir / "config.json").read_text())
    config = data.get("train_config")
    return config if isinstance(config, dict) else None


def _run_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else None


def _load_lightning(path: Path, device: str | torch.device) -> LoadedModel:
    """Rebuild the Segmenter of a Lightning checkpoint written by
    :func:`stego.train.trainer.train`."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable or holding pickled code: same answer
        raise StegoError(
            f"cannot read {path} as a weights-only checkpoint ({type(exc).__name__}: {exc}); "
            "evaluate the run's model/ directory instead"
        ) from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise StegoError(f"{path} is not a Lightning checkpoint (no state_dict)")
    model, config = _segmenter_from_state(ckpt["state_dict"], ckpt.get("hyper_parameters") or {})
    return LoadedModel(model.to(device).eval(), config, path)


_INFERENCE_PARTS = ("head", "cluster_probe", "linear_probe")  # StegoModule parts a Segmenter has


def _segmenter_from_state(
    state: dict[str, Tensor], hparams: dict[str, Any]
) -> tuple[Segmenter, dict[str, Any]]:
    """Segmenter from a StegoModule state dict (head.*, cluster_probe.*, linear_probe.*) and its
    hyper-parameters (the run's config dict, as :func:`stego.train.trainer.build_module` saves).
    """
    from stego.config import StegoConfig
    from stego.data import dataset_info
    from stego.models.backbone import build_backbone
    from stego.models.segmenter import SegmenterMeta, build_segmenter

    config = StegoConfig.from_dict(hparams.get("config", hparams), source="checkpoint")
    m = config.model
    with torch.random.fork_rng():  # a random backbone (tests) is rebuilt as training built it
        torch.manual_seed(config.train.seed)
        backbone = build_backbone(m.backbone, weights=m.weights, layer=m.layer)
    own = {k: v for k, v in state.items() if k.split(".")[0] in _INFERENCE_PARTS}
    meta = SegmenterMeta.from_config(
        config,
        dataset_info(config.data.dataset),
        code_dim=int(state["cluster_probe.clusters"].shape[1]),
        n_clusters=int(state["cluster_probe.clusters"].shape[0]),
        n_classes=(
            int(state["linear_probe.conv.weight"].shape[0])
            if "linear_probe.conv.weight" in state
            else None
        ),
        backbone_digest=backbone.weights_digest,
    )
    model = build_segmenter(meta, state=own, backbone=backbone, source="the checkpoint")
    return model, config.to_dict()
