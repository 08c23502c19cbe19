"""CAUSE's concept clusterbook as an artefact of a training split, like the neighbour table.

The clusterbook is K concept vectors (K, C) in backbone feature space, fitted to the frozen
features of the training images by maximising the soft modularity of each image's patch graph
(:func:`stego.losses.cause.modularity_loss`) on one patch per ``cell x cell`` block
(:func:`stego.losses.cause.grid_subsample`), with Adam. Every draw of step ``s`` (images, crop
offset, patch picks) comes from a generator seeded by (seed, s), so a fit resumed from its
partial file reaches the concepts of an uninterrupted one.

File ``clusterbook.safetensors`` beside the split's ``features/`` folder: tensor ``concepts``
(K, C) float32; metadata ``fingerprint`` (JSON: the features' fingerprint, the settings, the
training items) and ``live`` (concepts that are the nearest of at least one patch). Written
atomically; ``clusterbook.partial.safetensors`` holds an unfinished fit (concepts + Adam state,
every :data:`PARTIAL_EVERY` steps) and is removed when the fit ends. Opening and fitting in one
place, under a lock: :func:`stego.features.build.clusterbook`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from stego.atomic import atomic_write
from stego.errors import StegoError
from stego.features.fingerprint import FINGERPRINT_KEYS
from stego.features.neighbors import _splitmix64
from stego.losses.cause import cell_window, grid_subsample, modularity_loss

__all__ = [
    "CLUSTERBOOK_FILE",
    "PARTIAL_EVERY",
    "Clusterbook",
    "ClusterbookSettings",
    "clusterbook_fingerprint",
    "count_live",
    "fingerprint_changes",
    "fit_clusterbook",
    "live_warning",
    "read_clusterbook",
    "write_clusterbook",
]

CLUSTERBOOK_FILE = "clusterbook.safetensors"
PARTIAL_EVERY = 50  # steps between saves of an unfinished fit (a few ms each)
LIVE_MAX_IMAGES = 512  # live concepts are counted on at most this many training images

_INIT, _STEP, _LIVE = 1, 2, 3  # generator streams


@dataclass(frozen=True)
class ClusterbookSettings:
    """Everything besides the features that decides the fitted concepts."""

    n_concepts: int = 2048
    init: str = "data"  # "data" (random sub-sampled patches) | "uniform" (+-1/K, the original's)
    steps: int = 600
    lr: float = 1e-3
    batch_size: int = 16
    temperature: float = 0.1
    cell: int = 4
    seed: int = 0

    @classmethod
    def from_config(cls, config: Any) -> ClusterbookSettings:
        """The settings of a :class:`stego.config.StegoConfig` (loss.cause_*, train.cause_*)."""
        lo, t = config.loss, config.train
        return cls(
            n_concepts=lo.cause_concepts,
            init=lo.cause_concept_init,
            steps=t.cause_clusterbook_steps,
            lr=t.cause_clusterbook_lr,
            batch_size=config.data.batch_size,
            temperature=lo.cause_modularity_temperature,
            cell=lo.cause_cell,
            seed=t.seed,
        )


class Clusterbook(NamedTuple):
    """A fitted clusterbook: concepts (K, C) float32, live-concept count, fingerprint."""

    concepts: Tensor
    live: int
    fingerprint: dict[str, Any]


def clusterbook_fingerprint(
    features: dict[str, Any], settings: ClusterbookSettings, indices: Sequence[int]
) -> dict[str, Any]:
    """What a clusterbook is fitted from: the compared keys of the features' fingerprint
    (:data:`stego.features.fingerprint.FINGERPRINT_KEYS`), the settings and the training items
    (positions in the split; the held-out validation images are not among them)."""
    digest = hashlib.sha256(",".join(str(int(i)) for i in indices).encode()).hexdigest()
    return {
        "features": {k: features[k] for k in FINGERPRINT_KEYS if k in features},
        "settings": asdict(settings),
        "num_indices": len(indices),
        "indices_sha256": digest,
    }


def fingerprint_changes(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """``"key: found -> expected"`` for each part that differs (empty: the same fit)."""
    out = []
    for part in ("features", "settings"):
        old, new = found.get(part, {}), expected.get(part, {})
        out += [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
    if found.get("indices_sha256") != expected.get("indices_sha256"):
        out.append(f"training items: {found.get('num_indices')} -> {expected.get('num_indices')}")
    return out


def _generator(seed: int, step: int, stream: int) -> torch.Generator:
    h = 0
    for part in (seed, step, stream, 0xC1B0):
        h = _splitmix64(h ^ (int(part) & ((1 << 64) - 1)))
    return torch.Generator().manual_seed(h & ((1 << 63) - 1))


def _crop_rows(
    feat: Tensor, cell: int, generator: torch.Generator
) -> tuple[Tensor, tuple[int, int]]:
    """feat (B, C, h, w) cropped at a random offset to multiples of ``cell`` -> rows (B, N, C)."""
    rows, cols = cell_window(*feat.shape[-2:], cell, generator)
    crop = feat[..., rows, cols]
    return crop.flatten(2).transpose(1, 2), tuple(crop.shape[-2:])


def _init_concepts(
    feats: Sequence[Tensor], indices: Sequence[int], s: ClusterbookSettings
) -> Tensor:
    """(K, C): uniform in +-1/K, or K distinct random patches of the training items."""
    g = _generator(s.seed, 0, _INIT)
    channels, h, w = feats[indices[0]].shape
    if s.init == "uniform":
        return torch.empty(s.n_concepts, channels).uniform_(
            -1 / s.n_concepts, 1 / s.n_concepts, generator=g
        )
    total = len(indices) * h * w
    picks = (
        torch.randperm(total, generator=g)[: s.n_concepts]
        if total >= s.n_concepts
        else torch.randint(total, (s.n_concepts,), generator=g)  # fewer patches than concepts
    )
    out = torch.empty(s.n_concepts, channels)
    for item in torch.unique(picks // (h * w)).tolist():  # each image read once
        rows = (picks // (h * w) == item).nonzero().flatten()
        feat = feats[indices[item]].reshape(channels, h * w)  # (C, h*w)
        out[rows] = feat[:, picks[rows] % (h * w)].T.float()
    return out


def fit_clusterbook(
    feats: Sequence[Tensor],
    indices: Sequence[int],
    settings: ClusterbookSettings,
    *,
    partial: Path | None = None,
    progress: bool = False,
) -> Tensor:
    """Fit the concepts (K, C) float32 on ``feats[i]`` (C, h, w) for i in ``indices``.

    Each step draws ``settings.batch_size`` items (with replacement), crops them to multiples of
    ``settings.cell`` at a random offset, keeps one patch per cell and takes an Adam step on
    :func:`stego.losses.cause.modularity_loss` (images whose kept patches have no positive
    cosine between them are left out of the step: their modularity is 0 / 0). ``partial``: file
    of an unfinished fit, resumed when it exists (and holds the same fingerprint: the caller
    removes a stale one) and written every :data:`PARTIAL_EVERY` steps.
    """
    if not indices:
        raise StegoError("the clusterbook needs at least one training image")
    _, h, w = feats[indices[0]].shape
    if (h // settings.cell) * (w // settings.cell) < 2:
        raise StegoError(
            f"a {h} x {w} feature grid keeps {(h // settings.cell) * (w // settings.cell)} "
            f"patch(es) per image with loss.cause_cell={settings.cell}; the modularity graph "
            "needs at least 2: lower loss.cause_cell or raise data.resolution"
        )
    concepts = torch.nn.Parameter(_init_concepts(feats, indices, settings))
    opt = torch.optim.Adam([concepts], lr=settings.lr)
    start = _resume(partial, concepts, opt) if partial is not None else 0
    pool = torch.as_tensor(list(indices), dtype=torch.long)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=settings.steps, initial=start, desc="clusterbook", disable=not progress, unit="step"
    )
    for step in range(start, settings.steps):
        g = _generator(settings.seed, step, _STEP)
        picked = pool[torch.randint(len(pool), (settings.batch_size,), generator=g)]
        batch = torch.stack([feats[int(i)] for i in picked]).float()  # (B, C, h, w)
        rows, grid = _crop_rows(batch, settings.cell, g)
        sub = grid_subsample(rows, generator=g, grid=grid, cell=settings.cell)  # (B, n, C)
        sub = sub[_has_edges(sub)]  # an image without edges has no modularity (0 / 0)
        if len(sub):
            loss = modularity_loss(concepts, sub, settings.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if not torch.isfinite(concepts).all():
                raise StegoError(
                    f"the clusterbook fit diverged at step {step}; lower train.cause_clusterbook_lr"
                )
        bar.update(1)
        if partial is not None and (step + 1) % PARTIAL_EVERY == 0 and step + 1 < settings.steps:
            _save_partial(partial, concepts, opt, step + 1)
    bar.close()
    return concepts.detach().clone()


def _has_edges(x: Tensor) -> Tensor:
    """(B,) bool: images of rows x (B, n, C) with a positive cosine between two patches."""
    unit = F.normalize(x, dim=-1)
    cos = (unit @ unit.transpose(1, 2)).clamp_min(0)  # (B, n, n)
    cos = cos * (1 - torch.eye(x.shape[1], dtype=cos.dtype))
    return cos.sum(dim=(1, 2)) > 0


def _save_partial(path: Path, concepts: Tensor, opt: torch.optim.Optimizer, step: int) -> None:
    from safetensors.torch import save

    state = opt.state[concepts]
    tensors = {
        "concepts": concepts.detach(),
        "exp_avg": state["exp_avg"],
        "exp_avg_sq": state["exp_avg_sq"],
        "adam_step": torch.as_tensor(state["step"], dtype=torch.float32).reshape(1),
    }
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"step": str(step)})
    with atomic_write(path) as handle:
        handle.write(data)


def _resume(path: Path, concepts: torch.nn.Parameter, opt: torch.optim.Optimizer) -> int:
    """Load an unfinished fit into ``concepts`` / ``opt``; the step to continue from (0: none)."""
    if not path.is_file():
        return 0
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            step = int(handle.metadata()["step"])
            t = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except Exception:  # noqa: BLE001 - an unreadable partial file only costs a refit
        path.unlink(missing_ok=True)
        return 0
    with torch.no_grad():
        concepts.copy_(t["concepts"])
    opt.state[concepts] = {
        "step": t["adam_step"].reshape(()).clone(),
        "exp_avg": t["exp_avg"].clone(),
        "exp_avg_sq": t["exp_avg_sq"].clone(),
    }
    return step


@torch.no_grad()
def count_live(
    concepts: Tensor,
    feats: Sequence[Tensor],
    indices: Sequence[int],
    *,
    seed: int = 0,
    max_images: int = LIVE_MAX_IMAGES,
    batch: int = 32,
) -> int:
    """Concepts (K, C) that are the nearest (cosine) of at least one patch of the items (all
    patches of at most ``max_images`` seeded picks of ``indices``)."""
    chosen = list(indices)
    if len(chosen) > max_images:
        order = torch.randperm(len(chosen), generator=_generator(seed, 0, _LIVE))[:max_images]
        chosen = [chosen[int(i)] for i in order.sort().values]
    unit = F.normalize(concepts.float(), dim=1)  # (K, C)
    hit = torch.zeros(concepts.shape[0], dtype=torch.bool)
    for s in range(0, len(chosen), batch):
        x = torch.stack([feats[int(i)] for i in chosen[s : s + batch]]).float()  # (b, C, h, w)
        rows = F.normalize(x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1]), dim=1)
        hit[(rows @ unit.T).argmax(dim=1)] = True
    return int(hit.sum())


def write_clusterbook(path: Path, book: Clusterbook) -> None:
    """Save ``book`` to ``path`` atomically (safetensors, metadata as JSON text)."""
    from safetensors.torch import save

    metadata = {"fingerprint": json.dumps(book.fingerprint, sort_keys=True), "live": str(book.live)}
    data = save({"concepts": book.concepts.float().contiguous()}, metadata=metadata)
    with atomic_write(path) as handle:
        handle.write(data)


def read_clusterbook(path: Path) -> Clusterbook:
    """The clusterbook saved at ``path``; :class:`StegoError` when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            concepts = handle.get_tensor("concepts")
        return Clusterbook(concepts, int(meta["live"]), json.loads(meta["fingerprint"]))
    except Exception as exc:  # noqa: BLE001 - safetensors, JSON and key errors mean the same
        raise StegoError(
            f"clusterbook {path} is unreadable ({type(exc).__name__}: {exc}); delete it and "
            "train again to refit it"
        ) from exc


def live_warning(live: int, n_clusters: int, settings: ClusterbookSettings) -> str | None:
    """The warning for a clusterbook with fewer than 2 x n_clusters live concepts, else None."""
    if live >= 2 * n_clusters:
        return None
    if live == settings.n_concepts:
        why, hint = "the clusterbook is small", "raise loss.cause_concepts"
    else:
        why = "the clusterbook collapsed"
        hint = (
            "set loss.cause_concept_init=data"
            if settings.init == "uniform"
            else "try other train.cause_clusterbook_steps, another block (model.layer) or "
            "model.method=stego"
        )
    return (
        f"WARNING: only {live} of {settings.n_concepts} CAUSE concepts are live (the nearest of "
        f"some patch), fewer than 2 x {n_clusters} clusters: {why}, and the head will separate "
        f"few kinds of things; {hint}"
    )
