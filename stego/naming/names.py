"""Class names from text: ``classes.txt`` of a LABELS folder, and names given by hand.

Hand naming (``stego name RESULTS --names "0=sky,1=road,2=road"``) needs no label at all:
clusters given the same name become one class; clusters not named keep "cluster N".
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from stego.errors import StegoError
from stego.models.class_map import ClassMap

__all__ = ["parse_names", "read_classes_txt", "hand_class_map", "class_colors"]

# "3: road" and "3 road" both name class 3 on a line of classes.txt or of a names file
_NUMBERED = re.compile(r"^\s*(\d+)\s*[:= ]\s*(\S.*?)\s*$")


def class_colors(names: list[str]) -> list[list[int]]:
    """Colours of classes (n, 3): the dataset's own colours when the names are those of a known
    dataset (CamVid, Cityscapes, ...), else the default palette."""
    from stego.data.registry import DATASETS
    from stego.viz import default_palette

    for info in DATASETS.values():
        known = list(info.class_names)
        if len(info.palette) and known and all(n in known for n in names):
            return [info.palette[known.index(n)].tolist() for n in names]
    return default_palette(len(names)).tolist()


def read_classes_txt(path: str | Path) -> list[str]:
    """Class names of a ``classes.txt``: one name a line, line i = class id i. Lines written as
    "i name" (CamVid's file) are accepted when their numbers are 0, 1, 2, ... in order."""
    path = Path(path)
    if not path.is_file():
        raise StegoError(
            f"{path} is missing: a LABELS folder needs classes.txt, one class name a line "
            "(line i = class id i)"
        )
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise StegoError(f"{path} names no class: write one class name a line")
    numbered = [_NUMBERED.match(line) for line in lines]
    if all(numbered) and [int(m.group(1)) for m in numbered] == list(range(len(lines))):
        lines = [m.group(2) for m in numbered]
    if len(set(lines)) != len(lines):
        twice = sorted({n for n in lines if lines.count(n) > 1})
        raise StegoError(f"{path} names {twice} more than once: each class needs its own name")
    return lines


def parse_names(text_or_path: str | Path) -> dict[int, str]:
    """Cluster id -> name from ``"0=sky,1=road"`` or from a YAML file ``{0: sky, 1: road}``."""
    path = Path(str(text_or_path)).expanduser()
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
        return _names_file(path)
    names: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in str(text_or_path).split(","))):
        key, sep, name = item.partition("=")
        if not sep or not key.strip().isdigit() or not name.strip():
            raise StegoError(
                f"cannot read {item!r} in --names: write cluster=name pairs separated by "
                'commas, e.g. "0=sky,1=road,2=road", or pass a YAML file {0: sky, 1: road}'
            )
        _add(names, int(key), name.strip(), "--names")
    if not names:
        raise StegoError('--names is empty: e.g. --names "0=sky,1=road"')
    return names


def _names_file(path: Path) -> dict[int, str]:
    import yaml

    if not path.is_file():
        raise StegoError(f"names file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StegoError(
            f"{path} is not valid YAML ({exc}); write e.g. {{0: sky, 1: road}}"
        ) from exc
    if not isinstance(data, dict) or not data:
        raise StegoError(f"{path} must map cluster ids to names, e.g. {{0: sky, 1: road}}")
    names: dict[int, str] = {}
    for key, name in data.items():
        if not str(key).strip().isdigit() or not str(name or "").strip():
            raise StegoError(f"{path}: {key!r}: {name!r} is not a cluster id and a name")
        _add(names, int(str(key).strip()), str(name).strip(), str(path))
    return names


def _add(names: dict[int, str], cluster: int, name: str, source: str) -> None:
    if cluster in names and names[cluster] != name:
        raise StegoError(f"{source} names cluster {cluster} twice ({names[cluster]!r}, {name!r})")
    names[cluster] = name


def hand_class_map(names: dict[int, str], n_clusters: int, source: str = "") -> ClassMap:
    """The class map of hand-given names: one class per distinct name (in order of the first
    cluster that has it), then "cluster N" for every cluster left unnamed."""
    unknown = sorted(c for c in names if not 0 <= c < n_clusters)
    if unknown:
        raise StegoError(
            f"{source or '--names'} names cluster(s) {unknown}, but the model has clusters "
            f"0-{n_clusters - 1}; fix the ids (see the legend of the overlays or clusters.json)"
        )
    class_names: list[str] = []
    mapping = []
    for cluster in range(n_clusters):
        name = names.get(cluster, f"cluster {cluster}")
        if name not in class_names:
            class_names.append(name)
        mapping.append(class_names.index(name))
    fit = {"method": "hand", "labelled_images": 0, "labelled_pixels": 0, "source": source}
    return ClassMap(class_names, _hand_colors(class_names, mapping), mapping, fit)


def _hand_colors(class_names: list[str], mapping: list[int]) -> list[list[int]]:
    """A named class takes its dataset colour when known; an unnamed cluster keeps the colour it
    had before naming, so the overlays do not change colour for it."""
    from stego.viz import default_palette

    named = [n for n in class_names if not n.startswith("cluster ")]
    known = dict(zip(named, class_colors(named), strict=True)) if named else {}
    cluster_colors = default_palette(len(mapping))
    colors = []
    for k, name in enumerate(class_names):
        first = int(np.argmax(np.asarray(mapping) == k))
        colors.append(known.get(name, cluster_colors[first].tolist()))
    return colors
