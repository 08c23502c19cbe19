"""The one reader of a RESULTS folder (the ``--out`` of ``stego segment``), for ``stego view``
and ``stego export``.

What it reads (written by :mod:`stego.segment` and :mod:`stego.naming`):

- ``summary.json``: the settings (number of clusters), the input folder, the images skipped;
- ``clusters/<rel>.png``: cluster ids; before the clusters are named there is no ``clusters/``
  and ``labels/<rel>.png`` holds the cluster ids;
- ``model/classes.json``: the class map (names, colours, cluster -> class), when named.

Class ids are the class map applied to the cluster ids (:meth:`Results.class_ids`), the rule
:func:`stego.naming.name_results` writes ``labels/`` by, so the page, the exports and the naming
agree; classes fit by a pixel classifier (``stego segment --labels``) are not a function of the
cluster, so the exports read the class ids it wrote to ``labels/`` (the page, which names
clusters, shows the class shares of the clusters' majority classes). Unnamed results get one
class per cluster, named "cluster N".
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stego.atomic import atomic_write
from stego.errors import StegoError
from stego.naming import ClassMap, read_class_map, read_results
from stego.naming.render import ResultsLayout, relative_pngs
from stego.viz import default_palette

__all__ = ["Results", "ClusterCounts", "open_results", "unnamed_classes", "cluster_counts"]

MAX_CLUSTERS = 256  # label maps the page reads are 8-bit PNGs


@dataclass
class Results:
    """A checked RESULTS folder: its images (label maps) in sorted order and its class map."""

    layout: ResultsLayout  # where things are, as stego.naming reads them
    classes: ClassMap  # the saved class map, or "cluster N" names when unnamed
    named: bool  # model/classes.json exists

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def summary(self) -> dict[str, Any]:
        return self.layout.summary

    @property
    def rels(self) -> Sequence[Path]:
        """Each image's label map, relative to labels/ (``a/b.png``), sorted."""
        return self.layout.rels

    @property
    def n_clusters(self) -> int:
        return self.layout.n_clusters

    def source(self, index: int) -> Path | None:
        """The segmented image file of image ``index``; None when it is not there any more."""
        path = self.layout.sources.get(self.layout.rels[index])
        return path if path is not None and path.is_file() else None

    def cluster_path(self, index: int) -> Path:
        return self.layout.clusters_dir / self.layout.rels[index]

    def cluster_ids(self, index: int) -> np.ndarray:
        """(H, W) int64 cluster ids of image ``index``."""
        path = self.cluster_path(index)
        ids = _read_id_map(path)
        if ids.ndim != 2 or (ids.size and ids.max() >= self.n_clusters):
            raise StegoError(
                f"{path} is not a map of the {self.n_clusters} clusters of {self.root} (shape "
                f"{ids.shape}, largest id {ids.max(initial=0)}); rerun stego segment into a "
                "new --out"
            )
        return ids

    def class_ids(self, index: int) -> np.ndarray:
        """(H, W) int64 class ids of image ``index``: the class map applied to its clusters, or
        the ids a pixel classifier wrote to ``labels/``."""
        if self.classes.classifier is None:
            return class_lookup(self.classes)[self.cluster_ids(index)]
        path = self.root / "labels" / self.layout.rels[index]
        ids = _read_id_map(path)
        if ids.ndim != 2 or (ids.size and ids.max() >= len(self.classes.names)):
            raise StegoError(
                f"{path} is not a map of the {len(self.classes.names)} classes of {self.root}; "
                "rerun stego segment --labels, or name the clusters again (stego name)"
            )
        return ids

    def class_pixels(self, counts: ClusterCounts) -> np.ndarray:
        """(N, C) int64 pixels of each class in each image: from the cluster ``counts``, or
        from ``labels/`` for classes a pixel classifier wrote there."""
        if self.classes.classifier is None:
            return counts.class_pixels(self.classes)
        n = len(self.classes.names)
        return np.stack(
            [np.bincount(self.class_ids(i).ravel(), minlength=n) for i in range(len(self.rels))]
        )

    def image_rgb(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8: the segmented image, or its overlay when the image moved."""
        from stego.data.readers import read_image

        source = self.source(index)
        return np.asarray(read_image(source or self.root / "overlays" / self.layout.rels[index]))

    def image_name(self, index: int) -> str:
        """The image's path relative to the segmented folder (``a/b.jpg``); the label map's
        (``a/b.png``) when the image moved."""
        rel, source = self.layout.rels[index], self.source(index)
        return (rel.with_suffix(source.suffix) if source is not None else rel).as_posix()

    def reload_classes(self) -> None:
        """Read ``model/classes.json`` again (after a save)."""
        self.layout = read_results(self.root)  # the first save moves the cluster ids to clusters/
        saved = read_class_map(self.layout.model_dir)
        self.named = saved is not None
        self.classes = saved if saved is not None else unnamed_classes(self.n_clusters)


def class_lookup(classes: ClassMap) -> np.ndarray:
    """(K,) int64: ``class_lookup(c)[cluster_ids]`` gives class ids."""
    return np.asarray(classes.mapping, dtype=np.int64)


def unnamed_classes(n_clusters: int) -> ClassMap:
    """One class per cluster, "cluster N", in the colours ``stego segment`` drew it."""
    return ClassMap(
        names=[f"cluster {c}" for c in range(n_clusters)],
        colors=default_palette(n_clusters).tolist(),
        mapping=list(range(n_clusters)),
        fit={"method": "none"},
    )


def _check_files(layout: ResultsLayout) -> None:
    """Exactly one label map per segmented image (and the same in labels/ and clusters/), else
    say which are missing or extra."""
    root, rels, summary = layout.root, list(layout.rels), layout.summary
    if layout.clusters_dir.name == "clusters":
        labels = list(relative_pngs(root / "labels")) if (root / "labels").is_dir() else []
        if labels != rels:
            odd = sorted(set(labels) ^ set(rels))[:3]
            raise StegoError(
                f"{root / 'clusters'} and {root / 'labels'} hold different images (e.g. "
                f"{', '.join(map(str, odd))}); name the clusters again (stego name) to rewrite both"
            )
    expected = int(summary.get("n_images", len(rels))) - len(summary.get("skipped") or [])
    if len(rels) < expected:
        missing = sorted(set(layout.sources) - set(rels))[:3]
        example = f" (e.g. {', '.join(map(str, missing))})" if missing else ""
        raise StegoError(
            f"{layout.clusters_dir} holds {len(rels)} label maps but {expected} images were "
            f"segmented{example}: the run was interrupted or files were deleted; rerun the same "
            f"`stego segment {summary.get('input', 'INPUT')} --out {root}` to finish it"
        )
    if len(rels) > expected:
        extra = sorted(set(rels) - set(layout.sources))[:3] if layout.sources else []
        example = f" (e.g. {', '.join(map(str, extra))})" if extra else ""
        raise StegoError(
            f"{layout.clusters_dir} holds {len(rels)} label maps but only {expected} images were "
            f"segmented: extra files{example} were added; remove them (or segment again into a "
            "new --out)"
        )


def open_results(path: str | Path) -> Results:
    """Read and check a RESULTS folder; raises :class:`StegoError` saying what is wrong."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise StegoError(f"results folder {root} does not exist: pass the --out of stego segment")
    try:
        layout = read_results(root)
    except (ValueError, KeyError, TypeError) as exc:
        raise StegoError(
            f"{root} is not a `stego segment` output: its summary.json or model/config.json "
            f"cannot be read ({exc}); pass the --out of stego segment, or rerun it"
        ) from exc
    if not 2 <= layout.n_clusters <= MAX_CLUSTERS:
        raise StegoError(
            f"{root} has {layout.n_clusters} clusters; stego view and export read 2 to 256"
        )
    _check_files(layout)
    saved = read_class_map(layout.model_dir)
    if saved is not None and len(saved.mapping) != layout.n_clusters:
        raise StegoError(
            f"{layout.model_dir / 'classes.json'} maps {len(saved.mapping)} clusters but the "
            f"results have {layout.n_clusters}; name the clusters again (stego name)"
        )
    classes = saved if saved is not None else unnamed_classes(layout.n_clusters)
    return Results(layout=layout, classes=classes, named=saved is not None)


# ----------------------------------------------------------------------------- derived, cached


def cache_dir(results: Results) -> Path:
    """Where thumbnails and the pixel counts are kept: ``RESULTS/work/view``, or a folder in
    ``~/.cache/stego/view`` when the results are read-only."""
    local = results.root / "work" / "view"
    try:
        local.mkdir(parents=True, exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    except OSError:
        pass
    key = hashlib.sha256(str(results.root.resolve()).encode()).hexdigest()[:16]
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stego" / "view" / key
    home.mkdir(parents=True, exist_ok=True)
    return home


@dataclass
class ClusterCounts:
    """Pixels of each cluster in each image, and each image's size."""

    pixels: np.ndarray  # (N, K) int64
    sizes: np.ndarray  # (N, 2) int64: height, width

    def class_pixels(self, classes: ClassMap) -> np.ndarray:
        """(N, C) int64 pixels of each class in each image."""
        out = np.zeros((len(self.pixels), len(classes.names)), dtype=np.int64)
        np.add.at(out.T, class_lookup(classes), self.pixels.T)
        return out


def _stats(paths: list[Path]) -> np.ndarray:
    return np.array([[(s := p.stat()).st_mtime_ns, s.st_size] for p in paths], dtype=np.int64)


def cluster_counts(results: Results, *, progress: bool = False) -> ClusterCounts:
    """Per-image cluster pixel counts; read from each label map once, then kept in the cache
    (``counts.npz``) and recomputed only for label maps that changed."""
    from tqdm import tqdm

    paths = [results.cluster_path(i) for i in range(len(results.rels))]
    stats = _stats(paths)
    names = np.array([str(r) for r in results.rels])
    k = results.n_clusters
    pixels, sizes = np.zeros((len(paths), k), np.int64), np.zeros((len(paths), 2), np.int64)
    todo = np.ones(len(paths), dtype=bool)
    cached = cache_dir(results) / "counts.npz"
    if cached.is_file():
        with np.load(cached) as stored:
            old = {key: stored[key] for key in stored.files}  # each access would unzip again
        if old["pixels"].shape[1] == k:
            row = {name: j for j, name in enumerate(old["names"].tolist())}
            for i, name in enumerate(names.tolist()):
                j = row.get(name)
                if j is not None and (old["stats"][j] == stats[i]).all():
                    pixels[i], sizes[i], todo[i] = old["pixels"][j], old["sizes"][j], False
    if todo.any():
        indices = np.flatnonzero(todo).tolist()
        shown = progress and len(indices) > 100
        for i in tqdm(indices, desc="counting cluster pixels (once)", disable=not shown):
            ids = results.cluster_ids(i)
            pixels[i] = np.bincount(ids.ravel(), minlength=k)
            sizes[i] = ids.shape
        with atomic_write(cached) as handle:
            np.savez(handle, names=names, stats=stats, pixels=pixels, sizes=sizes)
    return ClusterCounts(pixels=pixels, sizes=sizes)


def _read_id_map(path: Path) -> np.ndarray:
    """(H, W) int64 ids of a written label map; an unreadable file raises naming it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im).astype(np.int64)
    except OSError as exc:
        raise StegoError(f"cannot read the label map {path} ({exc}); rerun stego segment") from exc
