"""Naming clusters from a few labelled images: read a LABELS folder, count, take the majority.

A LABELS folder holds label PNGs for any subset of the segmented images (same relative path
and stem as the image, ``.png``; class id per pixel, 255 = void) and ``classes.txt`` (one class
name a line, line i = id i). Each cluster is named after the class most of its labelled pixels
have; a cluster no labelled pixel falls in takes the class of the labelled cluster whose
centroid is nearest (cosine), so every pixel gets a class.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stego.errors import StegoError
from stego.models.class_map import ClassMap
from stego.naming.names import class_colors, read_classes_txt

__all__ = [
    "VOID",
    "LabelSet",
    "read_label_set",
    "read_label",
    "check_labels",
    "count_pairs",
    "majority_class_map",
]

VOID = 255  # label value of unlabelled pixels


@dataclass
class LabelSet:
    """The label files of a LABELS folder, matched to the segmented images."""

    root: Path
    names: list[str]  # class id -> name, from classes.txt
    files: dict[Path, Path]  # relative output path of an image (".png") -> its label file


def read_label_set(labels_dir: str | Path, rels: list[Path]) -> LabelSet:
    """Match the label PNGs under ``labels_dir`` to the images whose outputs are ``rels``
    (relative paths ending in ``.png``): by relative path, else by file stem when that stem is
    unique among the images. A label file that matches no image is an error naming it."""
    root = Path(labels_dir).expanduser()
    if not root.is_dir():
        raise StegoError(f"labels folder {root} does not exist: pass the folder of label PNGs")
    names = read_classes_txt(root / "classes.txt")
    by_rel = {Path(r): Path(r) for r in rels}
    stems: dict[str, list[Path]] = {}
    for rel in rels:
        stems.setdefault(Path(rel).stem, []).append(Path(rel))
    files: dict[Path, Path] = {}
    for path in sorted(root.rglob("*.png")):
        rel = path.relative_to(root)
        match = by_rel.get(rel) or (
            stems[rel.stem][0] if len(stems.get(rel.stem, [])) == 1 else None
        )
        if match is None:
            raise StegoError(
                f"label file {path} matches no segmented image: give it the relative path and "
                "stem of its image (a/b.png labels a/b.jpg), or remove it from the labels folder"
            )
        if match in files:
            raise StegoError(f"{files[match]} and {path} both label the image {match}; keep one")
        files[match] = path
    if not files:
        raise StegoError(
            f"{root} holds no label PNG: add a PNG of class ids (255 = void) for some images"
        )
    return LabelSet(root, names, files)


def read_label(path: Path, n_classes: int, shape: tuple[int, int]) -> np.ndarray:
    """Class ids (H, W) int64 of a label PNG (void: -1), checked against the image ``shape``
    (H, W) and the class count."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise StegoError(
                    f"{path} is a {image.mode} image: label PNGs hold one class id per pixel "
                    "(8-bit grayscale or palette), not colours"
                )
            label = np.asarray(image).astype(np.int64)
    except OSError as exc:
        raise StegoError(f"cannot read label file {path} ({exc}); replace it") from exc
    if label.shape != tuple(shape):
        raise StegoError(
            f"{path} is {label.shape[1]}x{label.shape[0]} but its image is {shape[1]}x{shape[0]}: "
            "labels must have their image's size (resize with nearest-neighbour)"
        )
    outside = np.unique(label[(label != VOID) & ((label < 0) | (label >= n_classes))])
    if outside.size:
        raise StegoError(
            f"{path} holds class ids {outside[:10].tolist()} outside the {n_classes} classes of "
            f"classes.txt (ids 0-{n_classes - 1}, {VOID} = void); add the classes or fix the file"
        )
    return np.where(label == VOID, -1, label)


def check_labels(labels_dir: str | Path, images: list[tuple[Path, Path]]) -> LabelSet:
    """Check a LABELS folder against the images to segment, (source, relative output path)
    pairs, before any work: every label file matches an image, has its size and known ids."""
    from PIL import Image, ImageOps

    label_set = read_label_set(labels_dir, [rel for _, rel in images])
    sources = {rel: source for source, rel in images}
    for rel, path in label_set.files.items():
        with Image.open(sources[rel]) as image:
            width, height = ImageOps.exif_transpose(image).size  # as the image is read
        read_label(path, len(label_set.names), (height, width))
    return label_set


def count_pairs(
    clusters: np.ndarray, label: np.ndarray, n_clusters: int, n_classes: int
) -> np.ndarray:
    """(K, C) int64 counts of labelled pixels per (cluster, class) for one image: clusters and
    label (H, W), void (-1) pixels left out."""
    keep = label >= 0
    pairs = clusters[keep].astype(np.int64) * n_classes + label[keep]
    return np.bincount(pairs, minlength=n_clusters * n_classes).reshape(n_clusters, n_classes)


def majority_class_map(
    counts: np.ndarray,
    names: list[str],
    centroids: np.ndarray,
    *,
    labelled_images: int,
    source: str,
) -> ClassMap:
    """Name each cluster after its labelled pixels' majority class.

    ``counts``: (K, C) labelled pixels per (cluster, class), summed over the labelled images;
    ``centroids``: (K, D) the cluster probe's centroids, to name clusters without labelled
    pixels after the nearest labelled one. Warns about classes no cluster is named after.
    """
    labelled = counts.sum(1) > 0  # (K,)
    if not labelled.any():
        raise StegoError(f"no labelled pixel in {source} (all void?): label some pixels")
    mapping = counts.argmax(1)
    unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True).clip(1e-12)
    similar = unit @ unit[labelled].T  # (K, n_labelled)
    borrowed = np.flatnonzero(labelled)[similar.argmax(1)]
    mapping = np.where(labelled, mapping, mapping[borrowed])
    fit = {
        "method": "majority",
        "labelled_images": int(labelled_images),
        "labelled_pixels": int(counts.sum()),
        "source": source,
        "clusters_without_labels": np.flatnonzero(~labelled).tolist(),
        "unnamed_classes": _unnamed(counts, names, mapping, source),
    }
    return ClassMap(list(names), class_colors(list(names)), mapping.tolist(), fit)


def _unnamed(counts: np.ndarray, names: list[str], mapping: np.ndarray, source: str) -> list[str]:
    """Names of the classes no cluster was named after (never predicted), each with a warning
    saying why and what to do."""
    shown = counts.sum(0) > 0  # (C,)
    missing = [k for k in range(len(names)) if k not in set(mapping.tolist())]
    for k in missing:
        if not shown[k]:
            why = f"no labelled pixel of {source} shows it; label an image that does"
        else:
            why = (
                f"it is the majority of no cluster ({int(counts[:, k].sum())} labelled pixels); "
                "segment with more --clusters, or label more of it"
            )
        warnings.warn(f"class {names[k]!r} (id {k}) will never be predicted: {why}", stacklevel=3)
    return [names[k] for k in missing]
