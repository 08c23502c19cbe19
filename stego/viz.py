"""Figures of an evaluation: colour-coded label maps, confusion matrix, example grid, IoU bars,
precision-recall curves (`stego analyze`).

Pure functions of arrays; no model, no dataset. Matplotlib runs on the non-interactive Agg
backend (works headless, never opens a window), and every figure is rendered into memory and
then written with :func:`stego.atomic.atomic_write`, so a crash never leaves a half-written PNG.
Palettes are ``(K, 3)`` uint8 RGB arrays (row k = colour of class k); label maps are ``(H, W)``
integer arrays where any value outside ``[0, K)`` (e.g. ``IGNORE = -1``) is drawn black.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from stego.atomic import atomic_write
from stego.errors import StegoError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

__all__ = [
    "Example",
    "default_palette",
    "colorize",
    "prediction_figure",
    "overlay",
    "legend_strip",
    "with_legend",
    "contact_sheet",
    "save_png",
    "confusion_figure",
    "examples_grid",
    "iou_bars",
    "pr_figure",
]


class Example(NamedTuple):
    """One evaluated image for figures (all at label resolution H x W).

    image: (H, W, 3) uint8 RGB; label: (H, W) int64 class ids (-1 ignore);
    cluster: (H, W) int64 cluster prediction mapped to classes (-1 = unmatched cluster);
    linear: (H, W) int64 linear-probe prediction, or None without a linear probe.
    """

    image: np.ndarray
    label: np.ndarray
    cluster: np.ndarray
    linear: np.ndarray | None
    name: str = ""


def _figure(width: float, height: float) -> Figure:
    """A figure not registered with pyplot (no global state, no GUI backend needed)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save_figure(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to PNG in memory, then write it atomically; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    path = Path(path)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return path


def _palette(palette: Any) -> np.ndarray:
    pal = np.asarray(palette)
    if pal.ndim != 2 or pal.shape[1] != 3 or len(pal) == 0:
        raise StegoError(f"a palette must be (K, 3) RGB colours, got shape {pal.shape}")
    return np.clip(pal, 0, 255).astype(np.uint8)


def default_palette(n: int) -> np.ndarray:
    """n distinct RGB colours (n, 3) uint8: golden-ratio hues, alternating brightness.

    The colours of ids that have no class colour (clusters of an unlabelled model, classes of a
    dataset without a palette), the same in predictions, evaluations, reports and training logs.
    """
    colours = [
        colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.75, 1.0 if k % 2 == 0 else 0.7)
        for k in range(n)
    ]
    return (np.array(colours, dtype=np.float64).reshape(n, 3) * 255 + 0.5).astype(np.uint8)


def colorize(labels: np.ndarray, palette: Any) -> np.ndarray:
    """(H, W) integer labels -> (H, W, 3) uint8 RGB; labels outside [0, K) are black."""
    pal = _palette(palette)
    lab = np.asarray(labels).astype(np.int64)
    valid = (lab >= 0) & (lab < len(pal))
    out = pal[np.where(valid, lab, 0)]  # (H, W, 3)
    out[~valid] = 0
    return out


def overlay(image: np.ndarray, labels: np.ndarray, palette: Any, alpha: float = 0.5) -> np.ndarray:
    """Blend label colours over an (H, W, 3) uint8 image; ignored pixels keep the image.

    Returns (H, W, 3) uint8 = (1 - alpha) * image + alpha * colour on labelled pixels.
    """
    img = np.asarray(image)
    lab = np.asarray(labels)
    if img.shape[:2] != lab.shape or img.ndim != 3 or img.shape[2] != 3:
        raise StegoError(
            f"overlay needs an (H, W, 3) image and (H, W) labels, got {img.shape} and {lab.shape}"
        )
    colours = colorize(lab, palette).astype(np.float32)
    blend = (1.0 - alpha) * img.astype(np.float32) + alpha * colours
    valid = ((lab >= 0) & (lab < len(_palette(palette))))[..., None]
    return np.where(valid, np.clip(blend + 0.5, 0, 255), img).astype(np.uint8)


