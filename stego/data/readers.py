"""Reading images and label maps from disk, with errors that name the file and the fix.

Images come back as RGB ``PIL.Image`` objects whatever the stored mode (L, P, RGBA, CMYK,
16-bit, float...). The EXIF orientation tag is applied only when asked (``exif=True``, the
default, for unlabelled photos: ``stego segment``, ``predict``, folders without labels).
Labelled datasets read the stored pixels (``exif=False``), as the original code did: labels are
never rotated, so only the stored pixels line up with them.

Pillow's decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``) stays active; an image over
the limit raises :class:`StegoError` saying how to raise it. Truncated, empty or non-image
files raise :class:`StegoError` naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stego.errors import StegoError

__all__ = ["read_image", "read_label", "read_mat_array", "image_to_uint8_rgb"]

_LABEL_MODES = {"1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"}


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path``; every failure becomes a :class:`StegoError`."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise StegoError(f"{what} {path} does not exist; check the data root and split.") from None
    except OSError as exc:
        raise StegoError(f"cannot read {what} {path}: {exc}.") from exc
    if size == 0:
        raise StegoError(f"{what} {path} is empty (0 bytes); re-copy or delete the file.")
    try:
        image = Image.open(path)
        image.load()  # decode now: truncation shows here, not deep inside a training step
    except Image.DecompressionBombError as exc:
        raise StegoError(
            f"{what} {path} is larger than Pillow's decompression-bomb limit "
            f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}): {exc}. If the file is "
            "trusted, raise the limit (PIL.Image.MAX_IMAGE_PIXELS = None) or downscale it."
        ) from exc
    except UnidentifiedImageError:
        raise StegoError(
            f"{what} {path} is not an image Pillow can read (wrong extension, or not an image at "
            "all); convert it to PNG/JPEG or remove it."
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise StegoError(
            f"{what} {path} is corrupt or truncated ({exc}); re-copy or re-download it."
        ) from exc
    return image


def image_to_uint8_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    16-bit and 32-bit integer greyscale are scaled by their bit depth (values > 255 in mode
    ``I`` are read as 16-bit); float greyscale is taken as [0, 1] when its maximum is <= 1,
    else as [0, 255]. Alpha is dropped (colour under transparent pixels kept); palette images
    are expanded through their palette.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(image).astype(np.float64)
        if mode == "F":
            scale = 1.0 if (arr.size and np.nanmax(arr) <= 1.0) else 255.0
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            scale = 65535.0
        else:
            scale = 255.0
        grey = np.clip(np.rint(np.nan_to_num(arr) / scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise StegoError(
            f"cannot convert image mode {mode} to RGB ({exc}); save the image as RGB PNG/JPEG."
        ) from exc


def read_image(path: str | Path, *, exif: bool = True) -> Image.Image:
    """Read an image as 8-bit RGB, size ``(W, H)``; upright by its EXIF tag when ``exif``."""
    path = Path(path)
    image = _open(path, "image")
    if exif:
        try:
            image = ImageOps.exif_transpose(image)
        except Exception as exc:  # malformed EXIF must not crash a long run
            warnings.warn(f"ignoring unreadable EXIF orientation of {path}: {exc}", stacklevel=2)
    try:
        result = image_to_uint8_rgb(image)
    except StegoError as exc:
        raise StegoError(f"image {path}: {exc}") from exc
    return _detach(result, image)


def read_label(path: str | Path) -> np.ndarray:
    """Read a single-channel label image as raw integer ids, shape (H, W), int64. Not rotated.

    Palette (``P``) PNGs give their palette indices. Colour (RGB/RGBA) labels are refused: the
    class ids must be stored directly as pixel values.
    """
    path = Path(path)
    image = _open(path, "label")
    if image.mode not in _LABEL_MODES:
        raise StegoError(
            f"label {path} is a {image.mode} colour image; expected a single-channel image of "
            "class ids (mode L, P or 16-bit). Convert colours to ids first (one id per colour)."
        )
    labels = np.asarray(image).astype(np.int64)
    if getattr(image, "fp", None) is not None:
        image.close()
    return labels


def _detach(result: Image.Image, source: Image.Image) -> Image.Image:
    """Close the file ``source`` still holds open (multi-frame formats); return ``result``."""
    if getattr(source, "fp", None) is None:
        return result
    if result is source:
        result = source.copy()
    source.close()
    return result


def read_mat_array(path: str | Path, key: str) -> np.ndarray:
    """Read array ``key`` from a MATLAB ``.mat`` file (scipy.io.loadmat)."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise StegoError(f"{path} does not exist; check the data root and split list.")
    if path.stat().st_size == 0:
        raise StegoError(f"{path} is empty (0 bytes); re-copy or re-download it.")
    try:
        data = loadmat(str(path))
    except Exception as exc:  # scipy raises many types for bad files
        raise StegoError(f"{path} is not a readable .mat file ({exc}); re-copy it.") from exc
    if key not in data:
        keys = sorted(k for k in data if not k.startswith("__"))
        raise StegoError(f"{path} has no array {key!r} (found: {', '.join(keys) or 'none'}).")
    return np.asarray(data[key])
