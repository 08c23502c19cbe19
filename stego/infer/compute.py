"""The network's part of prediction: images in, label maps (or log-probabilities) out.

Each image is resized for the network (:func:`resize_for_network`) and padded to a multiple of
the patch on its own, exactly as a batch of one would be; images whose padded inputs share a
size go through the backbone together, and each image's codes are then cropped and upsampled
to its own size, together with the other images of its own size. So a batch of mixed sizes
gives each image the labels that a batch of its own size gives it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stego.errors import StegoError
from stego.infer.loading import ReadImage, network_size, read_image_rgb

if TYPE_CHECKING:
    from stego.models.segmenter import PaddedCode

__all__ = [
    "EncodedImage",
    "Labelled",
    "Scored",
    "encode_paths",
    "label_batch",
    "refine",
    "resize_for_network",
    "score_batch",
]


class Labelled(NamedTuple):
    """One image and its label map."""

    index: int  # position in the items predicted
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int64 ids
    clusters: np.ndarray | None = None  # (H, W) int64 cluster ids, beside class ids


class Scored(NamedTuple):
    """One image and its log-probabilities, for the CRF."""

    index: int
    image: np.ndarray  # (H, W, 3) uint8
    log_probs: Tensor  # (K, H, W) on the CPU
    cluster_log_probs: Tensor | None = None  # (K', H, W), beside class log-probabilities


class EncodedImage(NamedTuple):
    """One image's codes as prediction computes them (:func:`encode_paths`)."""

    path: Path
    size: tuple[int, int]  # (H, W) of the image itself
    found: PaddedCode  # batch of one, at the network size


def resize_for_network(images: Tensor, max_side: int | None) -> Tensor:
    """Images (B, 3, H, W) as prediction feeds them to the network: shorter side at most
    ``max_side`` (antialiased bilinear), aspect kept; not yet padded to the patch size."""
    height, width = images.shape[-2:]
    small = network_size(height, width, max_side)
    if small == (height, width):
        return images
    return F.interpolate(images, size=small, mode="bilinear", align_corners=False, antialias=True)


