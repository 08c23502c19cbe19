"""What an evaluation produces and the files it leaves in its output folder.

:class:`EvalResult` is returned by :func:`stego.eval.protocol.evaluate`; :func:`write_outputs`
writes it to ``out/``: ``metrics.json`` (:data:`METRICS_FILE`, scores, settings and provenance;
written last, so its presence means the evaluation finished), ``confusion.png``, ``iou.png``,
``examples.png`` and ``examples.npz`` (:data:`EXAMPLES_FILE`, the example arrays, pickle-free).
:mod:`stego.eval.report` rebuilds its HTML page from these two files alone.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stego.atomic import atomic_write
from stego.eval.metrics import Scores
from stego.viz import Example, confusion_figure, examples_grid, iou_bars

__all__ = [
    "EXAMPLES_FILE",
    "METRICS_FILE",
    "EvalResult",
    "format_table",
    "load_examples",
    "metrics_dict",
    "save_examples",
    "write_outputs",
]

METRICS_FILE = "metrics.json"
EXAMPLES_FILE = "examples.npz"


@dataclass
class EvalResult:
    """Scores of one evaluation plus a few examples for figures.

    cluster: Hungarian-matched cluster-probe :class:`~stego.eval.metrics.Scores`.
    linear: linear-probe scores (identity assignment), None without a linear probe.
    examples: the first ``n_figure_images`` images with label and predictions (classes).
    """

    cluster: Scores
    linear: Scores | None
    examples: list[Example]
    n_images: int
    class_names: list[str]
    crf: bool
    flip: bool
    extra_clusters: int
    rule: str
    settings: dict[str, Any] = field(default_factory=dict)


def _nan_to_none(value: float) -> float | None:
    return None if value is None or math.isnan(float(value)) else round(float(value), 4)


def _scores_dict(scores: Scores, names: Sequence[str]) -> dict[str, Any]:
    iou = np.asarray(scores.iou, dtype=np.float64)[: len(names)]
    return {
        "accuracy": _nan_to_none(scores.accuracy),
        "miou": _nan_to_none(scores.miou),
        "iou": {name: _nan_to_none(v) for name, v in zip(names, iou, strict=True)},
        "n_pixels": int(scores.n_pixels),
        "assignment": [int(a) for a in scores.assignment],
        "confusion": np.asarray(scores.confusion).astype(int).tolist(),
    }


def metrics_dict(result: EvalResult, **info: Any) -> dict[str, Any]:
    """The ``metrics.json`` content: scores (NaN -> null) plus ``info`` (split, checkpoint...)."""
    data: dict[str, Any] = {
        "cluster": _scores_dict(result.cluster, result.class_names),
        "crf": result.crf,
        "flip": result.flip,
        "rule": result.rule,
        "extra_clusters": result.extra_clusters,
        "n_images": result.n_images,
        "class_names": result.class_names,
    }
    if result.linear is not None:
        data["linear"] = _scores_dict(result.linear, result.class_names)
    data.update(info)
    return data


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def format_table(result: EvalResult) -> str:
    """Terminal table: class | IoU cluster | IoU linear, then accuracy and mIoU rows."""
    width = max(12, *(len(n) for n in result.class_names)) + 2
    linear = result.linear
    lines = [f"{'class':<{width}}{'IoU cluster':>12}{'IoU linear':>12}"]
    for k, name in enumerate(result.class_names):
        lin = float(linear.iou[k]) if linear is not None else None
        lines.append(f"{name:<{width}}{_fmt(float(result.cluster.iou[k])):>12}{_fmt(lin):>12}")
    lines.append("-" * (width + 24))
    for label, attr in (("accuracy", "accuracy"), ("mIoU", "miou")):
        lin = getattr(linear, attr) if linear is not None else None
        lines.append(f"{label:<{width}}{_fmt(getattr(result.cluster, attr)):>12}{_fmt(lin):>12}")
    return "\n".join(lines)


def save_examples(examples: Sequence[Example], path: str | Path) -> Path:
    """Store examples in a pickle-free ``.npz`` (sizes may differ between examples)."""
    arrays: dict[str, np.ndarray] = {"names": np.array([e.name for e in examples], dtype=str)}
    for i, e in enumerate(examples):
        arrays[f"image_{i}"], arrays[f"label_{i}"] = e.image, e.label
        arrays[f"cluster_{i}"] = e.cluster
        if e.linear is not None:
            arrays[f"linear_{i}"] = e.linear
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    path = Path(path)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return path


def load_examples(path: str | Path) -> list[Example]:
    """Read examples written by :func:`save_examples`."""
    with np.load(path, allow_pickle=False) as data:
        names = [str(n) for n in data["names"]]
        return [
            Example(
                data[f"image_{i}"],
                data[f"label_{i}"],
                data[f"cluster_{i}"],
                data[f"linear_{i}"] if f"linear_{i}" in data.files else None,
                name,
            )
            for i, name in enumerate(names)
        ]


def write_outputs(result: EvalResult, out: str | Path, palette: np.ndarray, **info: Any) -> Path:
    """Write metrics.json, confusion.png, iou.png, examples.png and examples.npz to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = metrics_dict(result, palette=np.asarray(palette).astype(int).tolist(), **info)
    names = result.class_names
    confusion_figure(
        result.cluster.confusion,
        names,
        out / "confusion.png",
        assignment=result.cluster.assignment,
        title="cluster probe (Hungarian)",
    )
    series = {"cluster": data["cluster"]["iou"]}
    if "linear" in data:
        series["linear"] = data["linear"]["iou"]
    iou_bars(series, out / "iou.png")
    if result.examples:
        examples_grid(result.examples, palette, names, out / "examples.png")
        save_examples(result.examples, out / EXAMPLES_FILE)
    with atomic_write(out / METRICS_FILE, "w") as handle:  # last: its presence = finished
        json.dump(data, handle, indent=2)
    return out / METRICS_FILE
