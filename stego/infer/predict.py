"""Predict label maps for folders of images of any size, streaming, resumable, crash-safe.

:func:`predict_paths` walks files and folders (recursively, sorted), reads every image Pillow
can open (grayscale, RGBA, palette, CMYK, 16-bit, EXIF-rotated), predicts each at its own
resolution and writes, under ``out_dir``:

- ``labels/<relative path>.png``: uint8 cluster ids (``probe="cluster"``: the unsupervised
  output), class ids of named clusters (``probe="class"``, the default once the model's
  clusters are named, :mod:`stego.naming`) or of the linear probe (``probe="linear"``, needs
  one), original size;
- ``overlays/<relative path>.png``: the colour map blended over the image (class ids: with a
  legend of the classes in the image below it);
- ``clusters/<relative path>.png``: the cluster ids as well, from the same backbone pass, with
  ``keep_clusters`` (``stego segment --labels``);
- ``clusters.json``: the legend, id -> RGB colour (and class name when known);
- ``skipped.txt``: unreadable images with the reason (only with ``skip_bad``; empty otherwise).

Every file is written atomically, so a rerun skips the images whose outputs exist. Images whose
shorter side exceeds ``max_side`` are downscaled for the network (attention cost grows with the
square of the number of patches) and the prediction is upsampled back to the original size.

Throughput: images are decoded in DataLoader worker processes (:mod:`stego.infer.loading`),
images whose padded network inputs have one size share a forward pass whatever their own sizes,
and PNGs are encoded in a writer thread while the network runs (:mod:`stego.infer.writing`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stego.atomic import atomic_write
from stego.errors import StegoError
from stego.infer.compute import (
    EncodedImage,
    Labelled,
    Scored,
    encode_paths,
    label_batch,
    refine,
    resize_for_network,
    score_batch,
)
from stego.infer.legend import legend
from stego.infer.loading import (
    ReadImage,
    default_workers,
    image_loader,
    padded_network_size,
    read_image_rgb,
    size_batches,
)
from stego.infer.writing import OutputStyle, OutputWriter, outputs_done, write_outputs
from stego.parallel import ONE_PROCESS, ProcessGroup

__all__ = [
    "PredictSummary",
    "collect_images",
    "EncodedImage",
    "encode_paths",
    "predict_paths",
    "read_image_rgb",
    "resize_for_network",
    "legend",
]


@dataclass
class PredictSummary:
    """What :func:`predict_paths` did."""

    out_dir: Path
    written: list[Path] = field(default_factory=list)  # source images predicted in this run
    existing: list[Path] = field(default_factory=list)  # skipped: outputs already there
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # bad images and why
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.written) / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------- paths


def _image_extensions() -> set[str]:
    from PIL import Image

    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def collect_images(
    inputs: Sequence[str | Path], *, exclude: Path | None = None
) -> list[tuple[Path, Path]]:
    """(source, relative output stem) pairs for files and folders (recursive, sorted).

    A folder's images keep their path relative to the folder; with several inputs each one's
    relative paths start with the input's own name. Files under ``exclude`` (the output folder)
    are ignored. Two images that would write the same output raise :class:`StegoError`.
    """
    if not inputs:
        raise StegoError("no input images given: pass image files or folders")
    extensions = _image_extensions()
    excluded = exclude.resolve() if exclude is not None else None
    pairs: list[tuple[Path, Path]] = []
    for entry in map(Path, inputs):
        prefix = Path(entry.name) if len(inputs) > 1 and entry.is_dir() else Path()
        if entry.is_file():
            pairs.append((entry, Path(entry.name)))
        elif entry.is_dir():
            found = sorted(
                p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in extensions
            )
            for path in found:
                if excluded is not None and excluded in path.resolve().parents:
                    continue
                pairs.append((path, prefix / path.relative_to(entry)))
        else:
            raise StegoError(f"input {entry} does not exist: pass image files or folders")
    seen: dict[Path, Path] = {}
    for source, rel in pairs:
        stem = rel.with_suffix(".png")
        if stem in seen:
            raise StegoError(
                f"{seen[stem]} and {source} would both write {stem}: rename one or "
                "predict them in separate runs"
            )
        seen[stem] = source
    return [(source, rel.with_suffix(".png")) for source, rel in pairs]


# ----------------------------------------------------------------------------- predicting

# Images grouped by network size within chunks of this many batches (stego.infer.loading): more
# share batches in mixed-size folders, and as many decoded images wait in memory.
CHUNK_BATCHES = 4


def predict_paths(
    model: Any,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    crf: bool = False,
    crf_workers: int | None = None,
    flip: bool = True,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    skip_bad: bool = False,
    progress: bool = True,
    probe: str | None = None,
    max_side: int | None = 1024,
    num_workers: int | None = None,
    write_threads: int = 1,
    encoded: Sequence[EncodedImage] = (),
    group: ProcessGroup = ONE_PROCESS,
    keep_clusters: bool = False,
) -> PredictSummary:
    """Predict every image of ``inputs`` (files / folders) into ``out_dir`` (see module doc).

    ``model`` is a :class:`stego.models.segmenter.Segmenter`. Images are decoded ahead by
    ``num_workers`` processes (None: :func:`stego.infer.loading.default_workers`; 0: in this
    one); images whose padded network inputs share a size are batched (``batch_size``) even
    when their own sizes differ; outputs are encoded by ``write_threads`` threads (0: inline).
    ``max_side`` bounds the shorter side fed to the network (None: native size). ``encoded``:
    codes already computed by :func:`encode_paths` (same ``max_side`` and ``flip``); those
    images are labelled from them without the backbone (without CRF only). Bad images
    raise :class:`StegoError` naming the file, or with ``skip_bad`` are listed in the summary
    and ``skipped.txt``; existing outputs are kept. ``group``: processes sharing the work.
    ``keep_clusters`` (``probe="class"`` only): write the cluster ids to ``clusters/`` as well,
    from the same backbone pass (and the same CRF, which then runs twice).
    """
    probe = probe or model.default_probe()
    if probe not in ("class", "cluster", "linear"):
        raise StegoError(f"unknown probe {probe!r}; valid: class, cluster, linear")
    if probe == "class" and model.classes is None:
        raise StegoError("probe='class' needs named clusters (stego name); use probe='cluster'")
    if probe == "linear" and model.linear_probe is None:
        raise StegoError("probe='linear' needs a model with a linear probe; use probe='cluster'")
    if keep_clusters and probe != "class":
        raise StegoError("keep_clusters writes the cluster ids beside class ids: probe='class'")
    if batch_size < 1:
        raise StegoError(f"batch_size must be >= 1, got {batch_size}")
    num_workers = default_workers() if num_workers is None else num_workers
    out_dir = Path(out_dir)
    start = time.perf_counter()
    items = collect_images(inputs, exclude=out_dir)
    summary = PredictSummary(out_dir=out_dir)
    entries = legend(model, probe)
    style = OutputStyle(
        np.array([e["color"] for e in entries], dtype=np.uint8).reshape(-1, 3),
        names=list(model.classes.names) if probe == "class" else None,
        with_clusters=keep_clusters,
    )
    finished = [outputs_done(out_dir, rel, style.folders) for _, rel in items]
    todo = [item for item, done in zip(items, finished, strict=True) if not done]
    summary.existing = [source for (source, _), done in zip(items, finished, strict=True) if done]
    chunk = CHUNK_BATCHES * batch_size
    todo = group.stretch(todo, chunk)  # whole chunks each: the same batches as one process
    with atomic_write(out_dir / "clusters.json", "w") as handle:
        json.dump({"probe": probe, "ids": entries}, handle, indent=2)
    model = model.to(device).eval()
    run = _Run(summary, todo, style, len(todo), progress)
    # two batches' writes may wait: one batch's being encoded while the next is handed in
    with OutputWriter(write_threads, max_pending=2 * batch_size) as writer:
        indices: Sequence[int] = range(len(todo))
        if encoded and not crf:  # label these from their codes, without the backbone
            indices = _write_encoded(model, encoded, todo, run, writer, probe, device)
        stream = image_loader([todo[i][0] for i in indices], num_workers)
        stream = (ReadImage(indices[r.index], r.image, r.error) for r in stream)
        # CRF inputs wait until enough gather to keep every CRF worker busy (bounded memory)
        crf_queue: list[Scored] = []
        crf_chunk = max(batch_size, 2 * (crf_workers or 1))

        def key(image: np.ndarray) -> tuple[int, int]:  # the backbone's input size
            return padded_network_size(*image.shape[:2], max_side, model.patch_size)

        for batch in size_batches(stream, batch_size, chunk, key):
            if batch[0].image is None:
                if not skip_bad:
                    raise StegoError(batch[0].error)
                summary.skipped.append((todo[batch[0].index][0], batch[0].error))
                run.show()
                continue
            kw = dict(
                flip=flip,
                device=device,
                probe=probe,
                max_side=max_side,
                keep_clusters=keep_clusters,
            )
            if not crf:
                run.write(writer, label_batch(model, batch, **kw))
                continue
            crf_queue.extend(score_batch(model, batch, **kw))
            if len(crf_queue) >= crf_chunk:
                run.write(writer, refine(crf_queue, crf_workers))
                crf_queue = []
        if crf_queue:
            run.write(writer, refine(crf_queue, crf_workers))
    if progress and todo:
        print(file=sys.stderr)
    order = {source: i for i, (source, _) in enumerate(todo)}
    summary.written.sort(key=order.__getitem__)  # written as the writer finished them
    summary.written, summary.skipped = group.concat(summary.written), group.concat(summary.skipped)
    if skip_bad or summary.skipped:
        with atomic_write(out_dir / "skipped.txt", "w") as handle:
            handle.writelines(f"{path}\t{reason}\n" for path, reason in summary.skipped)
    summary.seconds = time.perf_counter() - start
    return summary


@dataclass
class _Run:
    """What one :func:`predict_paths` call writes and counts."""

    summary: PredictSummary
    todo: list[tuple[Path, Path]]
    style: OutputStyle
    total: int
    progress: bool

    def write(self, writer: OutputWriter, labelled: list[Labelled]) -> None:
        """Hand each image's outputs to ``writer``; counted as written once on disk."""
        for item in labelled:
            source, rel = self.todo[item.index]
            args = (self.summary.out_dir, rel, item.image, item.labels, self.style, item.clusters)
            writer.submit(source, write_outputs, *args, done=self.on_written(source))

    def on_written(self, source: Path) -> Callable[[], None]:
        """What to do once the outputs of ``source`` are on disk: count it."""

        def done() -> None:
            self.summary.written.append(source)  # list.append is atomic: safe from threads
            self.show()

        return done

    def show(self) -> None:
        """The one progress line (this process's images)."""
        if self.progress:
            done = len(self.summary.written) + len(self.summary.skipped)
            print(f"\rpredict: {done}/{self.total} images", end="", file=sys.stderr, flush=True)


