"""Which class each cluster is: the mapping that turns a model's cluster ids into class ids.

A model trained without labels predicts cluster ids. Naming (:mod:`stego.naming`) fits or is
told a mapping cluster -> class (several clusters may share a class) and saves it beside the
weights as ``classes.json``; :class:`stego.models.segmenter.Segmenter` then predicts class ids.
The class map lives here, below the segmenter, so that loading a model needs nothing above
:mod:`stego.models`; :mod:`stego.naming` builds class maps and re-exports this one.

``classes.json``::

    {"version": 1,
     "names":   ["road", "sky", "cluster 3", ...],   # class id i -> name
     "colors":  [[128, 64, 128], ...],                # class id i -> RGB (0-255)
     "mapping": [0, 0, 1, 2, ...],                    # cluster id c -> class id
     "fit": {"method": "majority" | "hand" | "classifier", "labelled_images": 10,
             "labelled_pixels": 123456, "source": "..."},
     "classifier": {"file": "classes.safetensors", "code_dim": 32, "feat_dim": 384}}

``classifier`` (only when the classes were fit by ``stego segment --labels``): a
:class:`stego.models.pixel_classifier.PixelClassifier` whose weights are in
``classes.safetensors``; it gives every pixel's class from its code and backbone feature, and
``mapping`` (the labelled pixels' majority class of each cluster) is then only used where
nothing but cluster ids is known.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stego.atomic import atomic_write
from stego.errors import StegoError
from stego.models.pixel_classifier import PixelClassifier

__all__ = [
    "CLASSES_FILE",
    "CLASSIFIER_FILE",
    "ClassMap",
    "read_class_map",
    "write_class_map",
    "remove_class_map",
]

CLASSES_FILE = "classes.json"
CLASSIFIER_FILE = "classes.safetensors"
VERSION = 1


@dataclass
class ClassMap:
    """Class names and colours, and the class of every cluster."""

    names: list[str]  # class id -> name
    colors: list[list[int]]  # class id -> [r, g, b] in 0-255
    mapping: list[int]  # cluster id -> class id
    fit: dict[str, Any] = field(default_factory=dict)  # how the mapping was made
    # pixel classes from codes and features; None: the class of a pixel is its cluster's
    classifier: PixelClassifier | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        self.colors = [[int(v) for v in c] for c in self.colors]
        self.mapping = [int(c) for c in self.mapping]
        if len(self.colors) != len(self.names):
            raise StegoError(
                f"a class map needs one colour per class: {len(self.names)} names, "
                f"{len(self.colors)} colours"
            )
        if any(len(c) != 3 for c in self.colors):
            raise StegoError("every class colour must be [r, g, b]")
        outside = sorted({c for c in self.mapping if not 0 <= c < len(self.names)})
        if outside:
            raise StegoError(
                f"the cluster -> class mapping names class ids {outside} outside the "
                f"{len(self.names)} classes; name the clusters again"
            )
        if self.classifier is not None and self.classifier.n_classes != len(self.names):
            raise StegoError(
                f"the pixel classifier has {self.classifier.n_classes} classes but the class "
                f"map {len(self.names)}; name the clusters again"
            )

    @property
    def n_classes(self) -> int:
        return len(self.names)

    @property
    def n_clusters(self) -> int:
        return len(self.mapping)

    def lookup(self) -> Tensor:
        """(K,) int64 tensor: ``lookup()[cluster_ids]`` gives class ids of any shape."""
        return torch.tensor(self.mapping, dtype=torch.int64)

    def merge_log_probs(self, log_probs: Tensor) -> Tensor:
        """Cluster log-probabilities (B, K, H, W) -> class log-probabilities (B, C, H, W): a
        class's probability is the sum of its clusters' (for the CRF, which needs
        probabilities; the argmax of ids uses :meth:`lookup` of the best cluster instead)."""
        index = self.lookup().to(log_probs.device)
        probs = log_probs.exp()
        shape = (probs.shape[0], self.n_classes, *probs.shape[2:])
        merged = probs.new_zeros(shape).index_add_(1, index, probs)
        return merged.clamp_min(1e-30).log()

    def to_dict(self) -> dict[str, Any]:
        data = {
            "version": VERSION,
            "names": list(self.names),
            "colors": [list(c) for c in self.colors],
            "mapping": list(self.mapping),
            "fit": dict(self.fit),
        }
        if self.classifier is not None:
            data["classifier"] = {
                "file": CLASSIFIER_FILE,
                "code_dim": self.classifier.code_dim,
                "feat_dim": self.classifier.feat_dim,
            }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassMap:
        missing = [k for k in ("names", "colors", "mapping") if k not in data]
        if missing:
            raise StegoError(f"a class map needs the keys {missing}; name the clusters again")
        return cls(
            names=list(data["names"]),
            colors=list(data["colors"]),
            mapping=list(data["mapping"]),
            fit=dict(data.get("fit") or {}),
        )


def read_class_map(model_dir: str | Path) -> ClassMap | None:
    """The class map saved in ``model_dir/classes.json`` (with its pixel classifier from
    ``classes.safetensors`` when it has one), or None when there is none."""
    path = Path(model_dir) / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StegoError(
            f"{path} is not readable JSON ({exc}); delete it and name the clusters again "
            "(stego name)"
        ) from exc
    try:
        class_map = ClassMap.from_dict(data)
        if data.get("classifier"):
            class_map.classifier = _read_classifier(Path(model_dir), data["classifier"])
            class_map.__post_init__()  # checks the classifier's classes
    except StegoError as exc:
        raise StegoError(f"{path}: {exc}") from exc
    return class_map


def _read_classifier(model_dir: Path, info: dict[str, Any]) -> PixelClassifier:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = model_dir / str(info.get("file", CLASSIFIER_FILE))
    try:
        state = load_file(str(path))
        return PixelClassifier.from_state(state, int(info["code_dim"]))
    except (OSError, SafetensorError, KeyError, RuntimeError, ValueError) as exc:
        raise StegoError(
            f"its pixel classifier {path} is missing or unreadable ({exc}); run `stego segment "
            "--labels` again, or name the clusters again with `stego name`"
        ) from exc


def write_class_map(model_dir: str | Path, class_map: ClassMap) -> Path:
    """Write ``class_map`` to ``model_dir/classes.json`` atomically (its pixel classifier to
    ``classes.safetensors`` first; a classifier left by an earlier naming is removed); returns
    the path of the JSON."""
    from safetensors.torch import save

    path = Path(model_dir) / CLASSES_FILE
    weights = Path(model_dir) / CLASSIFIER_FILE
    if class_map.classifier is not None:
        with atomic_write(weights) as handle:
            handle.write(save(class_map.classifier.state()))
    with atomic_write(path, "w") as handle:
        json.dump(class_map.to_dict(), handle, indent=2)
    if class_map.classifier is None:
        weights.unlink(missing_ok=True)
    return path


def remove_class_map(model_dir: str | Path) -> None:
    """Remove a saved class map (and its pixel classifier): the model predicts clusters."""
    (Path(model_dir) / CLASSES_FILE).unlink(missing_ok=True)
    (Path(model_dir) / CLASSIFIER_FILE).unlink(missing_ok=True)
