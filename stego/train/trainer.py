"""``train``: the public entry of training, and the Lightning trainer it runs.

The pieces live beside it: :mod:`stego.train.module` (the LightningModule and its step),
:mod:`stego.train.datamodule` (pairs, samplers, feature cache and neighbour table),
:mod:`stego.train.checkpoints` (atomic checkpoints, resume policy), :mod:`stego.train.refit`
(auto shifts, k-means probe refit, the saved model) and :mod:`stego.train.console` (what is
shown). :func:`build_module` picks the LightningModule of ``model.method``
(:mod:`stego.train.cause_module` for CAUSE). ``StegoModule``, ``StegoDataModule`` and
``AtomicCheckpointIO`` are re-exported here: code written for ``stego.training`` imports them
from this module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from stego.config import StegoConfig
from stego.device import cuda_available
from stego.errors import StegoError
from stego.train.checkpoints import AtomicCheckpointIO, check_out_dir, remove_stray_temps
from stego.train.datamodule import StegoDataModule, build_datamodule
from stego.train.module import StegoModule, build_stego_module, n_clusters_of
from stego.train.refit import auto_shifts, cause_clusterbook, kmeans_probe, save_model

__all__ = [
    "StegoModule",
    "StegoDataModule",
    "AtomicCheckpointIO",
    "build_module",
    "build_trainer",
    "n_clusters_of",
    "env_rank",
    "train",
]


def build_module(
    config: StegoConfig,
    backbone: Any,
    n_classes: int | None,
    palette: Any = None,
    *,
    concepts: Any = None,
) -> L.LightningModule:
    """The LightningModule of ``config.model.method``: a :class:`StegoModule`, or a
    :class:`stego.train.cause_module.CauseModule` on the clusterbook ``concepts`` (K, C)."""
    if config.model.method == "stego":
        return build_stego_module(config, backbone, n_classes, palette)
    from stego.train.cause_module import build_cause_module

    if concepts is None:
        raise StegoError("model.method cause needs the clusterbook: pass concepts=")
    return build_cause_module(
        config, backbone, n_clusters_of(config, n_classes), n_classes, concepts, palette
    )


def env_rank() -> int:
    """Global rank of this process before Lightning starts (DDP children inherit env vars)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def build_trainer(
    config: StegoConfig, out_dir: Path, has_val: bool, progress: bool, verbose: bool
) -> L.Trainer:
    """The Lightning trainer of ``config``: checkpoints every ``train.checkpoint_every`` steps
    (+ ``last``, + ``best`` by validation cluster mIoU), TensorBoard and CSV logs, DDP when
    ``devices x num_nodes > 1``, atomic checkpoint writes, no sampler of Lightning's own (the
    step-indexed samplers shard the data)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = config.train
    ckpt_dir = out_dir / "checkpoints"
    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step-{step:06d}",
            every_n_train_steps=t.checkpoint_every or t.steps,
            save_top_k=-1,
            save_last=True,
            save_on_train_epoch_end=False,
            auto_insert_metric_name=False,
        )
    ]
    if has_val and t.val_every:
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="best",
                monitor="val/cluster_miou",
                mode="max",
                save_top_k=1,
                auto_insert_metric_name=False,
            )
        )
    if progress and not verbose:  # verbose: Lightning's own bar instead
        from stego.train.console import step_progress

        callbacks.append(step_progress(t.steps))
    world = t.devices * t.num_nodes
    return L.Trainer(
        max_steps=t.steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy="ddp" if world > 1 else "auto",
        precision=t.precision,  # type: ignore[arg-type]
        logger=[
            TensorBoardLogger(out_dir, name="logs", version="tensorboard"),
            CSVLogger(out_dir, name="logs", version="csv"),
        ],
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=out_dir,
        val_check_interval=t.val_every if (has_val and t.val_every) else None,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if (has_val and t.val_every) else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, t.log_every),
        enable_progress_bar=progress and verbose,
        enable_model_summary=verbose,
        use_distributed_sampler=False,
        deterministic="warn" if cuda_available() else True,
    )


def train(
    config: StegoConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    verbose: bool = False,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Train a head and probes as ``config`` says (``model.method``: STEGO's loss, or CAUSE's
    clusterbook, fitted or reused first, and contrastive loss); outputs go to ``out_dir``.

    Writes ``config.yaml``, ``checkpoints/`` (``last.ckpt``, one every
    ``train.checkpoint_every`` steps, ``best.ckpt`` by validation cluster mIoU), ``logs/``
    (TensorBoard, CSV) and the final inference model in ``model/``. ``resume=True`` continues
    from ``checkpoints/last.ckpt`` and reaches the weights an uninterrupted run would.
    ``progress``: one bar per stage and a line per artefact; ``verbose``: also Lightning's own
    banners, notices and progress bar (hidden by default, see
    :func:`stego.train.console.quiet_libraries`); ``log`` shows the chosen loss shifts and the
    probe refit (also without ``progress``, as ``stego train --quiet`` does; None: silent).
    """
    from stego.train.console import quiet_libraries

    with quiet_libraries(verbose):
        return _train(config, out_dir, resume=resume, progress=progress, verbose=verbose, log=log)


def _train(
    config: StegoConfig,
    out_dir: str | Path,
    *,
    resume: bool,
    progress: bool,
    verbose: bool,
    log: Callable[[str], None] | None,
) -> Path:
    from stego.models.backbone import build_backbone

    config.validate()
    out_dir = Path(out_dir).expanduser()
    rank0 = env_rank() == 0
    say = log if rank0 else None
    ckpt = (
        check_out_dir(config, out_dir, resume)
        if rank0
        else (out_dir / "checkpoints" / "last.ckpt" if resume else None)
    )
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    m = config.model
    backbone = build_backbone(m.backbone, weights=m.weights, layer=m.layer)
    data, info = build_datamodule(config, backbone, progress and rank0)
    auto_shifts(
        config,
        data,
        backbone,
        info.n_classes,
        out_dir if resume else None,
        log=say,
    )
    concepts = None
    if config.model.method == "cause":
        n_clusters = n_clusters_of(config, info.n_classes)
        concepts = cause_clusterbook(config, data, backbone, n_clusters, progress and rank0, say)
    # Reseed: building a table or cache draws from the global RNG, the initial weights must not
    # depend on whether it was built in this run.
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    palette = info.palette.tolist() or None
    module = build_module(config, backbone, info.n_classes, palette, concepts=concepts)
    if rank0:
        config.save(out_dir / "config.yaml")
        remove_stray_temps(out_dir)
        if ckpt is not None:
            from stego.train.console import keep_csv_log

            keep_csv_log(out_dir / "logs" / "csv")
    trainer = build_trainer(config, out_dir, data.val is not None, progress and rank0, verbose)
    # Our own checkpoints hold tensors and plain containers only: resume without unpickling code.
    trainer.fit(module, datamodule=data, ckpt_path=ckpt, weights_only=True)
    if config.train.kmeans_probe:
        kmeans_probe(module, data, backbone, config, log=say)
    # A SAVE, not a load: weights_only=False writes the full training state (optimiser, loops)
    # that --resume needs, not only the weights.
    trainer.save_checkpoint(out_dir / "checkpoints" / "last.ckpt", weights_only=False)
    if trainer.is_global_zero:
        save_model(module, backbone, config, info, out_dir / "model")
    return out_dir
