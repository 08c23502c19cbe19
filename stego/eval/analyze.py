"""Correspondence analysis (STEGO paper, Fig. 5): how well the cosine similarity of two patches'
features (or a trained model's codes) predicts that they show the same class.

Used to choose a backbone, block and resolution on a labelled split, before any training. The
steps (pure tensor functions in :mod:`stego.eval.correspondence`, re-exported here):

1. :func:`patch_labels`: each patch of the feature grid takes the majority label of the pixels it
   covers; patches whose majority is IGNORE, or whose purity (share of their pixels carrying that
   label, ignored pixels included) is below ``min_purity``, are dropped.
2. :func:`sample_pairs`: pairs of kept patches, a share within one image and the rest across two
   different images, drawn with a seeded ``torch.Generator`` and capped at ``n_pairs``. Features
   are kept only for the patches the pairs use, so memory is bounded by the cap.
3. :func:`pair_cosines`: cosine of the two patches' vectors, for several encoders in one pass.
4. :func:`pr_stats`: precision-recall curve and average precision of "cosine predicts same
   class", over all pairs and over the within / across ones. A scorer that knows nothing has an
   AP equal to the positive rate (share of same-class pairs): the floor to read each AP against.

:func:`analyze` runs these per backbone / block / resolution; :func:`write_analysis` writes
``analysis.json``, ``analysis.csv`` and ``pr_curves.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stego.atomic import atomic_write
from stego.errors import StegoError
from stego.eval.correspondence import (
    PatchLabels,
    PatchPairs,
    PRStats,
    pair_cosines,
    patch_labels,
    pr_stats,
    sample_pairs,
)

__all__ = [
    "ANALYSIS_FILES",
    "Analysis",
    "PatchLabels",
    "PatchPairs",
    "PRStats",
    "SettingResult",
    "analyze",
    "pair_cosines",
    "patch_labels",
    "pr_stats",
    "sample_pairs",
    "write_analysis",
]

ANALYSIS_FILES = ("analysis.json", "analysis.csv", "pr_curves.png")


@dataclass(frozen=True)
class SettingResult:
    """Scores of one setting: ``kind`` "feature" (a backbone block) or "code" (a model)."""

    kind: str
    backbone: str
    layer: int
    resolution: int
    n_pairs: int
    n_within: int
    positive_rate: float  # share of same-class pairs: the AP of a blind scorer
    ap: float
    ap_within: float
    ap_across: float
    precision: np.ndarray = field(repr=False, compare=False)  # (T,) PR curve, all pairs
    recall: np.ndarray = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        what = f"{self.backbone} block {self.layer}"
        return f"{'code of ' if self.kind == 'code' else ''}{what} @ {self.resolution}"

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("precision", "recall")}
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in data.items()}


@dataclass
class Analysis:
    """Everything :func:`analyze` measured, one :class:`SettingResult` per setting."""

    dataset: str
    split: str
    n_images: int
    seed: int
    min_purity: float
    within_fraction: float
    settings: list[SettingResult]
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "settings"}
        data["settings"] = [s.to_dict() for s in self.settings]
        return data

    def table(self) -> str:
        """The settings as a markdown table."""
        rows = [
            "| setting | pairs | positive rate | AP | AP within | AP across |",
            "|" + "---|" * 6,
        ]
        for s in self.settings:
            cells = [s.positive_rate, s.ap, s.ap_within, s.ap_across]
            rows.append(
                f"| {s.name} | {s.n_pairs} | " + " | ".join(f"{v:.3f}" for v in cells) + " |"
            )
        return "\n".join(rows)


def _pass(
    data: Any, batch_size: int, device: str | torch.device, *, labels: bool = False
) -> Iterable[Tensor]:
    """Yield the split's images (B, 3, H, W) on ``device`` in order, or its labels (B, H, W)."""
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        yield torch.stack([item["label" if labels else "image"] for item in items]).to(device)


def _build_data(
    dataset: str, data_root: str | Path, split: str, resolution: int, extra: dict[str, Any],
    n_images: int | None, seed: int,
) -> Any:  # fmt: skip
    """The first ``n_images`` of a seeded shuffle of the split (all when None), centre-cropped."""
    from torch.utils.data import Subset

    from stego.data import PairTransform, build_dataset

    data = build_dataset(dataset, data_root, split, transform=PairTransform(resolution), **extra)
    if len(data) and "label" not in data[0]:
        raise StegoError(
            f"{dataset}/{split} has no labels, and stego analyze needs labels to tell same-class "
            "pairs: choose a labelled split (e.g. train or val), or pass --label-dir for a folder"
        )
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    chosen = order if n_images is None else order[:n_images]
    return Subset(data, sorted(int(i) for i in chosen))


def _score(
    kind: str, backbone: str, layer: int, resolution: int, cos: Tensor, pairs: PatchPairs
) -> SettingResult:
    every = pr_stats(cos, pairs.same)
    within = pr_stats(cos[pairs.within], pairs.same[pairs.within])
    across = pr_stats(cos[~pairs.within], pairs.same[~pairs.within])
    return SettingResult(
        kind, backbone, int(layer), int(resolution), len(cos), int(pairs.within.sum()),
        float(pairs.same.double().mean()), every.ap, within.ap, across.ap, every.precision,
        every.recall,
    )  # fmt: skip


