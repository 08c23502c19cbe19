"""Which images to predict and how the network sees them: image files of folders (recursive,
sorted, with their relative output paths), any Pillow image read as upright RGB, and the size
an image is fed to the network at."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from stego.errors import StegoError

__all__ = ["collect_images", "read_image_rgb", "resize_for_network", "network_input", "inside"]


def _image_extensions() -> set[str]:
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Any Pillow image as upright RGB uint8 (H, W, 3), via :func:`stego.data.readers.read_image`
    (16-bit scaled, palette / CMYK converted, alpha dropped, EXIF orientation applied).

    Raises :class:`StegoError` naming the file when it cannot be decoded.
    """
    from stego.data.readers import read_image

    return np.array(read_image(path), dtype=np.uint8)  # (H, W, 3)


def collect_images(
    inputs: Sequence[str | Path], *, exclude: Path | None = None
) -> list[tuple[Path, Path]]:
    """(source, relative output stem) pairs for files and folders (recursive, sorted).

    A folder's images keep their path relative to the folder; with several inputs each one's
    relative paths start with the input's own name. Files under ``exclude`` (the output folder)
    are ignored. Two images that would write the same output raise :class:`StegoError`.
    """
    if not inputs:
        raise StegoError("no input images given: pass image files or folders")
    extensions = _image_extensions()
    excluded = exclude.resolve() if exclude is not None else None
    pairs: list[tuple[Path, Path]] = []
    for entry in map(Path, inputs):
        prefix = Path(entry.name) if len(inputs) > 1 and entry.is_dir() else Path()
        if entry.is_file():
            pairs.append((entry, Path(entry.name)))
        elif entry.is_dir():
            found = sorted(
                p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in extensions
            )
            for path in found:
                if excluded is not None and excluded in path.resolve().parents:
                    continue
                pairs.append((path, prefix / path.relative_to(entry)))
        else:
            raise StegoError(f"input {entry} does not exist: pass image files or folders")
    seen: dict[Path, Path] = {}
    for source, rel in pairs:
        stem = rel.with_suffix(".png")
        if stem in seen:
            raise StegoError(
                f"{seen[stem]} and {source} would both write {stem}: rename one or "
                "predict them in separate runs"
            )
        seen[stem] = source
    return [(source, rel.with_suffix(".png")) for source, rel in pairs]


def inside(out_dir: Path, rel: Path) -> Path:
    """``out_dir / rel``, refusing absolute paths and ``..`` that would leave ``out_dir``."""
    target = (out_dir / rel).resolve()
    if rel.is_absolute() or ".." in rel.parts or out_dir.resolve() not in target.parents:
        raise StegoError(f"output path {rel} escapes the output folder {out_dir}; rename the input")
    return out_dir / rel


def _network_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """Size fed to the network: shorter side at most ``max_side`` (aspect kept)."""
    short = min(height, width)
    if not max_side or short <= max_side:
        return height, width
    scale = max_side / short
    return max(1, round(height * scale)), max(1, round(width * scale))


def network_input(images: Tensor, max_side: int | None) -> Tensor:
    """Images (B, 3, H, W) resized (antialiased) to :func:`_network_size`, or as they are."""
    height, width = images.shape[-2:]
    small = _network_size(height, width, max_side)
    if small == (height, width):
        return images
    return F.interpolate(images, size=small, mode="bilinear", align_corners=False, antialias=True)


def resize_for_network(images: Tensor, max_side: int | None) -> Tensor:
    """Images (B, 3, H, W) as prediction feeds them to the network: shorter side at most
    ``max_side`` (antialiased bilinear), aspect kept; not yet padded to the patch size."""
    return network_input(images, max_side)
