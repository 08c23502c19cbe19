"""Training STEGO with Lightning: a thin module (the step reads like the algorithm) and ``train``.

Every random draw of a step comes from generators seeded by (seed, global step, rank): sampling
coordinates (drawn for the GLOBAL batch, each rank taking its slice), derangements and dropout
masks. With the step-indexed data order of :mod:`stego.train.pairs`, a resumed run replays the
uninterrupted one exactly, and the cached-feature and live-backbone paths see the same draws.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from stego.atomic import atomic_write, check_free_space
from stego.config import StegoConfig
from stego.errors import StegoError
from stego.eval.metrics import UnsupervisedMetrics
from stego.train.pairs import (
    CachedPairDataset,
    LivePairDataset,
    ShardSampler,
    StepSampler,
    artifact_root,
    cache_complete,
    feature_cache,
    mix_seed,
    neighbor_table,
    open_split,
    split_holdout,
    usable_workers,
)

__all__ = ["StegoModule", "StegoDataModule", "AtomicCheckpointIO", "build_module", "train"]

_COORDS, _PERMS, _DROPOUT = 1, 2, 3  # stream ids of the per-step generators


def step_generator(seed: int, step: int, stream: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for one (seed, step, stream, rank): exact replay on resume."""
    return torch.Generator().manual_seed(mix_seed(seed, step, stream, rank))


