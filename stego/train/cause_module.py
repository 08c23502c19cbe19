"""The CAUSE LightningModule (Kim et al., arXiv 2310.07379): a head trained by the concept-wise
contrastive loss against its EMA teacher, on frozen features and a fitted clusterbook.

It is a :class:`stego.train.module.StegoModule` whose ``head`` is the EMA **teacher**: the head
that validation, the k-means probe refit (:func:`stego.train.refit.kmeans_probe`) and the saved
model (:func:`stego.train.refit.save_model`) use, as CAUSE infers with its teacher. The student
head and the two projections train beside it. A step:

1. crop each feature map (b, C, h, w) to multiples of ``cell`` at a random offset and keep one
   patch per ``cell x cell`` block (the same picks for features, student and teacher);
2. student and teacher projections of those patches (the TR head runs on the whole map first:
   its attention sees every patch);
3. :func:`stego.losses.cause.concept_contrastive_loss` against the teacher and the concept bank;
   the probes learn on the detached teacher codes;
4. after the optimiser step, ``teacher = m * teacher + (1 - m) * student``; the bank takes the
   step's teacher projections (gathered over DDP ranks, so every rank holds the same bank).

Every draw of a step (crop offset, patch picks, dropout masks, bank picks) comes from generators
seeded by (seed, step, rank), and the teacher and the bank are in the checkpoints: a resumed run
reaches the weights of an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from stego.errors import StegoError
from stego.losses.cause import (
    ConceptBank,
    cell_window,
    concept_contrastive_loss,
    grid_subsample,
    nearest_concept,
)
from stego.train.module import StegoModule, common_module_args, step_generator
from stego.train.pairs import mix_seed

__all__ = ["CauseModule", "build_cause_module"]

_CROP, _DROPOUT, _BANK = 11, 12, 13  # stream ids of the per-step generators
_BANK_KEY = "cause_bank"


class CauseModule(StegoModule):
    """CAUSE head + EMA teacher + concept bank + probes (see the module docstring).

    Args:
        student, teacher: :class:`stego.models.cause_heads.CauseCodeHead` of one kind; the
            teacher starts as a copy of the student and is never optimised.
        student_proj, teacher_proj: ``nn.Linear(D, E)`` projections for the loss.
        concepts: the clusterbook (K, C), kept as a buffer (saved in checkpoints).
        cell, temperature, pos_threshold, neg_threshold: loss settings (``loss.cause_*``).
        bank_size, bank_keep: rows per concept and fraction kept per step (0 rows = no bank).
        momentum, weight_decay, grad_clip: EMA momentum, head Adam weight decay, max gradient
            norm of the student (0 = none).
        Other keyword arguments: as :class:`StegoModule` (``lr`` is the head's).
    """

    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module,
        student_proj: nn.Module,
        teacher_proj: nn.Module,
        concepts: Tensor,
        cell: int,
        temperature: float,
        pos_threshold: float,
        neg_threshold: float,
        bank_size: int,
        bank_keep: float,
        momentum: float,
        weight_decay: float,
        grad_clip: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(head=teacher, loss=None, **kwargs)  # type: ignore[arg-type]
        self.student, self.student_proj, self.teacher_proj = student, student_proj, teacher_proj
        self.teacher_proj.load_state_dict(student_proj.state_dict())
        self.head.load_state_dict(student.state_dict())
        for p in [*self.head.parameters(), *self.teacher_proj.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("concepts", concepts.detach().float().clone())
        self.cell, self.temperature = cell, temperature
        self.pos_threshold, self.neg_threshold = pos_threshold, neg_threshold
        self.momentum, self.weight_decay, self.grad_clip = momentum, weight_decay, grad_clip
        self.bank = ConceptBank(concepts.shape[0], bank_size, bank_keep) if bank_size else None

    # ------------------------------------------------------------------ pieces of a step
    def _pairs(self) -> list[tuple[Tensor, Tensor]]:
        """(student, teacher) parameter pairs of the heads and projections, in one order."""
        student = [*self.student.parameters(), *self.student_proj.parameters()]
        teacher = [*self.head.parameters(), *self.teacher_proj.parameters()]
        return list(zip(student, teacher, strict=True))

    @torch.no_grad()
    def ema_update(self) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        for s, t in self._pairs():
            t.mul_(self.momentum).add_(s.detach(), alpha=1.0 - self.momentum)

    def _picks(self, feat: Tensor, step: int) -> tuple[Any, Tensor]:
        """A function map (b, X, h, w) -> rows (b, n, X) taking this step's patches, and the
        picked feature rows (b, n, C)."""
        g = step_generator(self.seed, step, _CROP, self.global_rank)
        b, _, h, w = feat.shape
        rows, cols = cell_window(h, w, self.cell, g)
        hc, wc = rows.stop - rows.start, cols.stop - cols.start
        blocks = b * (hc // self.cell) * (wc // self.cell)
        order = torch.randint(self.cell * self.cell, (blocks,), generator=g).to(feat.device)

        def pick(maps: Tensor) -> Tensor:
            crop = maps[..., rows, cols].flatten(2).transpose(1, 2)
            return grid_subsample(crop, order, grid=(hc, wc), cell=self.cell)

        return pick, pick(feat)

    def _projections(self, feat: Tensor, pick: Any, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Student projections (b, n, E), teacher projections (b, n, E), teacher codes
        (b, D, h, w) (the probes' input; the MLP head gives them at every patch too)."""
        with torch.no_grad():
            code_t = self.head(feat).code  # (b, D, h, w)
            proj_t = self.teacher_proj(pick(code_t))
        if self.student.kind == "mlp":  # per patch: run on the picked rows only
            code_s = self.student.rows(rows)
        else:  # attention over the whole map, then the same picks
            code_s = pick(self.student(feat).code)
        return self.student_proj(code_s), proj_t, code_t

    def _bank_rows(self) -> tuple[Tensor | None, Tensor | None]:
        if self.bank is None or len(self.bank) == 0:
            return None, None
        ids, proj = self.bank.as_tensors()
        return self.concepts[ids.to(self.concepts.device)], proj.to(self.concepts.device)

    @torch.no_grad()
    def _update_bank(self, rows: Tensor, proj_t: Tensor, step: int) -> None:
        if self.bank is None:
            return
        ids = nearest_concept(rows, self.concepts).indices.reshape(-1)  # (b*n,)
        proj = proj_t.reshape(-1, proj_t.shape[-1]).detach()  # (b*n, E)
        if self.trainer.world_size > 1:  # every rank adds every rank's rows, in rank order
            ids = self.all_gather(ids).reshape(-1)
            proj = self.all_gather(proj).reshape(-1, proj.shape[-1])
        self.bank.update(ids, proj, generator=step_generator(self.seed, step, _BANK))

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        step = self.global_step
        feat = self._features(batch)[0]  # (b, C, h, w); the neighbour is not used
        pick, rows = self._picks(feat, step)  # rows (b, n, C)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # dropout: seeded per step, not global
            torch.manual_seed(mix_seed(self.seed, step, _DROPOUT, self.global_rank))
            proj_s, proj_t, code_t = self._projections(feat, pick, rows)
        bank_concepts, bank_proj = self._bank_rows()
        loss = concept_contrastive_loss(
            rows,
            proj_s,
            proj_t,
            self.concepts,
            bank_concepts,
            bank_proj,
            temperature=self.temperature,
            pos_threshold=self.pos_threshold,
            neg_threshold=self.neg_threshold,
        )
        cluster_loss = self.cluster_probe(code_t).loss  # teacher codes, no gradient to heads
        total = loss + cluster_loss
        logs = {"loss/total": loss, "probe/cluster_loss": cluster_loss}
        if self.linear_probe is not None and "label" in batch:
            linear_loss = self.linear_probe.loss(
                code_t, batch["label"], upsample=self.linear_probe_upsample or None
            )
            total = total + linear_loss
            logs["probe/linear_loss"] = linear_loss
        self._check_finite(step, logs)
        self._update_bank(rows, proj_t, step)
        if self.bank is not None:
            logs["cause/bank_rows"] = torch.tensor(float(len(self.bank)))
        self.log_dict(
            {k: v.detach().float() for k, v in logs.items()},
            on_step=True,
            on_epoch=False,
            batch_size=feat.shape[0],
        )
        self.log("loss", loss.detach().float(), prog_bar=True, logger=False, batch_size=len(feat))
        return total

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema_update()  # before on_train_batch_end, where checkpoints are written

    def configure_gradient_clipping(self, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        if self.grad_clip > 0:
            params = [*self.student.parameters(), *self.student_proj.parameters()]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        probes = list(self.cluster_probe.parameters())
        if self.linear_probe is not None:
            probes += list(self.linear_probe.parameters())
        student = [*self.student.parameters(), *self.student_proj.parameters()]
        return torch.optim.Adam(
            [
                {"params": student, "lr": self.lr, "weight_decay": self.weight_decay},
                {"params": probes, "lr": self.probe_lr, "weight_decay": 0.0},
            ]
        )

    # ------------------------------------------------------------------ checkpoints
    def bank_state(self) -> dict[str, Tensor] | None:
        """The bank as its rows (oldest first per concept) and ring positions: no empty slots."""
        if self.bank is None or self.bank.store is None:
            return None
        ids, proj = self.bank.as_tensors()
        return {"ids": ids, "proj": proj, "count": self.bank.count, "head": self.bank.head}

    def load_bank_state(self, state: dict[str, Tensor] | None) -> None:
        """Restore :meth:`bank_state`: the same rows in the same ring slots."""
        if self.bank is None:
            return
        capacity, fraction = self.bank.capacity, self.bank.keep_fraction
        self.bank = ConceptBank(self.concepts.shape[0], capacity, fraction)
        if state is None:
            return
        ids, proj = state["ids"].long(), state["proj"]
        count, head = state["count"].long(), state["head"].long()
        store = proj.new_zeros(self.bank.n_concepts, capacity, proj.shape[1])
        first = torch.cumsum(count, 0) - count
        age = torch.arange(ids.numel()) - first[ids]
        store[ids, (head[ids] - count[ids] + age) % capacity] = proj
        self.bank.store, self.bank.count, self.bank.head = store, count, head

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_BANK_KEY] = self.bank_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.load_bank_state(checkpoint.get(_BANK_KEY))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.bank is not None and self.bank.store is not None:
            bank = self.bank
            bank.store = bank.store.to(self.device)
            bank.count, bank.head = bank.count.to(self.device), bank.head.to(self.device)


def build_cause_module(
    config: Any,
    backbone: Any,
    n_clusters: int,
    n_classes: int | None,
    concepts: Tensor,
    palette: Any = None,
) -> CauseModule:
    """The CauseModule of ``config`` (model.cause_head, loss.cause_*, train.cause_*) on the
    clusterbook ``concepts`` (K, C)."""
    from stego.models.cause_heads import CauseCodeHead

    m, lo, t = config.model, config.loss, config.train
    if concepts.shape != (lo.cause_concepts, backbone.embed_dim):
        raise StegoError(
            f"the clusterbook has shape {tuple(concepts.shape)}, expected "
            f"({lo.cause_concepts}, {backbone.embed_dim}); delete it to refit"
        )
    side = config.data.resolution // backbone.patch_size

    def head() -> CauseCodeHead:
        out = CauseCodeHead(
            m.cause_head,
            backbone.embed_dim,
            m.code_dim,
            n_concepts=lo.cause_concepts,
            n_positions=side * side,
            dropout=m.dropout,
        )
        if m.cause_head == "tr":
            out.concepts.copy_(concepts)
        return out

    student = head()
    teacher = head()
    return CauseModule(
        student=student,
        teacher=teacher,
        student_proj=nn.Linear(m.code_dim, lo.cause_proj_dim),
        teacher_proj=nn.Linear(m.code_dim, lo.cause_proj_dim),
        concepts=concepts,
        cell=lo.cause_cell,
        temperature=lo.cause_temperature,
        pos_threshold=lo.cause_pos_threshold,
        neg_threshold=lo.cause_neg_threshold,
        bank_size=lo.cause_bank_size,
        bank_keep=lo.cause_bank_keep,
        momentum=t.cause_momentum,
        weight_decay=t.cause_weight_decay,
        grad_clip=t.cause_grad_clip,
        lr=t.cause_lr,
        **common_module_args(config, backbone, n_classes, n_clusters, m.code_dim, palette),
    )