def _write_encoded(
    model: Any,
    encoded: Sequence[EncodedImage],
    todo: list[tuple[Path, Path]],
    run: _Run,
    writer: OutputWriter,
    probe: str,
    device: str | torch.device,
) -> list[int]:
    """Write the ``todo`` images that have codes in ``encoded`` (decoded again in the writer,
    for the overlay); returns the positions in ``todo`` of the others."""
    by_path = {Path(e.path): e for e in encoded}
    rest = []
    for index, (source, rel) in enumerate(todo):
        entry = by_path.get(Path(source))
        if entry is None:
            rest.append(index)
            continue
        feat = entry.found.feat
        found = entry.found._replace(  # (1, D, h, w) codes, (1, C, h, w) features
            code=entry.found.code.to(device), feat=None if feat is None else feat.to(device)
        )
        ids = model.ids_from_code(found, size=entry.size, probe=probe)[0].cpu().numpy()
        clusters = None
        if run.style.with_clusters:
            clusters = model.ids_from_code(found, size=entry.size, probe="cluster")[0]
            clusters = clusters.cpu().numpy()
        args = (run.summary.out_dir, rel, source, ids, run.style, clusters)
        writer.submit(source, _write_read, *args, done=run.on_written(source))
    return rest


def _write_read(
    out_dir: Path,
    rel: Path,
    source: Path,
    labels: np.ndarray,
    style: OutputStyle,
    clusters: np.ndarray | None,
) -> None:
    """:func:`write_outputs` of the image at ``source``, read here."""
    write_outputs(out_dir, rel, read_image_rgb(source), labels, style, clusters)
