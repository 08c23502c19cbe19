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
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from stego.atomic import atomic_write
from stego.errors import StegoError
from stego.infer.images import (
    collect_images,
    inside,
    network_input,
    read_image_rgb,
    resize_for_network,
)
from stego.infer.legend import legend
from stego.parallel import ONE_PROCESS, ProcessGroup
from stego.viz import overlay

if TYPE_CHECKING:
    from stego.models.segmenter import PaddedCode

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


# ----------------------------------------------------------------------------- loading


class _ImageFiles(torch.utils.data.Dataset):
    """Reads images in DataLoader workers; a failure is returned, not raised, so the main
    process decides whether to stop or to skip."""

    def __init__(self, items: list[tuple[Path, Path]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return index, read_image_rgb(self.items[index][0]), ""
        except StegoError as exc:
            return index, None, str(exc)


def _as_is(item: Any) -> Any:
    """Collate function that keeps numpy images as they are (module level: picklable)."""
    return item


def _loader(
    items: list[tuple[Path, Path]], num_workers: int
) -> Iterator[tuple[int, np.ndarray | None, str]]:
    """Images in order, read ahead by ``num_workers`` processes (bounded prefetch)."""
    loader = torch.utils.data.DataLoader(
        _ImageFiles(items),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_is,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    yield from loader


def _batches(
    stream: Iterator[tuple[int, np.ndarray | None, str]], batch_size: int
) -> Iterator[list[tuple[int, np.ndarray | None, str]]]:
    """Group consecutive same-size images into batches of at most ``batch_size``; an unreadable
    image is a batch of its own."""
    pending: list[tuple[int, np.ndarray | None, str]] = []
    for item in stream:
        image = item[1]
        if pending and (
            image is None
            or pending[0][1] is None
            or len(pending) >= batch_size
            or pending[0][1].shape != image.shape
        ):
            yield pending
            pending = []
        pending.append(item)
    if pending:
        yield pending


# ----------------------------------------------------------------------------- predicting


class EncodedImage(NamedTuple):
    """One image's codes as prediction computes them (:func:`encode_paths`)."""

    path: Path
    size: tuple[int, int]  # (H, W) of the image itself
    found: PaddedCode  # batch of one, at the network size


@torch.no_grad()
def encode_paths(
    model: Any,
    paths: Sequence[str | Path],
    *,
    max_side: int | None = 1024,
    flip: bool = True,
    device: str | torch.device = "cpu",
    skip_bad: bool = False,
    with_features: bool | None = None,
) -> list[EncodedImage]:
    """The codes :func:`predict_paths` computes for these images before the probes (same network
    size, padding and flip average), one entry per readable image; pass them back to
    :func:`predict_paths` (``encoded``) to label those images without a second backbone pass.
    ``with_features``: keep the backbone features too (None: when the model's classes need
    them, :attr:`stego.models.segmenter.Segmenter.needs_features`).

    An unreadable image raises :class:`StegoError` naming the file, or is left out with
    ``skip_bad``.
    """
    model = model.to(device).eval()
    features = model.needs_features if with_features is None else with_features
    found = []
    for path in map(Path, paths):
        try:
            array = read_image_rgb(path)
        except StegoError:
            if skip_bad:
                continue
            raise
        image = torch.from_numpy(array).to(device).permute(2, 0, 1)[None].float() / 255.0
        with torch.inference_mode():
            codes = model.encode_any(
                network_input(image, max_side), flip=flip, with_features=features
            )
        found.append(EncodedImage(path, (array.shape[0], array.shape[1]), codes))
    return found


def _maps(
    model: Any,
    images: Tensor,
    *,
    flip: bool,
    probes: tuple[str, ...],
    max_side: int | None,
    crf: bool,
) -> list[Tensor]:
    """For images (B, 3, H, W) in [0, 1], at their own size, one map per probe, all from one
    backbone pass: log-probabilities (B, K, H, W) when the CRF needs them, else ids (B, H, W)
    (the same argmax, computed more cheaply)."""
    height, width = images.shape[-2:]
    net_in = network_input(images, max_side)
    if not crf:
        ids = model.predict_probes(net_in, flip=flip, size=(height, width), probes=probes)
        return [ids[p] for p in probes]
    out = model(net_in, flip=flip, size=(height, width))
    maps = {"class": out.class_log_probs, "linear": out.linear_log_probs}
    maps["cluster"] = out.cluster_log_probs
    if "linear" in probes and out.linear_log_probs is None:
        raise StegoError("probe='linear' needs a model with a linear probe; use probe='cluster'")
    return [maps[p] for p in probes]


def _refine(
    images: list[np.ndarray], log_probs: list[Tensor], workers: int | None
) -> list[np.ndarray]:
    """Dense-CRF labels, each (H, W) int64, for images (H, W, 3) uint8 and log_probs (K, H, W).

    The images may differ in size; ``workers`` processes run them in parallel (None: all CPUs).
    """
    from stego.infer.crf import dense_crf_batch

    probs = [lp.exp().float().cpu().numpy() for lp in log_probs]  # (K, H, W) each
    refined = dense_crf_batch(images, probs, workers=workers)
    return [q.argmax(0) for q in refined]


def _id_png(ids: np.ndarray) -> Image.Image:
    """(H, W) ids as a PNG image: uint8, uint16 above 255 ids."""
    return Image.fromarray(ids.astype(np.uint8 if ids.max(initial=0) < 256 else np.uint16))


@dataclass
class _Outputs:
    """How every image's outputs are written."""

    out_dir: Path
    probes: tuple[str, ...]  # labels/ from the first; clusters/ from a second ("cluster")
    colours: np.ndarray  # (n_ids, 3) uint8 of the first probe's ids
    names: list[str] | None = None  # class names: overlays get a legend of those shown
    alpha: float = 0.5

    def subs(self) -> tuple[str, ...]:
        return ("labels", "overlays", "clusters")[: 1 + len(self.probes)]

    def done(self, rel: Path) -> bool:
        return all(inside(self.out_dir, Path(sub) / rel).is_file() for sub in self.subs())

    def write(self, rel: Path, image: np.ndarray, ids: list[np.ndarray]) -> None:
        """labels/<rel>, overlays/<rel> (and clusters/<rel>) of one image, each atomically;
        ``ids``: (H, W) per probe."""
        from stego.viz import with_legend

        blended = overlay(image, ids[0], self.colours, self.alpha)
        if self.names is not None:
            shown = np.flatnonzero(np.bincount(ids[0].ravel(), minlength=len(self.names)))
            blended = with_legend(blended, [(self.names[k], self.colours[k]) for k in shown])
        pictures = [Image.fromarray(blended), _id_png(ids[0])] + [_id_png(i) for i in ids[1:]]
        # zlib level 1: the photo-like overlay encodes 3x faster (18 vs 58 ms at 480x360) for
        # 6% more bytes; at the default level its encoding cost a quarter of a no-CRF prediction.
        for sub, picture in zip(("overlays", "labels", "clusters"), pictures, strict=False):
            with atomic_write(inside(self.out_dir, Path(sub) / rel)) as handle:
                picture.save(handle, format="PNG", compress_level=1)


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
    num_workers: int = 2,
    encoded: Sequence[EncodedImage] = (),
    group: ProcessGroup = ONE_PROCESS,
    keep_clusters: bool = False,
) -> PredictSummary:
    """Predict every image of ``inputs`` (files / folders) into ``out_dir`` (see module doc).

    ``model`` is a :class:`stego.models.segmenter.Segmenter`. Images are read ahead by
    ``num_workers`` processes; consecutive images of one size are batched (``batch_size``),
    others run alone.
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
    if keep_clusters and probe != "class":
        raise StegoError("keep_clusters writes the cluster ids beside class ids: probe='class'")
    if batch_size < 1:
        raise StegoError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    start = time.perf_counter()
    items = collect_images(inputs, exclude=out_dir)
    summary = PredictSummary(out_dir=out_dir)
    entries = legend(model, probe)
    outputs = _Outputs(
        out_dir,
        (probe, "cluster") if keep_clusters else (probe,),
        np.array([e["color"] for e in entries], dtype=np.uint8).reshape(-1, 3),
        names=list(model.classes.names) if probe == "class" else None,
    )
    todo = []
    for source, rel in items:
        (summary.existing.append(source) if outputs.done(rel) else todo.append((source, rel)))
    todo = group.stretch(todo, batch_size)  # whole batches each
    with atomic_write(out_dir / "clusters.json", "w") as handle:
        json.dump({"probe": probe, "ids": entries}, handle, indent=2)
    model = model.to(device).eval()
    total = len(todo)
    if encoded and not crf:
        todo = _write_encoded(model, encoded, todo, summary, outputs)
    # CRF inputs wait here until enough images gather to keep every worker busy (bounded memory)
    crf_queue: list[tuple[int, np.ndarray, list[Tensor]]] = []
    crf_chunk = max(batch_size, 2 * (crf_workers or 1))
    for batch in _batches(_loader(todo, num_workers), batch_size):
        ready = _predict_batch(
            model,
            batch,
            todo,
            summary,
            flip=flip,
            device=device,
            skip_bad=skip_bad,
            probes=outputs.probes,
            max_side=max_side,
            crf=crf,
        )
        if crf:
            crf_queue.extend(ready)
            if len(crf_queue) >= crf_chunk:
                _finish(summary, todo, crf_queue, outputs, crf=True, crf_workers=crf_workers)
                crf_queue = []
        else:
            _finish(summary, todo, ready, outputs, crf=False, crf_workers=crf_workers)
        if progress:
            done = len(summary.written) + len(summary.skipped)
            print(f"\rpredict: {done}/{total} images", end="", file=sys.stderr, flush=True)
    _finish(summary, todo, crf_queue, outputs, crf=crf, crf_workers=crf_workers)
    if progress and todo:
        print(file=sys.stderr)
    summary.written, summary.skipped = group.concat(summary.written), group.concat(summary.skipped)
    if skip_bad or summary.skipped:
        with atomic_write(out_dir / "skipped.txt", "w") as handle:
            handle.writelines(f"{path}\t{reason}\n" for path, reason in summary.skipped)
    summary.seconds = time.perf_counter() - start
    return summary


def _write_encoded(
    model: Any,
    encoded: Sequence[EncodedImage],
    todo: list[tuple[Path, Path]],
    summary: PredictSummary,
    outputs: _Outputs,
) -> list[tuple[Path, Path]]:
    """Write the ``todo`` images that have codes in ``encoded``; returns the rest of ``todo``."""
    by_path = {Path(e.path): e for e in encoded}
    rest = []
    for source, rel in todo:
        entry = by_path.get(Path(source))
        if entry is None:
            rest.append((source, rel))
            continue
        ids = [  # (H, W) each
            model.ids_from_code(entry.found, size=entry.size, probe=p)[0].cpu().numpy()
            for p in outputs.probes
        ]
        outputs.write(rel, read_image_rgb(source), ids)
        summary.written.append(source)
    return rest


def _predict_batch(
    model: Any,
    batch: list[tuple[int, np.ndarray | None, str]],
    todo: list[tuple[Path, Path]],
    summary: PredictSummary,
    *,
    flip: bool,
    device: str | torch.device,
    skip_bad: bool,
    probes: tuple[str, ...],
    max_side: int | None,
    crf: bool,
) -> list[tuple[int, np.ndarray, list[Tensor]]]:
    """One batch of same-size images: [(index, image (H, W, 3) uint8, per probe log_probs
    (K, H, W) for the CRF or ids (H, W), on the CPU)]; an unreadable image raises or is
    recorded as skipped."""
    index, first, reason = batch[0]
    if first is None:
        if not skip_bad:
            raise StegoError(reason)
        summary.skipped.append((todo[index][0], reason))
        return []
    arrays = np.stack([item[1] for item in batch])  # (B, H, W, 3) uint8
    images = torch.from_numpy(arrays).to(device).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        maps = _maps(model, images, flip=flip, probes=probes, max_side=max_side, crf=crf)
    return [
        (item[0], array, [m[b].cpu() for m in maps])
        for b, (item, array) in enumerate(zip(batch, arrays, strict=True))
    ]


def _finish(
    summary: PredictSummary,
    todo: list[tuple[Path, Path]],
    ready: list[tuple[int, np.ndarray, list[Tensor]]],
    outputs: _Outputs,
    *,
    crf: bool,
    crf_workers: int | None,
) -> None:
    """Turn log-probabilities into ids (argmax, or CRF then argmax) and write the outputs."""
    if not ready:
        return
    images = [r[1] for r in ready]
    if crf:  # each probe's maps refined on their own: (H, W) ids per image, per probe
        per_probe = [
            _refine(images, [r[2][j] for r in ready], crf_workers)
            for j in range(len(outputs.probes))
        ]
    else:  # ids already
        per_probe = [[r[2][j].numpy() for r in ready] for j in range(len(outputs.probes))]
    for i, (index, image, _) in enumerate(ready):
        outputs.write(todo[index][1], image, [ids[i] for ids in per_probe])
        summary.written.append(todo[index][0])
