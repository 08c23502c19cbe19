"""Fingerprints: what a neighbour table or feature cache was computed from.

A neighbour table or a feature cache is only valid for the exact (backbone, weights, layer,
dataset, split, crop type, resolution, image interpolation, ordered item list) that produced
it. The original STEGO code checked only the length of its tables, so a stale table silently
paired the wrong images. Here every artefact carries a fingerprint dict, and loading compares it
with what the caller expects; a mismatch names each differing part and prints the command that
rebuilds it.

Fingerprint keys (all JSON-serialisable):

* ``backbone``: registry name (``dino-vits8``), ``weights_digest``: short sha256 of the weights,
  ``layer``: block the features come from (1-based),
* ``dataset``, ``split``, ``crop_type`` (``none`` | ``five``), ``resolution`` (pixels),
* ``interpolation`` of the image resize (``bilinear`` | ``nearest``); fingerprints written
  before it was recorded were all bilinear and are read as such (:data:`FINGERPRINT_DEFAULTS`),
* ``num_items`` and ``items_sha256``: sha256 of the ordered item paths, each taken relative to
  the common folder of all of them (so moving the data root keeps the fingerprint).

Other keys (``data_root``, ``exclude_siblings``) are informational and never compared.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from stego.errors import StegoError

__all__ = [
    "FINGERPRINT_KEYS",
    "FINGERPRINT_DEFAULTS",
    "items_digest",
    "item_paths",
    "make_fingerprint",
    "backbone_fingerprint",
    "fingerprint_differences",
    "check_fingerprint",
    "rebuild_command",
    "artifact_dir",
    "default_cache_root",
]

FINGERPRINT_KEYS: tuple[str, ...] = (
    "backbone",
    "weights_digest",
    "layer",
    "dataset",
    "split",
    "crop_type",
    "resolution",
    "interpolation",
    "num_items",
    "items_sha256",
)
# The value of a key absent from a stored fingerprint: artefacts written before the key existed
# were computed that way, so they stay valid without a rebuild.
FINGERPRINT_DEFAULTS: dict[str, Any] = {"interpolation": "bilinear"}


def items_digest(paths: Sequence[str | os.PathLike[str]]) -> str:
    """sha256 (hex) of the ordered item paths, relative to their common folder."""
    strings = [os.fspath(p) for p in paths]
    if len(strings) > 1:
        try:
            common = os.path.commonpath(strings)
        except ValueError:  # mix of absolute and relative paths
            common = ""
        rel = [os.path.relpath(p, common) if common else p for p in strings]
    else:
        rel = [os.path.basename(p) for p in strings]
    h = hashlib.sha256()
    for p in rel:
        h.update(Path(p).as_posix().encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def item_paths(dataset: Dataset) -> list[str]:
    """Ordered item paths of ``dataset``.

    Cheap when the dataset has a ``paths`` attribute or a ``samples`` list whose entries have an
    ``image`` path (the stego datasets); otherwise reads every item's ``"path"``, which decodes
    every image (slow for big splits).
    """
    paths = getattr(dataset, "paths", None)
    if paths is not None and not callable(paths):
        return [os.fspath(p) for p in paths]
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, Sequence) and all(hasattr(s, "image") for s in samples):
        return [str(s.image) for s in samples]
    n = len(dataset)  # type: ignore[arg-type]
    out: list[str] = []
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, Mapping) or "path" not in item:
            raise StegoError(
                f"dataset item {i} has no 'path' entry; a stego dataset item must be a dict with "
                "'image', 'index' and 'path' (or give the dataset a `paths` attribute)"
            )
        out.append(os.fspath(item["path"]))
    return out


def make_fingerprint(
    *,
    backbone: str,
    weights_digest: str,
    layer: int | None,
    dataset: str,
    split: str,
    crop_type: str,
    resolution: int,
    paths: Sequence[str | os.PathLike[str]],
    data_root: str | os.PathLike[str] | None = None,
    interpolation: str = "bilinear",
) -> dict[str, Any]:
    """The fingerprint dict (see module docstring) of one computation."""
    fp: dict[str, Any] = {
        "backbone": str(backbone),
        "weights_digest": str(weights_digest),
        "layer": None if layer is None else int(layer),
        "dataset": str(dataset),
        "split": str(split),
        "crop_type": str(crop_type),
        "resolution": int(resolution),
        "interpolation": str(interpolation),
        "num_items": len(paths),
        "items_sha256": items_digest(paths),
    }
    if data_root is not None:
        fp["data_root"] = os.fspath(data_root)
    return fp


def backbone_fingerprint(
    backbone: Any,
    *,
    dataset: str,
    split: str,
    crop_type: str,
    resolution: int,
    paths: Sequence[str | os.PathLike[str]],
    data_root: str | os.PathLike[str] | None = None,
    interpolation: str = "bilinear",
) -> dict[str, Any]:
    """:func:`make_fingerprint` with ``name``, ``weights_digest``, ``layer`` of a Backbone."""
    return make_fingerprint(
        backbone=getattr(backbone, "name", type(backbone).__name__),
        weights_digest=getattr(backbone, "weights_digest", "unknown"),
        layer=getattr(backbone, "layer", None),
        dataset=dataset,
        split=split,
        crop_type=crop_type,
        resolution=resolution,
        paths=paths,
        data_root=data_root,
        interpolation=interpolation,
    )


def fingerprint_differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """One line ``"key: expected X, found Y"`` per compared key that differs.

    Only keys present in ``expected`` are compared, so a caller may check a partial fingerprint
    (for example only the backbone and dataset when the item list is not at hand). A key missing
    from ``found`` reads as its :data:`FINGERPRINT_DEFAULTS` value.
    """
    lines = []
    for key in FINGERPRINT_KEYS:
        if key not in expected:
            continue
        want, got = expected[key], found.get(key, FINGERPRINT_DEFAULTS.get(key, "<missing>"))
        if want != got:
            if key == "items_sha256" and isinstance(want, str) and isinstance(got, str):
                want, got = want[:12], got[:12]
                key = "items_sha256 (ordered item list)"
            lines.append(f"{key}: expected {want!r}, found {got!r}")
    return lines


def rebuild_command(fp: Mapping[str, Any], command: str = "knn") -> str:
    """The ``stego`` command line that rebuilds an artefact with fingerprint ``fp``."""
    parts = [f"stego {command}"]
    parts.append(f"--dataset {fp.get('dataset', 'DATASET')}")
    parts.append(f"--data-root {fp.get('data_root', 'DATA_ROOT')}")
    parts.append(f"--split {fp.get('split', 'SPLIT')}")
    parts.append(f"--backbone {fp.get('backbone', 'BACKBONE')}")
    if fp.get("layer") is not None:
        parts.append(f"--layer {fp['layer']}")
    if fp.get("crop_type") not in (None, "none"):
        parts.append(f"--crop-type {fp['crop_type']}")
    if fp.get("resolution") not in (None, 224):
        parts.append(f"--resolution {fp['resolution']}")
    if fp.get("interpolation") not in (None, "bilinear"):
        parts.append(f"--interpolation {fp['interpolation']}")
    return " ".join(parts)


def check_fingerprint(
    expected: Mapping[str, Any] | None,
    found: Mapping[str, Any],
    *,
    what: str,
    path: str | os.PathLike[str],
    command: str = "knn",
) -> None:
    """Raise :class:`StegoError` naming each differing part when ``found`` != ``expected``."""
    if expected is None:
        return
    diffs = fingerprint_differences(expected, found)
    if diffs:
        hint = {**found, **expected}
        raise StegoError(
            f"{what} {os.fspath(path)} was computed from something else: "
            + "; ".join(diffs)
            + f". Rebuild it with `{rebuild_command(hint, command)}` (or point to the right file)."
        )


def default_cache_root(data_root: str | os.PathLike[str]) -> Path:
    """``<data_root>/stego-cache`` when it exists or the data root is writable; otherwise (a
    read-only dataset) ``<user cache>/data/<folder name>-<sha256 of its absolute path, 8 hex>``
    under ``$STEGO_CACHE`` / ``$XDG_CACHE_HOME/stego`` / ``~/.cache/stego``."""
    from stego.models.offline_dinov2 import cache_dir as user_cache_dir

    root = Path(data_root).expanduser()
    inside = root / "stego-cache"
    if inside.is_dir() or not root.is_dir() or os.access(root, os.W_OK):
        return inside
    resolved = root.resolve()
    tag = hashlib.sha256(os.fsencode(resolved)).hexdigest()[:8]
    return user_cache_dir() / "data" / f"{resolved.name or 'root'}-{tag}"


def artifact_dir(
    data_root: str | os.PathLike[str],
    fp: Mapping[str, Any],
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Default folder of the artefacts (neighbour tables, feature cache) of a fingerprint.

    ``<cache_dir>/<dataset>/<split>_<crop>_<res>[_<interpolation>]/<backbone>_layer<L>_<digest8>/``
    with ``cache_dir`` defaulting to :func:`default_cache_root`. The interpolation is named only
    when it is not bilinear, so bilinear artefacts keep the folder they had before it was
    recorded, and a nearest run builds its own next to them instead of failing on theirs.
    """
    layer = "last" if fp.get("layer") is None else str(fp["layer"])
    digest = str(fp.get("weights_digest", "unknown"))[:8]
    base = Path(cache_dir) if cache_dir is not None else default_cache_root(data_root)
    interpolation = fp.get("interpolation", FINGERPRINT_DEFAULTS["interpolation"])
    suffix = "" if interpolation == FINGERPRINT_DEFAULTS["interpolation"] else f"_{interpolation}"
    return (
        base
        / str(fp["dataset"])
        / f"{fp['split']}_{fp['crop_type']}_{fp['resolution']}{suffix}"
        / f"{fp['backbone']}_layer{layer}_{digest}"
    )
