"""What training shows: the console (quiet libraries, one step bar, the artefacts line) and the
figures sent to TensorBoard (drawn by :mod:`stego.viz`).

Kept out of the training module so that the training loop stays readable.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
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
    from stego.features.build import disk_size

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


def log_figure(loggers: list[Any], tag: str, figure: Any, step: int) -> None:
    """Send ``figure`` to every TensorBoard logger in ``loggers`` (others are skipped)."""
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure(tag, figure, global_step=step, close=False)
