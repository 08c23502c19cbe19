"""Reading images for prediction: decoded in DataLoader worker processes, grouped into batches
of one network size.

The network sees each image resized (:func:`network_size`) and padded at the bottom / right to
a multiple of the patch, so images of different sizes whose padded network inputs agree can
share a forward pass (e.g. 640x427 and 640x425 both pad to 644x434 at patch 14); each is then
cropped and upsampled back to its own size. :func:`size_batches` groups them within fixed
chunks of consecutive items, so a batch never waits for images far ahead (memory stays at one
chunk of decoded images) and which images share a batch does not depend on how many processes
share the items (chunks are whole runs of :meth:`stego.parallel.ProcessGroup.stretch`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from stego.errors import StegoError

__all__ = [
    "ReadImage",
    "default_workers",
    "image_loader",
    "network_size",
    "padded_network_size",
    "read_image_rgb",
    "size_batches",
]


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Any Pillow image as upright RGB uint8 (H, W, 3), via :func:`stego.data.readers.read_image`
    (16-bit scaled, palette / CMYK converted, alpha dropped, EXIF orientation applied).

    Raises :class:`StegoError` naming the file when it cannot be decoded.
    """
    from stego.data.readers import read_image

    return np.array(read_image(path), dtype=np.uint8)  # (H, W, 3)


def default_workers() -> int:
    """Image-decoding processes by default: one core is left to the network, at most 4 (PNG /
    JPEG decoding of one image takes a fraction of its forward pass)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(4, (cpus or 1) - 1))


def network_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """Size fed to the network: shorter side at most ``max_side`` (aspect kept)."""
    short = min(height, width)
    if not max_side or short <= max_side:
        return height, width
    scale = max_side / short
    return max(1, round(height * scale)), max(1, round(width * scale))


def padded_network_size(
    height: int, width: int, max_side: int | None, patch: int
) -> tuple[int, int]:
    """:func:`network_size` rounded up to multiples of ``patch``: the backbone's input size."""
    small = network_size(height, width, max_side)
    return -(-small[0] // patch) * patch, -(-small[1] // patch) * patch


class ReadImage(NamedTuple):
    """One item as the loader gives it: its position, the image or why it could not be read."""

    index: int  # position in the list of items read
    image: np.ndarray | None  # (H, W, 3) uint8; None when unreadable
    error: str  # the reason when unreadable, else ""


class _ImageFiles(torch.utils.data.Dataset):
    """Reads images in DataLoader workers; a failure is returned, not raised, so the main
    process decides whether to stop or to skip."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ReadImage:
        try:
            return ReadImage(index, read_image_rgb(self.paths[index]), "")
        except StegoError as exc:
            return ReadImage(index, None, str(exc))


def _as_is(item: Any) -> Any:
    """Collate function that keeps numpy images as they are (module level: picklable)."""
    return item


def image_loader(paths: list[Path], num_workers: int) -> Iterator[ReadImage]:
    """The images in order, decoded ahead by ``num_workers`` processes (0: in this one); at most
    2 images per worker wait decoded (the DataLoader's prefetch)."""
    if num_workers < 0:
        raise StegoError(f"num_workers must be >= 0, got {num_workers}")
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_is,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    yield from loader


def size_batches(
    stream: Iterator[ReadImage],
    batch_size: int,
    chunk: int,
    key: Callable[[np.ndarray], Hashable],
) -> Iterator[list[ReadImage]]:
    """Batches of at most ``batch_size`` readable images of one ``key`` (the padded network
    size), and each unreadable image alone, as soon as it is read.

    Images are grouped within chunks of ``chunk`` consecutive indices (``index // chunk``): a
    group is given out when it is full, the rest at the end of its chunk, in order of their
    first image. So at most ``chunk`` decoded images wait here, and the batches depend only on
    the items and their sizes.
    """
    groups: dict[Hashable, list[ReadImage]] = {}  # insertion order: by first image
    current = None
    for item in stream:
        if item.index // chunk != current:
            yield from groups.values()
            groups, current = {}, item.index // chunk
        if item.image is None:
            yield [item]
            continue
        size = key(item.image)
        group = groups.setdefault(size, [])
        group.append(item)
        if len(group) == batch_size:
            yield groups.pop(size)
    yield from groups.values()