def _as_input(array: np.ndarray, device: str | torch.device) -> Tensor:
    """(1, 3, H, W) float in [0, 1] of an (H, W, 3) uint8 image."""
    return torch.from_numpy(array).to(device).permute(2, 0, 1)[None].float() / 255.0


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
    """The codes :func:`stego.infer.predict.predict_paths` computes for these images before the
    probes (same network size, padding and flip average), one entry per readable image; pass
    them back to it (``encoded``) to label those images without a second backbone pass.
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
        image = resize_for_network(_as_input(array, device), max_side)  # (1, 3, h, w)
        with torch.inference_mode():
            codes = model.encode_any(image, flip=flip, with_features=features)
        found.append(EncodedImage(path, (array.shape[0], array.shape[1]), codes))
    return found


def _encode_batch(
    model: Any,
    batch: list[ReadImage],
    *,
    flip: bool,
    device: str | torch.device,
    max_side: int | None,
    features: bool = False,
) -> list[tuple[list[ReadImage], PaddedCode]]:
    """Codes of readable images whose padded network inputs share one size, one backbone pass:
    [(images of one own size, their codes (b, D, h, w) with that size's crop)], with the
    backbone features (b, C, h, w) when ``features``."""
    from stego.data.transforms import pad_to_multiple
    from stego.models.segmenter import PaddedCode

    padded = [
        pad_to_multiple(
            resize_for_network(_as_input(item.image, device), max_side),
            model.patch_size,
            mode="replicate",
        )  # fmt: skip
        for item in batch
    ]
    inputs = torch.cat([p.tensor for p in padded])  # (B, 3, H', W')
    if len({tuple(p.tensor.shape) for p in padded}) != 1:
        raise StegoError("images of one batch must share their padded network size")
    if features:  # (B, D, h, w), (B, C, h, w)
        code, feat = model.encode_with_features(inputs, flip=flip)
    else:
        code, feat = model.encode(inputs, flip=flip), None  # (B, D, h, w)
    padded_size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(batch):
        by_size.setdefault(item.image.shape, []).append(i)
    groups = []
    for positions in by_size.values():
        whole = len(positions) == len(batch)
        part = code if whole else code[positions]  # (b, D, h, w)
        part_feat = None if feat is None else (feat if whole else feat[positions])
        own = (padded[positions[0]].height, padded[positions[0]].width)
        found = PaddedCode(part, padded_size, own, part_feat)
        groups.append(([batch[i] for i in positions], found))
    return groups


def _each_image(
    model: Any,
    batch: list[ReadImage],
    maps: Callable[[PaddedCode, tuple[int, int], str], Tensor],
    *,
    flip: bool,
    device: str | torch.device,
    probe: str,
    max_side: int | None,
    keep_clusters: bool,
) -> Iterator[tuple[ReadImage, Tensor, Tensor | None]]:
    """(image, its map of ``probe``, its cluster map or None) for each readable image sharing a
    padded network size, from one backbone pass; ``maps(found, size, probe)`` gives a group of
    one own size its maps (b, ...) on the CPU."""
    features = probe == "class" and model.needs_features
    with torch.inference_mode():
        for items, found in _encode_batch(
            model, batch, flip=flip, device=device, max_side=max_side, features=features
        ):
            size = items[0].image.shape[:2]
            main = maps(found, size, probe)
            clusters: Any = maps(found, size, "cluster") if keep_clusters else [None] * len(items)
            yield from zip(items, main, clusters, strict=True)


def label_batch(
    model: Any,
    batch: list[ReadImage],
    *,
    flip: bool,
    device: str | torch.device,
    probe: str,
    max_side: int | None,
    keep_clusters: bool = False,
) -> list[Labelled]:
    """Label maps of readable images sharing a padded network size, each at its own size (and
    the cluster ids beside them, from the same pass, with ``keep_clusters``)."""

    def ids(found: PaddedCode, size: tuple[int, int], p: str) -> Tensor:  # (b, H, W)
        return model.ids_from_code(found, size=size, probe=p).cpu()

    out = [
        Labelled(item.index, item.image, m.numpy(), None if c is None else c.numpy())
        for item, m, c in _each_image(
            model, batch, ids, flip=flip, device=device, probe=probe, max_side=max_side,
            keep_clusters=keep_clusters,
        )
    ]  # fmt: skip
    return sorted(out, key=lambda labelled: labelled.index)


def score_batch(
    model: Any,
    batch: list[ReadImage],
    *,
    flip: bool,
    device: str | torch.device,
    probe: str,
    max_side: int | None,
    keep_clusters: bool = False,
) -> list[Scored]:
    """:func:`label_batch`'s log-probabilities (K, H, W) instead of ids, for the CRF."""

    def log_probs(found: PaddedCode, size: tuple[int, int], p: str) -> Tensor:  # (b, K, H, W)
        return model.log_probs_from_code(found, size=size, probe=p).cpu()

    out = [
        Scored(item.index, item.image, m, c)
        for item, m, c in _each_image(
            model, batch, log_probs, flip=flip, device=device, probe=probe, max_side=max_side,
            keep_clusters=keep_clusters,
        )
    ]  # fmt: skip
    return sorted(out, key=lambda scored: scored.index)


def refine(scored: list[Scored], workers: int | None) -> list[Labelled]:
    """Dense-CRF labels of each image from its log-probabilities (and of its cluster ids from
    theirs, when kept: the CRF then runs twice); the images may differ in size; ``workers``
    processes run them in parallel (None: all CPUs)."""
    from stego.infer.crf import dense_crf_batch

    images = [s.image for s in scored]
    refined = dense_crf_batch(
        images, [s.log_probs.exp().float().numpy() for s in scored], workers=workers
    )
    clusters: list[Any] = [None] * len(scored)
    if scored and scored[0].cluster_log_probs is not None:
        cluster_probs = [s.cluster_log_probs.exp().float().numpy() for s in scored]
        clusters = [q.argmax(0) for q in dense_crf_batch(images, cluster_probs, workers=workers)]
    return [
        Labelled(s.index, s.image, q.argmax(0), c)
        for s, q, c in zip(scored, refined, clusters, strict=True)
    ]
