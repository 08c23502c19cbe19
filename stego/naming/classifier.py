"""Naming by a pixel classifier: the class of every pixel from its code and backbone feature,
fit on the labelled pixels of a few images (what ``stego segment --labels`` does).

Majority naming (:mod:`stego.naming.labels`) gives each cluster one class; the classifier
(:class:`stego.models.pixel_classifier.PixelClassifier`, a multinomial logistic regression on
[unit code, unit backbone feature]) decides pixel by pixel. On held-out CamVid sequences it beat
majority naming of 44 clusters from 5 labelled images on (docs/benchmarks.md, "Naming
clusters"). It needs each image's backbone features at prediction time, so it is fit where the
backbone runs anyway (``stego segment``); ``stego name`` names the written clusters by majority.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stego.errors import StegoError
from stego.models.class_map import ClassMap
from stego.models.pixel_classifier import classifier_inputs, fit_pixel_classifier
from stego.naming.labels import LabelSet, count_pairs, majority_class_map, read_label
from stego.naming.names import class_colors

__all__ = [
    "PIXELS_PER_IMAGE",
    "fit_classifier_map",
    "inputs_at_pixels",
    "name_folder_by_classifier",
]

# Labelled pixels sampled per image for the fit (seeded): neighbouring pixels share one feature
# cell (14 x 14 pixels for a ViT-S/14), so more add little; the benchmark used 4000.
PIXELS_PER_IMAGE = 4000


def inputs_at_pixels(
    inputs: Tensor,
    padded_size: tuple[int, int],
    net_size: tuple[int, int],
    size: tuple[int, int],
    rows: np.ndarray,
    cols: np.ndarray,
) -> Tensor:
    """(P, D') values of feature-resolution maps ``inputs`` (D', h, w) at P pixels (``rows``,
    ``cols``) of an image of ``size`` (H, W) that the network saw at ``net_size`` padded to
    ``padded_size``: one bilinear sample at the pixel centre's position in the padded frame.

    When the image was not resized (``net_size == size``, images whose shorter side is at most
    the prediction size) this is exactly the value prediction's bilinear upsampling gives the
    pixel (align_corners=False, border-clamped); a resized image's two-step resize is
    approximated by one bilinear sample at the same position.
    """
    y = (rows + 0.5) * net_size[0] / size[0]  # pixel centre in the network's pixel frame
    x = (cols + 0.5) * net_size[1] / size[1]
    grid = torch.stack(
        [
            torch.from_numpy(2 * x / padded_size[1] - 1).float(),
            torch.from_numpy(2 * y / padded_size[0] - 1).float(),
        ],
        dim=-1,
    )[None, None]  # (1, 1, P, 2) as (x, y) in [-1, 1]
    out = F.grid_sample(
        inputs[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )  # (1, D', 1, P)
    return out[0, :, 0].T


@torch.no_grad()
def fit_classifier_map(
    model: Any,
    label_set: LabelSet,
    sources: dict[Path, Path],
    *,
    max_side: int | None,
    seed: int = 0,
) -> ClassMap:
    """Fit a pixel classifier on the labelled pixels of ``label_set`` and return the class map
    that carries it (``fit.method`` "classifier"); ``model`` is the
    :class:`stego.models.segmenter.Segmenter` whose codes and features it reads, computed as
    prediction computes them (``max_side``, flip-averaged).

    ``sources``: relative output path -> image file. Up to ``PIXELS_PER_IMAGE`` labelled pixels
    of each image are sampled (``seed``). The class map's ``mapping`` is the labelled pixels'
    majority class of each cluster (used where only cluster ids are known). A class no labelled
    pixel shows can never be predicted: a warning names it and the fix.
    """
    from stego.infer.predict import encode_paths

    n_classes, n_clusters = len(label_set.names), int(model.meta.n_clusters)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    counts = np.zeros((n_clusters, n_classes), dtype=np.int64)  # labelled pixels (K, C)
    for rel, path in sorted(label_set.files.items()):
        (entry,) = encode_paths(model, [sources[rel]], max_side=max_side, with_features=True)
        found = entry.found
        label = read_label(path, n_classes, entry.size)  # (H, W) class ids, void -1
        clusters = model.ids_from_code(found, size=entry.size, probe="cluster")[0].cpu().numpy()
        counts += count_pairs(clusters, label, n_clusters, n_classes)
        where = np.flatnonzero(label.ravel() >= 0)
        take = rng.choice(where, size=min(PIXELS_PER_IMAGE, where.size), replace=False)
        inputs = classifier_inputs(found.code, found.feat)[0]  # (D + C, h, w)
        rows, cols = np.divmod(take, label.shape[1])
        xs.append(
            inputs_at_pixels(inputs, found.padded_size, found.own_size, entry.size, rows, cols)
        )
        ys.append(torch.from_numpy(label.ravel()[take]))
    x, y = torch.cat(xs), torch.cat(ys)  # (P, D + C), (P,)
    if not len(y):
        raise StegoError(f"no labelled pixel in {label_set.root} (all void?): label some pixels")
    classifier = fit_pixel_classifier(x, y, code_dim=int(found.code.shape[1]), n_classes=n_classes)
    with warnings.catch_warnings():  # its warnings are about majority naming, not used here
        warnings.simplefilter("ignore")
        centroids = model.cluster_probe.clusters.detach().cpu().numpy()
        majority = majority_class_map(
            counts, label_set.names, centroids, labelled_images=1, source=""
        )
    unshown = [k for k in range(n_classes) if not counts[:, k].any()]
    for k in unshown:
        warnings.warn(
            f"class {label_set.names[k]!r} (id {k}) will never be predicted: no labelled pixel "
            f"of {label_set.root} shows it; label an image that does",
            stacklevel=2,
        )
    fit = {
        "method": "classifier",
        "labelled_images": len(label_set.files),
        "labelled_pixels": int(counts.sum()),
        "fit_pixels": len(y),
        "inputs": "unit code + unit backbone features (logistic regression, L-BFGS)",
        "source": str(label_set.root),
        "unnamed_classes": [label_set.names[k] for k in unshown],
    }
    names = list(label_set.names)
    return ClassMap(names, class_colors(names), majority.mapping, fit, classifier=classifier)


def name_folder_by_classifier(
    model: Any,
    labels_dir: str | Path,
    images: list[tuple[Path, Path]],
    model_dir: Path,
    *,
    max_side: int | None,
    seed: int = 0,
) -> ClassMap:
    """``stego segment --labels``: fit the pixel classifier of ``model`` on the label PNGs of
    ``labels_dir`` for ``images`` ((source, relative output path) pairs), name the model's
    classes with it and save the class map into ``model_dir``; returns the class map."""
    from stego.models.class_map import write_class_map
    from stego.naming.labels import check_labels

    label_set = check_labels(labels_dir, images)
    sources = {rel: source for source, rel in images}
    class_map = fit_classifier_map(model, label_set, sources, max_side=max_side, seed=seed)
    model.set_classes(class_map)
    write_class_map(model_dir, class_map)
    return class_map
