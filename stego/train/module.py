"""The STEGO LightningModule: head + probes trained on frozen features; the step reads like the
algorithm.

Every random draw of a step comes from generators seeded by (seed, global step, rank): sampling
coordinates (drawn for the GLOBAL batch, each rank taking its slice), derangements and dropout
masks. With the step-indexed data order of :mod:`stego.train.pairs`, a resumed run replays the
uninterrupted one exactly, and the cached-feature and live-backbone paths see the same draws.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stego.config import StegoConfig
from stego.errors import StegoError
from stego.eval.metrics import UnsupervisedMetrics
from stego.train.pairs import mix_seed

__all__ = [
    "StegoModule",
    "build_stego_module",
    "common_module_args",
    "n_clusters_of",
    "step_generator",
]

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


def n_clusters_of(config: StegoConfig, n_classes: int | None) -> int:
    """model.n_clusters, or the dataset's class count + model.extra_clusters (either method)."""
    m = config.model
    n = m.n_clusters or ((n_classes or 0) + m.extra_clusters)
    if n < 1:
        raise StegoError(f"dataset {config.data.dataset} has no class count; set model.n_clusters")
    return n


def build_stego_module(
    config: StegoConfig, backbone: Any, n_classes: int | None, palette: Any = None
) -> StegoModule:
    """The StegoModule of ``config`` (``model.method: stego``; the one place that reads the
    STEGO model/loss settings). :func:`stego.train.trainer.build_module` dispatches here."""
    from stego.losses import StegoLoss
    from stego.models.heads import SegmentationHead

    m, lo, t = config.model, config.loss, config.train
    head = SegmentationHead(backbone.embed_dim, m.code_dim, m.head, m.dropout)
    n_clusters = n_clusters_of(config, n_classes)
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
    return StegoModule(
        head=head,
        loss=loss,
        lr=t.lr,
        **common_module_args(config, backbone, n_classes, n_clusters, head.out_dim, palette),
    )


def common_module_args(
    config: StegoConfig,
    backbone: Any,
    n_classes: int | None,
    n_clusters: int,
    code_dim: int,
    palette: Any = None,
) -> dict[str, Any]:
    """The :class:`StegoModule` arguments both methods share: probes on ``code_dim`` channels,
    backbone, seed, batch, validation metrics (only when the cluster count fits the classes),
    figures and the run config."""
    from stego.models.probes import ClusterProbe, LinearProbe

    m, t = config.model, config.train
    metrics_ok = n_classes is not None and n_clusters == n_classes + m.extra_clusters
    return {
        "cluster_probe": ClusterProbe(code_dim, n_clusters),
        "linear_probe": LinearProbe(code_dim, n_classes) if n_classes else None,
        "backbone": backbone,
        "probe_lr": t.probe_lr,
        "seed": t.seed,
        "global_batch": config.data.batch_size,
        "n_classes": n_classes if metrics_ok else None,
        "extra_clusters": m.extra_clusters,
        "figure_every": t.figure_every,
        "palette": palette,
        "run_config": config.to_dict(),
        "linear_probe_upsample": t.linear_probe_upsample,
    }
