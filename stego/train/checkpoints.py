"""Checkpoint files of a run: written atomically, and the rules for continuing a run (--resume).

A run folder holds ``config.yaml`` and ``checkpoints/`` (``last.ckpt``, ``step-*.ckpt``,
``best.ckpt``). :func:`check_out_dir` refuses to mix two runs in one folder and to resume with
settings that would change the trajectory (:data:`RESUMABLE_CHANGES` lists those that do not).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.plugins.io import TorchCheckpointIO

from stego.atomic import atomic_write, check_free_space
from stego.config import StegoConfig
from stego.errors import StegoError

__all__ = [
    "AtomicCheckpointIO",
    "RESUMABLE_CHANGES",
    "check_out_dir",
    "config_diffs",
    "remove_stray_temps",
]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file, fsynced, then renamed: ``last.ckpt`` is never torn."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        check_free_space(Path(path).parent, buffer.tell(), "the checkpoint")
        with atomic_write(path) as handle:
            handle.write(buffer.getbuffer())


# Keys that may change between a run and its resumption (they don't change the trajectory).
RESUMABLE_CHANGES = {
    "train.steps",
    "train.devices",
    "train.num_nodes",
    "train.accelerator",
    "train.val_every",
    "train.checkpoint_every",
    "train.log_every",
    "train.figure_every",
    "data.num_workers",
    "train.use_feature_cache",
    "train.kmeans_probe",
}


def check_out_dir(config: StegoConfig, out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None = fresh run); refuses to mix runs."""
    last = out_dir / "checkpoints" / "last.ckpt"
    saved = out_dir / "config.yaml"
    if not resume:
        if last.exists() or saved.exists():
            raise StegoError(
                f"{out_dir} already holds a run; pass --resume to continue it or "
                "choose another --out"
            )
        return None
    if not last.is_file():
        raise StegoError(f"nothing to resume: {last} does not exist; run without --resume")
    diffs = config_diffs(config, saved)
    if diffs:
        raise StegoError(
            f"the config differs from the run in {out_dir} ({'; '.join(diffs)}); "
            "resume with the same settings or start a new --out"
        )
    return last


def config_diffs(config: StegoConfig, saved: Path) -> list[str]:
    """"section.key: old -> new" for each setting of ``config`` that differs from the run config
    saved at ``saved`` (none when the file is missing), except those a resumed run may change
    and "auto" shifts (the saved resolved values are reused)."""
    if not saved.is_file():
        return []
    old = StegoConfig.from_dict(yaml.safe_load(saved.read_text()), source=str(saved)).to_dict()
    new = config.to_dict()
    return [
        f"{s}.{k}: {old[s][k]!r} -> {new[s][k]!r}"
        for s in new
        for k in new[s]
        if old[s][k] != new[s][k] and f"{s}.{k}" not in RESUMABLE_CHANGES and new[s][k] != "auto"
    ]


def remove_stray_temps(out_dir: Path) -> None:
    """Delete half-written checkpoint temp files (a write killed mid-way) of ``out_dir``."""
    for stray in (out_dir / "checkpoints").glob(".*.tmp-*"):
        stray.unlink(missing_ok=True)
