"""``stego name``: turn the cluster ids of a ``stego segment`` RESULTS folder into classes.

Either from a few labelled images (majority naming, :mod:`stego.naming.labels`) or from names
given by hand (:mod:`stego.naming.names`). Only the cluster id PNGs, the cluster centroids and
the images are read: the backbone never runs, so naming a folder takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stego.errors import StegoError
from stego.models.class_map import ClassMap
from stego.naming.labels import count_pairs, majority_class_map, read_label, read_label_set
from stego.naming.names import hand_class_map
from stego.naming.render import ResultsLayout, relative_pngs, render_results

__all__ = ["read_results", "name_results", "fit_majority"]


def read_results(results_dir: str | Path) -> ResultsLayout:
    """The layout of a RESULTS folder written by ``stego segment`` (named or not)."""
    from stego.infer.predict import collect_images

    root = Path(results_dir).expanduser()
    summary_path = root / "summary.json"
    if not summary_path.is_file():
        raise StegoError(
            f"{root} has no summary.json: pass the output folder of `stego segment` (or rerun "
            "that command to finish it)"
        )
    summary = json.loads(summary_path.read_text())
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        raise StegoError(f"{model_dir} is missing: rerun `stego segment` to finish {root}")
    config = json.loads((model_dir / "config.json").read_text())
    clusters_dir = root / "clusters" if (root / "clusters").is_dir() else root / "labels"
    rels = list(relative_pngs(clusters_dir)) if clusters_dir.is_dir() else []
    if not rels:
        raise StegoError(f"{clusters_dir} holds no label PNG: rerun `stego segment` to finish it")
    input_dir = Path(summary.get("input", ""))
    sources = {}
    if input_dir.is_dir():
        sources = {rel: src for src, rel in collect_images([input_dir], exclude=root)}
    return ResultsLayout(
        root=root,
        clusters_dir=clusters_dir,
        model_dir=model_dir,
        rels=rels,
        sources=sources,
        n_clusters=int(config["meta"]["n_clusters"]),
        summary=summary,
    )


def _centroids(model_dir: Path) -> np.ndarray:
    """The cluster probe's centroids (K, D), read from the weights without building the model."""
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))["cluster_probe.clusters"]


def fit_majority(layout: ResultsLayout, labels_dir: str | Path) -> ClassMap:
    """Majority naming of the clusters of ``layout`` from the label PNGs of ``labels_dir``."""
    from PIL import Image

    label_set = read_label_set(labels_dir, layout.rels)
    n_classes = len(label_set.names)
    counts = np.zeros((layout.n_clusters, n_classes), dtype=np.int64)
    for rel, path in sorted(label_set.files.items()):
        with Image.open(layout.clusters_dir / rel) as im:
            clusters = np.asarray(im).astype(np.int64)  # (H, W) cluster ids
        label = read_label(path, n_classes, clusters.shape)  # (H, W) class ids, void -1
        counts += count_pairs(clusters, label, layout.n_clusters, n_classes)
    return majority_class_map(
        counts,
        label_set.names,
        _centroids(layout.model_dir),
        labelled_images=len(label_set.files),
        source=str(label_set.root),
    )


def name_results(
    results_dir: str | Path,
    *,
    labels: str | Path | None = None,
    names: dict[int, str] | None = None,
    progress: bool = True,
) -> ClassMap:
    """Name the clusters of a ``stego segment`` output and rewrite it (see
    :func:`stego.naming.render.render_results`); returns the class map, also saved as
    ``RESULTS/model/classes.json`` so that ``stego.load(RESULTS/model).predict`` gives class ids.

    ``labels``: a LABELS folder (label PNGs for some images, ``classes.txt``); ``names``:
    cluster id -> name (clusters sharing a name merge; unnamed ones keep "cluster N"). Exactly
    one of the two. Calling it again re-derives everything from ``RESULTS/clusters/``.
    """
    if (labels is None) == (names is None):
        raise StegoError("name the clusters either from labels (--labels) or by hand (--names)")
    layout = read_results(results_dir)
    if names is not None:
        text = ",".join(f"{k}={v}" for k, v in sorted(names.items()))
        class_map = hand_class_map(names, layout.n_clusters, source=text)
    else:
        class_map = fit_majority(layout, labels)
    render_results(layout, class_map, progress=progress)
    return class_map