class StegoModule(L.LightningModule):
    """Head + probes trained with the STEGO loss on frozen features.

    Args:
        head: :class:`stego.models.heads.SegmentationHead` (trained).
        loss: :class:`stego.losses.StegoLoss`.
        cluster_probe: :class:`stego.models.probes.ClusterProbe` (trained on detached codes).
        linear_probe: :class:`stego.models.probes.LinearProbe` or None (needs labels).
        backbone: frozen :class:`stego.models.backbone.Backbone`; kept out of the state dict (it is
            not trained, and checkpoints stay small). Needed for image batches and validation.
        lr, probe_lr: Adam learning rates of the head and of the probes.
        seed: run seed for the per-step generators.
        global_batch: images per step over all processes (coordinates are drawn for all).
        n_classes, extra_clusters: for the validation metrics (n_classes None = no metrics).
        run_config: the resolved config dict, stored in checkpoints (not read here).
        linear_probe_upsample: cap of the linear probe's loss resolution (see
            :meth:`stego.models.probes.LinearProbe.loss`); 0 = label size.
    """

    def __init__(
        self,
        *,
        head: nn.Module,
        loss: nn.Module,
        cluster_probe: nn.Module,
        linear_probe: nn.Module | None,
        backbone: nn.Module | None,
        lr: float,
        probe_lr: float,
        seed: int,
        global_batch: int,
        n_classes: int | None = None,
        extra_clusters: int = 0,
        figure_every: int = 0,
        palette: Any = None,
        run_config: dict[str, Any] | None = None,
        linear_probe_upsample: int = 0,
    ) -> None:
        super().__init__()
        self.head, self.loss, self.cluster_probe = head, loss, cluster_probe
        self.linear_probe = linear_probe
        self.__dict__["backbone"] = backbone  # not a submodule: not saved, moved in on_fit_start
        self.lr, self.probe_lr, self.seed, self.global_batch = lr, probe_lr, seed, global_batch
        self.figure_every, self.palette = figure_every, palette
        self.linear_probe_upsample = linear_probe_upsample
        self.cluster_metrics = self.linear_metrics = None
        if n_classes is not None:
            self.cluster_metrics = UnsupervisedMetrics(n_classes, extra_clusters=extra_clusters)
            if linear_probe is not None:
                self.linear_metrics = UnsupervisedMetrics(n_classes, hungarian=False)
        self._figure_batch: dict[str, Tensor] | None = None
        self._last_figure_step = -1
        # logger=False: the run folder has config.yaml already, and Lightning would write the
        # hparams again through omegaconf when installed (2.4 fails on our tuples).
        self.save_hyperparameters(run_config or {}, logger=False)

    # ------------------------------------------------------------------ helpers
    def on_fit_start(self) -> None:
        if self.backbone is not None:
            self.backbone.to(self.device)

    def _features(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Frozen features (b, C, h, w) of the images and of their neighbours."""
        if "feat" in batch:  # cached (float16 on disk, float32 here, channels-last for the head)
            return tuple(
                batch[k].to(torch.float32, memory_format=torch.channels_last)
                for k in ("feat", "feat_pos")
            )  # type: ignore[return-value]
        if self.backbone is None:
            raise StegoError("image batches need a backbone; pass backbone= to StegoModule")
        with torch.no_grad():
            return self.backbone(batch["image"]).feat, self.backbone(batch["image_pos"]).feat

    def _draws(self, step: int, local_batch: int) -> tuple[Tensor, Tensor, Tensor]:
        """coords1, coords2 (b, S, S, 2): this rank's slice of the global draw; perms (NEG, b)."""
        from stego.losses import derangement, sample_coords

        g = step_generator(self.seed, step, _COORDS)
        s, rank = self.loss.n_samples, self.global_rank
        coords1 = sample_coords(self.global_batch, s, generator=g)
        coords2 = sample_coords(self.global_batch, s, generator=g)
        part = slice(rank * local_batch, (rank + 1) * local_batch)
        gp = step_generator(self.seed, step, _PERMS, rank)
        perms = torch.stack(
            [
                derangement(local_batch, generator=gp, mode=self.loss.derangement)
                for _ in range(self.loss.neg_samples)
            ]
        )
        return coords1[part].to(self.device), coords2[part].to(self.device), perms.to(self.device)

    def _check_finite(self, step: int, values: dict[str, Tensor]) -> None:
        bad = {k: float(v.detach()) for k, v in values.items() if not torch.isfinite(v).all()}
        if bad:
            raise StegoError(
                f"training diverged at step {step}: non-finite {bad}. Likely causes: a loss shift "
                "or learning rate too large (loss.*_shift, train.lr) or float16 overflow "
                "(train.precision; try 32-true or bf16-mixed). The last good checkpoint is kept; "
                "change the setting and rerun with --resume"
            )

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        step = self.global_step
        feat, feat_pos = self._features(batch)  # (b, C, h, w) each
        gd = step_generator(self.seed, step, _DROPOUT, self.global_rank)
        anchor = self.head(feat, generator=gd)  # code (b, D, h, w)
        positive = self.head(feat_pos, generator=gd)
        coords1, coords2, perms = self._draws(step, feat.shape[0])
        out = self.loss(
            anchor.feat_for_loss,
            positive.feat_for_loss,
            anchor.code,
            positive.code,
            coords1=coords1,
            coords2=coords2,
            perms=perms,
        )
        code = anchor.code.detach()  # the probes never change the head
        cluster_loss = self.cluster_probe(code).loss
        total = out.total + cluster_loss
        logs = {
            "loss/total": out.total,
            "loss/self": out.self_term,
            "loss/knn": out.knn_term,
            "loss/random": out.random_term,
            "probe/cluster_loss": cluster_loss,
        }
        if self.linear_probe is not None and "label" in batch:
            linear_loss = self.linear_probe.loss(
                code, batch["label"], upsample=self.linear_probe_upsample or None
            )
            total = total + linear_loss
            logs["probe/linear_loss"] = linear_loss
        self._check_finite(step, logs)
        for term, stats in out.stats.items():
            logs[f"corr/{term}_feat_mean"] = stats.fd_mean
            logs[f"corr/{term}_code_mean"] = stats.cd_mean
            logs[f"corr/{term}_attract_fraction"] = stats.attract_fraction
        self.log_dict(
            {k: v.detach().float() for k, v in logs.items()},
            on_step=True,
            on_epoch=False,
            batch_size=feat.shape[0],
        )
        self.log(
            "loss",
            out.total.detach().float(),
            prog_bar=True,
            logger=False,
            batch_size=feat.shape[0],
        )
        return total

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            )
            self._check_finite(self.global_step, {"gradient norm": norm})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        probes = list(self.cluster_probe.parameters())
        if self.linear_probe is not None:
            probes += list(self.linear_probe.parameters())
        groups = [{"params": probes, "lr": self.probe_lr}]
        head = [p for p in self.head.parameters() if p.requires_grad]
        if head:  # head "none" has no parameters
            groups.insert(0, {"params": head, "lr": self.lr})
        return torch.optim.Adam(groups)  # Adam is per-parameter: same as two optimizers

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.cluster_metrics is None or "label" not in batch:
            return
        images, labels = batch["image"], batch["label"]  # (b, 3, H, W), (b, H, W)
        code = self.head(self.backbone(images).feat).code  # (b, D, h, w)
        full = F.interpolate(code, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        clusters = self.cluster_probe.predict(full)  # (b, H, W)
        self.cluster_metrics.update(clusters, labels)
        if self.linear_metrics is not None:
            self.linear_metrics.update(self.linear_probe(full).argmax(1), labels)
        if batch_idx == 0 and self.global_rank == 0:
            n = min(4, images.shape[0])
            self._figure_batch = {
                "image": images[:n].cpu(),
                "label": labels[:n].cpu(),
                "pred": clusters[:n].cpu(),
            }

    def on_validation_epoch_end(self) -> None:
        if self.cluster_metrics is None or self.trainer.sanity_checking:
            return
        scores = self.cluster_metrics.compute()
        self.log("val/cluster_miou", scores["miou"].float(), sync_dist=False)
        self.log("val/cluster_accuracy", scores["accuracy"].float(), sync_dist=False)
        if self.linear_metrics is not None:
            lin = self.linear_metrics.compute()
            self.log("val/linear_miou", lin["miou"].float(), sync_dist=False)
            self.log("val/linear_accuracy", lin["accuracy"].float(), sync_dist=False)
            self.linear_metrics.reset()
        self.cluster_metrics.reset()
        self._maybe_figure(scores["assignment"])

    def _maybe_figure(self, assignment: Tensor) -> None:
        step = self.global_step
        due = self.figure_every and step // self.figure_every != self._last_figure_step
        if not due or self._figure_batch is None or self.global_rank != 0:
            return
        from stego.train.console import log_figure
        from stego.viz import prediction_figure

        self._last_figure_step = step // self.figure_every
        fb = self._figure_batch
        preds = assignment.long()[fb["pred"]]  # clusters -> matched classes
        fig = prediction_figure(fb["image"], fb["label"], preds, self.palette, f"step {step}")
        log_figure(list(self.loggers), "val/predictions", fig, step)


class StegoDataModule(L.LightningDataModule):
    """Dataloaders whose training order depends only on (seed, step): see StepSampler."""

    def __init__(
        self,
        train_pairs: Dataset,
        train_indices: list[int],
        val: Dataset | None,
        *,
        global_batch: int,
        seed: int,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.train_pairs, self.train_indices, self.val = train_pairs, train_indices, val
        self.global_batch, self.seed, self.num_workers = global_batch, seed, num_workers

    def _loader(self, dataset: Dataset, batch: int, sampler: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        sampler = StepSampler(
            self.train_indices,
            self.global_batch,
            self.seed,
            rank=t.global_rank,
            world_size=t.world_size,
            start_step=t.global_step,
        )  # restored before this is called
        return self._loader(self.train_pairs, sampler.local_batch, sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        t = self.trainer
        sampler = ShardSampler(len(self.val), rank=t.global_rank, world_size=t.world_size)
        return self._loader(self.val, max(1, self.global_batch // t.world_size), sampler)


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


def _check_out_dir(config: StegoConfig, out_dir: Path, resume: bool) -> Path | None:
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
    if saved.is_file():
        old = StegoConfig.from_dict(yaml.safe_load(saved.read_text()), source=str(saved)).to_dict()
        new = config.to_dict()
        diffs = [
            f"{s}.{k}: {old[s][k]!r} -> {new[s][k]!r}"
            for s in new
            for k in new[s]
            if old[s][k] != new[s][k]
            and f"{s}.{k}" not in RESUMABLE_CHANGES
            and new[s][k] != "auto"
        ]  # "auto" shifts: the saved resolved values are reused
        if diffs:
            raise StegoError(
                f"the config differs from the run in {out_dir} ({'; '.join(diffs)}); "
                "resume with the same settings or start a new --out"
            )
    return last


def _env_rank() -> int:
    """Global rank of this process before Lightning starts (DDP children inherit env vars)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _device(accelerator: str) -> str:
    if accelerator == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_module(
    config: StegoConfig, backbone: Any, n_classes: int | None, palette: Any = None
) -> StegoModule:
    """The StegoModule of ``config`` (the one place that reads model/loss settings)."""
    from stego.losses import StegoLoss
    from stego.models.heads import SegmentationHead
    from stego.models.probes import ClusterProbe, LinearProbe

    m, lo, t = config.model, config.loss, config.train
    head = SegmentationHead(backbone.embed_dim, m.code_dim, m.head, m.dropout)
    n_clusters = m.n_clusters or ((n_classes or 0) + m.extra_clusters)
    if n_clusters < 1:
        raise StegoError(f"dataset {config.data.dataset} has no class count; set model.n_clusters")
    loss = StegoLoss(
        shifts=(lo.pos_intra_shift, lo.pos_inter_shift, lo.neg_inter_shift),
        weights=(lo.pos_intra_weight, lo.pos_inter_weight, lo.neg_inter_weight),
        n_samples=lo.feature_samples,
        neg_samples=lo.neg_samples,
        pointwise=lo.pointwise,
        zero_clamp=lo.zero_clamp,
        stabilize=lo.stabilize,
        derangement=lo.derangement,
    )
    metrics_ok = n_classes is not None and n_clusters == n_classes + m.extra_clusters
    return StegoModule(
        head=head,
        loss=loss,
        cluster_probe=ClusterProbe(head.out_dim, n_clusters),
        linear_probe=LinearProbe(head.out_dim, n_classes) if n_classes else None,
        backbone=backbone,
        lr=t.lr,
        probe_lr=t.probe_lr,
        seed=t.seed,
        global_batch=config.data.batch_size,
        n_classes=n_classes if metrics_ok else None,
        extra_clusters=m.extra_clusters,
        figure_every=t.figure_every,
        palette=palette,
        run_config=config.to_dict(),
        linear_probe_upsample=t.linear_probe_upsample,
    )


def _data(config: StegoConfig, backbone: Any, progress: bool) -> tuple[StegoDataModule, Any]:
    """Datamodule and the split's DatasetInfo: splits, neighbour table, optional cache."""
    from stego.data import dataset_info

    d, t = config.data, config.train
    if d.data_root is None:
        raise StegoError("data.data_root is not set; pass --data-root DIR")
    info = dataset_info(d.dataset)
    where = dict(
        name=info.name,
        crop_type=d.crop_type,
        resolution=d.resolution,
        data_root=d.data_root,
        cache_dir=d.cache_dir,
    )
    run = dict(
        device=_device(t.accelerator),
        batch_size=d.batch_size,
        num_workers=usable_workers(d.num_workers),
        progress=progress,
    )
    backbone.check_size(d.resolution, d.resolution)
    train_ds = open_split(
        info.name,
        d.data_root,
        d.split,
        resolution=d.resolution,
        interpolation=d.interpolation,
        crop_type=d.crop_type,
        crop_dir=d.crop_dir,
        skip_bad=d.skip_bad,
    )
    root = artifact_root(backbone, train_ds, split=d.split, **where)
    table = root / f"neighbors_k{t.knn_k}.safetensors"
    had = (cache_complete(root / "features"), table.is_file())
    cache = feature_cache(backbone, train_ds, t.use_feature_cache, split=d.split, **where, **run)
    nbrs = neighbor_table(backbone, train_ds, t.knn_k, split=d.split, cache=cache, **where, **run)
    if progress:
        from stego.train.console import report_artifacts

        report_artifacts(root, table, cache is not None, had)
    has_labels = bool(getattr(train_ds, "has_labels", False))
    if cache is not None:
        from stego.features.cache import CachedFeatureDataset

        cached = CachedFeatureDataset(cache, nbrs, t.num_neighbors, t.seed)
        pairs: Dataset = CachedPairDataset(cached, train_ds if has_labels else None)
    else:
        pairs = LivePairDataset(train_ds, nbrs, t.num_neighbors, t.seed)
    if d.val_split is not None:
        val: Dataset | None = open_split(
            info.name,
            d.data_root,
            d.val_split,
            resolution=d.resolution,
            interpolation=d.interpolation,
            crop_type="none",
        )
        train_idx = list(range(len(train_ds)))
    else:
        train_idx, held = split_holdout(len(train_ds), d.val_images if has_labels else 0, t.seed)
        val = Subset(train_ds, held) if held else None
    # A cached batch is a memory-mapped read of a few ms: worker processes would only take cores
    # from the training step. Decoded images (live backbone) are worth the workers.
    workers = 0 if cache is not None else run["num_workers"]
    module = StegoDataModule(
        pairs, train_idx, val, global_batch=d.batch_size, seed=t.seed, num_workers=workers
    )
    return module, info


def _trainer(
    config: StegoConfig, out_dir: Path, has_val: bool, progress: bool, verbose: bool
) -> L.Trainer:
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
        deterministic="warn" if torch.cuda.is_available() else True,
    )


def train(
    config: StegoConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    verbose: bool = False,
) -> Path:
    """Train a STEGO head and probes as ``config`` says; outputs go to ``out_dir``.

    Writes ``config.yaml``, ``checkpoints/`` (``last.ckpt``, one every
    ``train.checkpoint_every`` steps, ``best.ckpt`` by validation cluster mIoU), ``logs/``
    (TensorBoard, CSV) and the final inference model in ``model/``. ``resume=True`` continues
    from ``checkpoints/last.ckpt`` and reaches the weights an uninterrupted run would.
    ``progress``: one bar per stage and a line per artefact; ``verbose``: also Lightning's own
    banners, notices and progress bar (hidden by default, see
    :func:`stego.train.console.quiet_libraries`).
    """
    from stego.train.console import quiet_libraries

    with quiet_libraries(verbose):
        return _train(config, out_dir, resume=resume, progress=progress, verbose=verbose)


def _train(
    config: StegoConfig, out_dir: str | Path, *, resume: bool, progress: bool, verbose: bool
) -> Path:
    from stego.models.backbone import build_backbone

    config.validate()
    out_dir = Path(out_dir).expanduser()
    rank0 = _env_rank() == 0
    say = print if rank0 else None  # chosen shifts and the probe refit: shown even when quiet
    ckpt = (
        _check_out_dir(config, out_dir, resume)
        if rank0
        else (out_dir / "checkpoints" / "last.ckpt" if resume else None)
    )
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    m = config.model
    backbone = build_backbone(m.backbone, weights=m.weights, layer=m.layer)
    data, info = _data(config, backbone, progress and rank0)
    _resolve_auto_shifts(
        config,
        data,
        backbone,
        info.n_classes,
        out_dir if resume else None,
        log=say,
    )
    # Reseed: building a table or cache draws from the global RNG, the initial weights must not
    # depend on whether it was built in this run.
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    module = build_module(config, backbone, info.n_classes, info.palette.tolist() or None)
    if rank0:
        config.save(out_dir / "config.yaml")
        for stray in (out_dir / "checkpoints").glob(".*.tmp-*"):  # a write killed mid-way
            stray.unlink(missing_ok=True)
        if ckpt is not None:
            from stego.train.console import keep_csv_log

            keep_csv_log(out_dir / "logs" / "csv")
    trainer = _trainer(config, out_dir, data.val is not None, progress and rank0, verbose)
    # Our own checkpoints hold tensors and plain containers only: resume without unpickling code.
    trainer.fit(module, datamodule=data, ckpt_path=ckpt, weights_only=True)
    if config.train.kmeans_probe:
        _kmeans_probe(module, data, backbone, config, log=say)
    # The full training state (optimiser, loops): what --resume needs.
    trainer.save_checkpoint(out_dir / "checkpoints" / "last.ckpt", weights_only=False)
    if trainer.is_global_zero:
        _save_model(module, backbone, config, info, out_dir / "model")
    return out_dir


def _resolve_auto_shifts(
    config: StegoConfig,
    data: StegoDataModule,
    backbone: Any,
    n_classes: int | None,
    resumed: Path | None,
    log: Any,
) -> None:
    """Calibrate ``loss.*_shift: auto`` on the training split (cache or live backbone)."""
    from stego.features.calibration import LiveFeatures, auto_shift_keys, resolve_auto_shifts

    if not auto_shift_keys(config):
        return
    saved = None
    if resumed is not None and (resumed / "config.yaml").is_file():
        saved = yaml.safe_load((resumed / "config.yaml").read_text())
    pairs: Any = data.train_pairs
    if isinstance(pairs, CachedPairDataset):
        feats, nbrs = pairs.cached.cache, pairs.cached.neighbors
    else:
        feats = LiveFeatures(backbone, pairs.dataset, _device(config.train.accelerator))
        nbrs = pairs.neighbors
    m = config.model
    n_clusters = m.n_clusters or ((n_classes or 0) + m.extra_clusters)
    if n_clusters < 2:
        raise StegoError("loss shifts 'auto' need a cluster count >= 2; set model.n_clusters")
    resolve_auto_shifts(config, feats, torch.as_tensor(nbrs), n_clusters, saved=saved, log=log)


@torch.no_grad()
def _kmeans_probe(
    module: StegoModule, data: StegoDataModule, backbone: Any, config: StegoConfig, log: Any
) -> None:
    """train.kmeans_probe: refit the cluster centroids by spherical k-means on training codes."""
    from stego.features.calibration import LiveFeatures

    pairs: Any = data.train_pairs
    device = module.device
    feats = (
        pairs.cached.cache
        if isinstance(pairs, CachedPairDataset)
        else LiveFeatures(backbone, pairs.dataset, device)
    )
    head = module.head
    was_training = head.training
    head.eval()  # no dropout: the codes inference sees
    codes = torch.cat(
        [
            head(
                torch.stack([feats[i] for i in range(s, min(s + 64, len(feats)))]).to(device)
            ).code.cpu()
            for s in range(0, len(feats), 64)
        ]
    )
    head.train(was_training)
    g = torch.Generator().manual_seed(config.train.seed)
    result = module.cluster_probe.fit_kmeans(codes, n_restarts=10, generator=g)
    if log is not None:
        log(
            f"cluster probe refit by spherical k-means on {codes.shape[0]} training codes "
            f"(10 restarts, inertia {float(result.inertia):.1f})"
        )


def _save_model(
    module: StegoModule, backbone: Any, config: StegoConfig, info: Any, directory: Path
) -> None:
    """Save the inference model (backbone + head + probes) to ``directory``."""
    from stego.models.segmenter import Segmenter, SegmenterMeta

    meta = SegmenterMeta.from_config(
        config,
        info,
        code_dim=module.head.out_dim,
        n_clusters=module.cluster_probe.n_clusters,
        n_classes=module.linear_probe.n_classes if module.linear_probe is not None else None,
    )
    model = Segmenter(
        backbone.cpu(),
        module.head.cpu().eval(),
        module.cluster_probe.cpu(),
        None if module.linear_probe is None else module.linear_probe.cpu(),
        meta,
    )
    model.save_pretrained(directory, train_config=config.to_dict())
