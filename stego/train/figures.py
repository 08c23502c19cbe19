"""What training shows: the console (quiet libraries, one step bar) and TensorBoard figures.

Kept out of the training module so that the training loop stays readable (and matplotlib is only
imported when a figure is drawn).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

__all__ = [
    "prediction_figure",
    "log_figure",
    "quiet_libraries",
    "step_progress",
    "report_artifacts",
    "keep_csv_log",
]

# Library notices that say nothing about the user's run. Matched by message, so any other
# warning (a real problem) still shows.
_NOISE = (
    # torch.utils._pytree deprecation raised by Lightning's own code, not ours
    r".*isinstance\(treespec, LeafSpec\)",
    # cached batches are loaded in-process on purpose (a memory-mapped read of a few ms)
    r".*does not have many workers which may be a bottleneck",
    # our step sampler is infinite by design: an epoch has no length
    r".*The number of training batches \(.*\) is smaller than the logging interval",
    # --resume: the folders are expected to hold the run's files (the CSV log is moved aside
    # first, see keep_csv_log)
    r"Checkpoint directory .* exists and is not empty",
    r"Experiment logs directory .* exists and is not empty",
)
# Their banners (accelerator availability, a cloud-logger tip, "max_steps reached", checkpoint
# defaults) are INFO records of these loggers.
_CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric")


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Hide the libraries' informational banners and known harmless notices inside the block.

    Lightning's loggers are raised to WARNING and the few notices of ``_NOISE`` are ignored; both
    are restored on exit. ``verbose=True`` changes nothing (everything shows).
    """
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for pattern in _NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        for lg in loggers:
            lg.setLevel(max(lg.level, logging.WARNING))
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def report_artifacts(root: Path, table: Path, cached: bool, had: tuple[bool, bool]) -> None:
    """One line on the feature cache and neighbour table: reused, or built now (size, where)."""
    from stego.atomic import format_bytes
    from stego.train.pairs import disk_size

    size = format_bytes(disk_size(root / "features") + disk_size(root)) if cached else ""
    if cached and all(had):
        print(f"reusing the feature cache and neighbour table ({size}) in {root}")
    elif cached:
        print(f"feature cache and neighbour table ready ({size}) in {root}; later runs reuse them")
    elif had[1]:
        print(f"reusing the neighbour table {table}; live backbone every step (no feature cache)")
    else:
        print(f"neighbour table written to {table}; live backbone every step (no feature cache)")


def keep_csv_log(folder: Path) -> None:
    """Move the interrupted run's ``metrics.csv`` to ``metrics-partN.csv``: Lightning's CSV
    logger deletes an existing ``metrics.csv`` when a run resumes."""
    current = folder / "metrics.csv"
    if current.is_file():
        n = 1 + len(list(folder.glob("metrics-part*.csv")))
        current.rename(folder / f"metrics-part{n}.csv")


def step_progress(total: int) -> Any:
    """A Lightning callback showing one bar over the run's optimisation steps (with ETA/loss).

    Lightning's own bar counts batches of an epoch, which an infinite step sampler does not have.
    """
    import lightning as L
    from tqdm.auto import tqdm

    class StepProgress(L.Callback):
        bar: Any = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.is_global_zero:
                self.bar = tqdm(
                    total=total, initial=trainer.global_step, desc="training", unit="step"
                )

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *_: Any) -> None:
            if self.bar is None:
                return
            self.bar.update(trainer.global_step - self.bar.n)
            loss = trainer.callback_metrics.get("loss")
            if loss is not None:
                self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._close()

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            self._close()

        def _close(self) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return StepProgress()


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