def analyze(
    dataset: str,
    data_root: str | Path,
    *,
    split: str = "val",
    backbones: Sequence[str] = ("imgfocus-saliency-vits14",),
    layers: Sequence[int] | None = None,
    resolutions: Sequence[int] = (224,),
    checkpoint: str | Path | None = None,
    n_images: int | None = 60,
    n_pairs: int = 20000,
    min_purity: float = 0.5,
    within_fraction: float = 0.5,
    seed: int = 0,
    label_dir: str | Path | None = None,
    n_classes: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    echo: Callable[[str], Any] | None = print,
) -> Analysis:
    """Correspondence analysis of ``backbones`` x ``layers`` (None: each one's last block) x
    ``resolutions`` on a labelled split, plus the codes of ``checkpoint`` at each resolution.

    Images: ``n_images`` drawn with ``seed`` (None: all), shorter side resized to the resolution
    and centre-cropped to a square (the paper's protocol). Pairs are drawn once per patch grid
    with ``seed``, so every block of a backbone is scored on the same pairs. ``label_dir`` and
    ``n_classes`` describe a ``folder`` dataset's labels.
    """
    from stego.models.backbone import Backbone, build_backbone
    from stego.models.registry import get_spec, patch_size

    specs = {name: get_spec(name) for name in backbones}  # unknown names list the valid ones
    for name in specs:
        for res in resolutions:
            p = patch_size(name)
            if res < 1 or res % p:
                low, high = (res // p) * p, (res // p + 1) * p
                raise StegoError(
                    f"resolution {res} is not a multiple of the patch size {p} of {name}; "
                    f"use {f'{low} or ' if low else ''}{high}"
                )
    extra: dict[str, Any] = {}
    if dataset == "folder":
        split = "all"  # a folder has one split
        if label_dir is not None:
            if n_classes is None:
                raise StegoError(f"labels in {label_dir} need their class count: pass --classes")
            extra = {"label_dir": label_dir, "n_classes": n_classes}
    model = None
    if checkpoint is not None:
        from stego.eval.loading import load_for_eval

        model = load_for_eval(checkpoint, device=device).model.eval()
    nets: dict[str, list[Backbone]] = {}  # per backbone, one wrapper per block, weights shared
    for name in specs:
        with torch.random.fork_rng():  # a random backbone (tiny-vit) is the same every run
            torch.manual_seed(seed)
            base = build_backbone(name).to(device)
        blocks = list(layers) if layers is not None else [base.num_blocks]
        digest = base.weights_digest
        nets[name] = [
            Backbone(base.model, name=name, layer=b, weights_digest=digest) for b in blocks
        ]
    say = echo or (lambda _line: None)
    grids: dict[tuple[int, int], PatchPairs] = {}
    results: list[SettingResult] = []
    n_seen = 0

    def pairs_for(data: Any, res: int, patch: int) -> PatchPairs:
        if (res, patch) not in grids:
            label = torch.cat([
                patch_labels(lab.cpu(), patch, min_purity=min_purity).label
                for lab in _pass(data, batch_size, "cpu", labels=True)
            ])  # fmt: skip
            gen = torch.Generator().manual_seed(seed)
            grids[res, patch] = sample_pairs(
                label, n_pairs, within_fraction=within_fraction, generator=gen
            )
        return grids[res, patch]

    for res in resolutions:
        data = _build_data(dataset, data_root, split, res, extra, n_images, seed)
        n_seen = len(data)
        for name, blocks in nets.items():
            pairs = pairs_for(data, res, blocks[0].patch_size)
            encoders = [lambda x, net=net: net(x).feat for net in blocks]
            cosines = pair_cosines(encoders, _pass(data, batch_size, device), pairs)
            for net, cos in zip(blocks, cosines, strict=True):
                results.append(_score("feature", name, net.layer, res, cos, pairs))
                say(f"{results[-1].name}: AP {results[-1].ap:.3f}")
        if model is not None:
            pairs = pairs_for(data, res, model.patch_size)
            encoders = [lambda x: model.encode(x, flip=False)]
            (cos,) = pair_cosines(encoders, _pass(data, batch_size, device), pairs)
            bb = model.backbone
            results.append(_score("code", bb.name, bb.layer, res, cos, pairs))
            say(f"{results[-1].name}: AP {results[-1].ap:.3f}")
    results.sort(key=lambda s: (s.kind != "feature", s.backbone, s.layer, s.resolution))
    return Analysis(
        dataset, split, n_seen, seed, min_purity, within_fraction, results,
        None if checkpoint is None else str(checkpoint),
    )  # fmt: skip


def write_analysis(analysis: Analysis, out: str | Path) -> dict[str, Path]:
    """Write ``analysis.json``, ``analysis.csv`` and ``pr_curves.png`` to ``out``; their paths."""
    from stego.viz import pr_figure

    out = Path(out)
    paths = {name: out / name for name in ANALYSIS_FILES}
    rows = [s.to_dict() for s in analysis.settings]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["kind"])
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(paths["analysis.csv"], "w") as handle:
        handle.write(buffer.getvalue())
    curves = {f"{s.name} (AP {s.ap:.3f})": (s.recall, s.precision) for s in analysis.settings}
    rates = [s.positive_rate for s in analysis.settings]
    pr_figure(
        curves,
        paths["pr_curves.png"],
        chance=float(np.mean(rates)) if rates else None,
        title=f"same-class pairs, {analysis.dataset} / {analysis.split}, "
        f"{analysis.n_images} images",
    )
    with atomic_write(paths["analysis.json"], "w") as handle:  # last: its presence means done
        json.dump(analysis.to_dict(), handle, indent=2)
        handle.write("\n")
    return paths
