"""Figures logged during training: images, labels and the current cluster predictions.

Kept out of the training module so that the training loop stays readable (and matplotlib is only
imported when a figure is drawn).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["prediction_figure", "log_figure"]


def _colorize(ids: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) int ids (-1 = ignore, black) -> (H, W, 3) uint8."""
    out = np.zeros((*ids.shape, 3), dtype=np.uint8)
    valid = ids >= 0
    out[valid] = palette[ids[valid] % len(palette)]
    return out


def default_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours (golden-ratio hues)."""
    import matplotlib.colors as mcolors

    hues = (np.arange(n) * 0.618033988749895) % 1.0
    hsv = np.stack([hues, np.full(n, 0.75), np.full(n, 0.95)], axis=1)
    return (mcolors.hsv_to_rgb(hsv) * 255).astype(np.uint8)


def prediction_figure(images: Tensor, labels: Tensor | None, preds: Tensor,
                      palette: np.ndarray | None = None, title: str = "") -> Any:
    """A matplotlib Figure with one row per image: image | label | cluster prediction.

    images (B, 3, H, W) float in [0, 1]; labels (B, H, W) int64 (-1 ignore) or None;
    preds (B, H, W) int64 cluster ids, ideally already mapped to classes.
    """
    from matplotlib.figure import Figure

    n_ids = int(max(preds.max().item(), labels.max().item() if labels is not None else 0)) + 1
    pal = np.asarray(palette, dtype=np.uint8) if palette is not None else default_palette(n_ids)
    cols = 3 if labels is not None else 2
    rows = images.shape[0]
    fig = Figure(figsize=(2.2 * cols, 2.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        panels = [(images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), "image")]
        if labels is not None:
            panels.append((_colorize(labels[i].cpu().numpy(), pal), "label"))
        panels.append((_colorize(preds[i].cpu().numpy(), pal), "clusters"))
        for ax, (array, name) in zip(axes[i], panels, strict=False):
            ax.imshow(array, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def log_figure(loggers: list[Any], tag: str, figure: Any, step: int) -> None:
    """Send ``figure`` to every TensorBoard logger in ``loggers`` (others are skipped)."""
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure(tag, figure, global_step=step, close=False)