def legend_strip(
    width: int, entries: Sequence[tuple[str, Sequence[int]]], row: int = 16
) -> np.ndarray:
    """A white (h, width, 3) uint8 band listing ``entries`` (name, [r, g, b]) as colour swatches
    followed by their names, wrapped onto as many rows of ``row`` pixels as needed."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    spans = [row + 4 + int(measure.textlength(name, font=font)) + 10 for name, _ in entries]
    places, x, y = [], 4, 0
    for span in spans:
        if x > 4 and x + span > width:
            x, y = 4, y + row
        places.append((x, y))
        x += span
    band = Image.new("RGB", (width, y + row + 2), "white")
    draw = ImageDraw.Draw(band)
    for (name, colour), (x, y) in zip(entries, places, strict=True):
        draw.rectangle([x, y + 3, x + row - 4, y + row - 1], fill=tuple(int(c) for c in colour))
        draw.text((x + row, y + 3), name, fill="black", font=font)
    return np.asarray(band)


def with_legend(image: np.ndarray, entries: Sequence[tuple[str, Sequence[int]]]) -> np.ndarray:
    """(H, W, 3) uint8 image with :func:`legend_strip` of ``entries`` below: (H + h, W, 3)."""
    if not entries:
        return image
    return np.concatenate([image, legend_strip(image.shape[1], entries)], axis=0)


def contact_sheet(
    paths: Sequence[str | Path],
    *,
    entries: Sequence[tuple[str, Sequence[int]]] = (),
    thumb: int = 160,
    cols: int = 4,
) -> np.ndarray | None:
    """A grid of thumbnails (at most ``thumb`` pixels a side) of the image files ``paths``, with
    a legend of ``entries`` (name, [r, g, b]) below when given: (H, W, 3) uint8; None without
    paths."""
    from PIL import Image

    if not paths:
        return None
    rows = (len(paths) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * thumb, rows * thumb), "white")
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((thumb, thumb))
            sheet.paste(im, ((i % cols) * thumb, (i // cols) * thumb))
    return with_legend(np.asarray(sheet), entries)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) or (H, W) uint8 array as a PNG file, atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    path = Path(path)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return path


def _row_labels(
    assignment: np.ndarray | None, n_rows: int, class_names: Sequence[str]
) -> list[str]:
    if assignment is None:
        return [class_names[i] if i < len(class_names) else f"cluster {i}" for i in range(n_rows)]
    return [
        f"{class_names[a]} (c{i})" if a >= 0 else f"extra c{i}" for i, a in enumerate(assignment)
    ]


def confusion_figure(
    confusion: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    *,
    assignment: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Plot a (n_clusters, n_classes) confusion (rows = cluster, cols = class) as a heat map.

    Drawn transposed: one row per true class, one column per predicted cluster, each row
    normalised to sum to 1 (recall). With ``assignment`` ((n_clusters,) cluster -> class,
    -1 unmatched), columns are ordered by matched class, unmatched clusters last, so a good
    model shows a bright diagonal.
    """
    conf = np.asarray(confusion, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[1] != len(class_names):
        raise StegoError(
            f"confusion must be (n_clusters, {len(class_names)}), got shape {conf.shape}"
        )
    labels = _row_labels(assignment, conf.shape[0], class_names)
    order = np.arange(conf.shape[0])
    if assignment is not None:
        keys = np.where(np.asarray(assignment) >= 0, assignment, conf.shape[1] + order)
        order = np.argsort(keys, kind="stable")
    shown = conf[order].T  # (n_classes, n_clusters)
    with np.errstate(invalid="ignore", divide="ignore"):
        shown = np.nan_to_num(shown / shown.sum(1, keepdims=True))
    n_cls, n_clu = shown.shape
    size = max(4.0, 0.35 * max(n_cls, n_clu) + 2.5)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(n_clu), [labels[i] for i in order], rotation=90, fontsize=7)
    ax.set_yticks(range(n_cls), list(class_names), fontsize=7)
    ax.set_xlabel("predicted (matched class, cluster id)")
    ax.set_ylabel("true class")
    ax.set_title(title or "confusion (each row sums to 1)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save_figure(fig, path)


def examples_grid(
    examples: Sequence[Example], palette: Any, class_names: Sequence[str], path: str | Path
) -> Path:
    """Grid with one row per example: image | label | cluster prediction | linear prediction.

    The prediction columns use class colours (clusters mapped to classes by the Hungarian
    assignment; unmatched clusters black). A legend of the class colours sits below.
    """
    if not examples:
        raise StegoError("examples_grid needs at least one example")
    has_linear = any(e.linear is not None for e in examples)
    titles = ["image", "label", "cluster (matched)"] + (["linear probe"] if has_linear else [])
    n_rows, n_cols = len(examples), len(titles)
    fig = _figure(2.4 * n_cols, 2.4 * n_rows + 0.8)
    for r, example in enumerate(examples):
        panels = [
            example.image,
            colorize(example.label, palette),
            colorize(example.cluster, palette),
        ]
        if has_linear:
            blank = np.zeros_like(example.image)
            linear = example.linear
            panels.append(colorize(linear, palette) if linear is not None else blank)
        for c, panel in enumerate(panels):
            ax = fig.add_subplot(n_rows, n_cols, r * n_cols + c + 1)
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    _legend(fig, palette, class_names)
    return _save_figure(fig, path)


def _legend(fig: Figure, palette: Any, class_names: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    pal = _palette(palette)
    handles = [
        Patch(facecolor=pal[k] / 255.0, edgecolor="black", label=name)
        for k, name in enumerate(class_names)
        if k < len(pal)
    ]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(6, len(handles)),
        fontsize=7,
        frameon=False,
        bbox_to_anchor=(0.5, -0.02 * math.ceil(len(handles) / 6)),
    )


def _series(iou_by_class: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Normalise the two accepted forms to {series: {class: value}}."""
    values = list(iou_by_class.values())
    if values and all(isinstance(v, Mapping) for v in values):
        return {str(k): {str(c): _num(x) for c, x in v.items()} for k, v in iou_by_class.items()}
    return {"IoU": {str(c): _num(x) for c, x in iou_by_class.items()}}


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def iou_bars(iou_by_class: Mapping[str, Any], path: str | Path, *, title: str = "") -> Path:
    """Horizontal bar chart of per-class IoU (x100).

    ``iou_by_class`` is ``{class_name: iou}`` for one series, or ``{series_name: {class_name:
    iou}}`` (e.g. ``{"cluster": ..., "linear": ...}``) for grouped bars. NaN / None (class
    absent) is drawn as no bar and labelled "n/a".
    """
    series = _series(iou_by_class)
    names = list(next(iter(series.values())).keys()) if series else []
    if not names:
        raise StegoError("iou_bars needs at least one class")
    n, k = len(names), len(series)
    fig = _figure(7.0, 0.3 * n * k + 1.2)
    ax = fig.add_subplot(1, 1, 1)
    height = 0.8 / k
    y = np.arange(n)
    for j, (label, values) in enumerate(series.items()):
        vals = np.array([values.get(c, float("nan")) for c in names], dtype=np.float64)
        pos = y + (j - (k - 1) / 2) * height
        ax.barh(pos, np.nan_to_num(vals), height=height, label=label)
        for p, v in zip(pos, vals, strict=True):
            ax.text(
                1.0 if np.isnan(v) else v + 1.0,
                p,
                "n/a" if np.isnan(v) else f"{v:.1f}",
                va="center",
                fontsize=7,
            )
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("IoU (%)")
    ax.set_title(title or "per-class IoU")
    if k > 1:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save_figure(fig, path)


def pr_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    *,
    chance: float | None = None,
    title: str = "",
) -> Path:
    """Precision-recall curves, one per entry ``{legend label: (recall (T,), precision (T,))}``.

    Colours are :func:`default_palette`'s; ``chance`` (the positive rate, the precision of a blind
    scorer) is drawn as a dotted line.
    """
    if not curves:
        raise StegoError("pr_figure needs at least one curve")
    colours = default_palette(len(curves)) / 255.0
    fig = _figure(8.5, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    for colour, (label, (recall, precision)) in zip(colours, curves.items(), strict=True):
        ax.plot(np.asarray(recall), np.asarray(precision), color=colour, lw=1.2, label=label)
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=1.0, label=f"chance ({chance:.3f})")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title or "precision-recall", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    return _save_figure(fig, path)


def prediction_figure(
    images: Tensor,
    labels: Tensor | None,
    preds: Tensor,
    palette: np.ndarray | None = None,
    title: str = "",
) -> Figure:
    """One row per image: image | label | cluster prediction (for training logs).

    images (B, 3, H, W) float in [0, 1]; labels (B, H, W) int64 (-1 ignore) or None;
    preds (B, H, W) int64 cluster ids, ideally already mapped to classes.
    """
    n_ids = int(max(preds.max().item(), labels.max().item() if labels is not None else 0)) + 1
    pal = _palette(palette) if palette is not None else default_palette(n_ids)
    cols = 3 if labels is not None else 2
    rows = images.shape[0]
    fig = _figure(2.2 * cols, 2.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        panels = [(images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), "image")]
        if labels is not None:
            panels.append((colorize(labels[i].cpu().numpy(), pal), "label"))
        panels.append((colorize(preds[i].cpu().numpy(), pal), "clusters"))
        for ax, (array, name) in zip(axes[i], panels, strict=False):
            ax.imshow(array, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
