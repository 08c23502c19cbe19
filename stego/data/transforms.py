"""Paired image/label geometry: resize, crop and flip both with the same parameters.

Random parameters (crop offset, flip) are drawn once per call from an injectable
``torch.Generator`` and applied to image and label alike; no global RNG is ever reseeded.
Labels are always resized with nearest neighbour. Images use antialiased bilinear by default;
``interpolation="nearest"`` reproduces the original STEGO code, which resized images with
PIL's NEAREST too. Nearest always follows PIL's rule, for PIL images and tensors alike (see
:func:`pil_nearest_indices`), so image and label pick the same source pixels. Label *mapping*
(raw ids -> classes) is the dataset's job, not this one.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from stego.errors import StegoError

__all__ = [
    "PairTransform",
    "PairOutput",
    "Padded",
    "pad_to_multiple",
    "pil_nearest_indices",
    "resized_size",
]

Crop = Literal["center", "none", "random"]
Interpolation = Literal["bilinear", "nearest"]


class PairOutput(NamedTuple):
    image: Tensor  # (3, H, W) float32 in [0, 1]
    label: Tensor | None  # (H, W) int64, None when no label was given


class Padded(NamedTuple):
    tensor: Tensor  # (..., H', W') with H', W' multiples of the requested size
    height: int  # original H: crop back with tensor[..., :height, :width]
    width: int


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(H, W) after resizing the shorter side to ``resolution`` (torchvision's rounding)."""
    if height <= width:
        return resolution, int(resolution * width / height)
    return int(resolution * height / width), resolution


@lru_cache(maxsize=64)
def _nearest_indices(src: int, dst: int) -> Tensor:
    # Asked of PIL itself: its NEAREST walks a running sum (start step/2, step src/dst, in
    # double) and floors it, so at exact half-way positions accumulated rounding decides the
    # side; closed forms such as floor((i + 0.5) * src / dst) disagree there (25 of 224 columns
    # for 64 -> 224). The x mapping does not depend on the other axis, so one row suffices.
    row = Image.fromarray(np.arange(src, dtype=np.int32)[None, :])  # mode "I", 1 x src
    picked = np.asarray(row.resize((dst, 1), Image.Resampling.NEAREST))[0]
    return torch.from_numpy(picked.astype(np.int64))


def pil_nearest_indices(src: int, dst: int) -> Tensor:
    """(dst,) int64: the source index PIL's NEAREST resize takes for each of ``dst`` outputs."""
    if src < 1 or dst < 1:
        raise StegoError(f"sizes must be positive, got {src} -> {dst}.")
    return _nearest_indices(int(src), int(dst))


def _image_to_tensor(image: Image.Image | Tensor | np.ndarray) -> Tensor:
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise StegoError(f"PairTransform expects an RGB image, got mode {image.mode}.")
        arr = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    tensor = torch.as_tensor(image)
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise StegoError(
            f"PairTransform expects an image tensor (3, H, W), got {tuple(tensor.shape)}."
        )
    if not tensor.is_floating_point():
        tensor = tensor.float().div_(255.0)
    return tensor.float()


def _label_to_array(label: Image.Image | Tensor | np.ndarray) -> np.ndarray:
    arr = np.asarray(label.cpu() if isinstance(label, Tensor) else label)
    if arr.ndim != 2:
        raise StegoError(f"PairTransform expects a label of shape (H, W), got {arr.shape}.")
    return arr.astype(np.int64, copy=False)


def _resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer map (PIL's NEAREST sampling, exact for int32)."""
    h, w = size
    if label.shape == (h, w):
        return label
    if label.min(initial=0) < -(2**31) or label.max(initial=0) >= 2**31:
        raise StegoError("label values do not fit in int32; cannot resize them.")
    pil = Image.fromarray(label.astype(np.int32))  # mode "I"
    return np.asarray(pil.resize((w, h), Image.Resampling.NEAREST)).astype(np.int64)


class PairTransform:
    """Resize the shorter side to ``resolution``, crop, optionally flip; same geometry for both.

    Args:
        resolution: target length of the shorter side (and crop size); ``None`` keeps the size.
        crop: ``"center"`` (resolution x resolution from the middle, the paper's protocol),
            ``"random"`` (random square, for augmentation), or ``"none"`` (keep the resized image).
        interpolation: image resampling, ``"bilinear"`` (antialiased) or ``"nearest"`` (the
            original code). Labels are always nearest.
        hflip_prob: probability of a horizontal flip.
        generator: default ``torch.Generator`` for random crop and flip (per-call override).
            Each DataLoader worker gets a copy of it in the same state, so workers would draw
            the same parameters: reseed ``transform.generator`` per worker in
            ``worker_init_fn`` (e.g. from ``torch.utils.data.get_worker_info().seed``).

    Call with a PIL RGB image (or a (3, H, W) tensor, float [0, 1] or uint8) and an optional
    label (PIL, array or tensor of shape (H, W)); returns :class:`PairOutput` with the image as
    (3, h, w) float [0, 1] and the label as (h, w) int64.
    """

    def __init__(
        self,
        resolution: int | None,
        *,
        crop: Crop = "center",
        interpolation: Interpolation = "bilinear",
        hflip_prob: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if crop not in ("center", "none", "random"):
            raise StegoError(f"unknown crop {crop!r}; choose one of: center, none, random.")
        if interpolation not in ("bilinear", "nearest"):
            raise StegoError(
                f"unknown interpolation {interpolation!r}; choose bilinear or nearest."
            )
        if resolution is not None and resolution < 1:
            raise StegoError(f"resolution must be a positive number of pixels, got {resolution}.")
        if resolution is None and crop != "none":
            raise StegoError("crop needs a resolution; pass resolution=... or crop='none'.")
        if not 0.0 <= hflip_prob <= 1.0:
            raise StegoError(f"hflip_prob must be in [0, 1], got {hflip_prob}.")
        self.resolution = resolution
        self.crop = crop
        self.interpolation = interpolation
        self.hflip_prob = hflip_prob
        self.generator = generator

    def __repr__(self) -> str:
        return (
            f"PairTransform({self.resolution}, crop={self.crop!r}, "
            f"interpolation={self.interpolation!r}, hflip_prob={self.hflip_prob})"
        )

    def _resize_image(
        self, image: Image.Image | Tensor | np.ndarray, size: tuple[int, int]
    ) -> Tensor:
        h, w = size
        if isinstance(image, Image.Image):
            if image.size != (w, h):
                resample = (
                    Image.Resampling.BILINEAR
                    if self.interpolation == "bilinear"
                    else Image.Resampling.NEAREST
                )
                image = image.resize((w, h), resample)
            return _image_to_tensor(image)
        tensor = _image_to_tensor(image)
        if tuple(tensor.shape[1:]) == (h, w):
            return tensor
        if self.interpolation == "bilinear":
            out = F.interpolate(
                tensor[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True
            )
            return out[0].clamp_(0.0, 1.0)
        # PIL's own source pixels (labels are resized by PIL): image and label stay aligned
        rows = pil_nearest_indices(tensor.shape[1], h).to(tensor.device)
        cols = pil_nearest_indices(tensor.shape[2], w).to(tensor.device)
        return tensor.index_select(1, rows).index_select(2, cols)  # (3, h, w)

    def __call__(
        self,
        image: Image.Image | Tensor | np.ndarray,
        label: Image.Image | Tensor | np.ndarray | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> PairOutput:
        gen = generator if generator is not None else self.generator
        if isinstance(image, Image.Image):
            width, height = image.size
        else:
            height, width = int(image.shape[-2]), int(image.shape[-1])
        lab = None if label is None else _label_to_array(label)
        if lab is not None and lab.shape != (height, width):
            raise StegoError(
                f"image is {height}x{width} but its label is {lab.shape[0]}x{lab.shape[1]}; "
                "they must have the same size."
            )
        size = (
            (height, width)
            if self.resolution is None
            else resized_size(height, width, self.resolution)
        )
        img = self._resize_image(image, size)  # (3, h, w)
        if lab is not None:
            lab = _resize_label(lab, size)
        # Draw every random parameter once, in a fixed order (crop, then flip), for both.
        top = left = 0
        crop_h, crop_w = size
        if self.crop != "none" and self.resolution is not None:
            crop_h = crop_w = self.resolution
            if self.crop == "center":
                top = int(round((size[0] - crop_h) / 2.0))
                left = int(round((size[1] - crop_w) / 2.0))
            else:
                top = int(torch.randint(0, size[0] - crop_h + 1, (1,), generator=gen))
                left = int(torch.randint(0, size[1] - crop_w + 1, (1,), generator=gen))
        flip = self.hflip_prob > 0 and bool(torch.rand(1, generator=gen) < self.hflip_prob)
        img = img[:, top : top + crop_h, left : left + crop_w]
        out_label = None
        if lab is not None:
            lab = lab[top : top + crop_h, left : left + crop_w]
            out_label = torch.from_numpy(np.ascontiguousarray(lab)).long()
        if flip:
            img = img.flip(-1)
            out_label = None if out_label is None else out_label.flip(-1)
        return PairOutput(img.contiguous(), out_label)


def pad_to_multiple(
    tensor: Tensor,
    multiple: int,
    *,
    mode: Literal["constant", "reflect", "replicate"] = "constant",
    value: float = 0.0,
) -> Padded:
    """Pad the last two dims (H, W) at the bottom and right up to multiples of ``multiple``.

    Use it to feed a ViT (H, W must be multiples of the patch size); pad labels with
    ``value=IGNORE``. Padding only bottom/right keeps pixel (0, 0) fixed, so the result crops
    back with ``padded.tensor[..., :padded.height, :padded.width]``. Works on (H, W), (C, H, W)
    and (B, C, H, W).
    """
    if multiple < 1:
        raise StegoError(f"multiple must be >= 1, got {multiple}.")
    height, width = int(tensor.shape[-2]), int(tensor.shape[-1])
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return Padded(tensor, height, width)
    if mode == "constant":
        return Padded(F.pad(tensor, (0, pad_w, 0, pad_h), value=value), height, width)
    lead = tensor.shape[:-2]
    flat = tensor.reshape(-1, 1, height, width).float()
    out = F.pad(flat, (0, pad_w, 0, pad_h), mode=mode)
    return Padded(out.reshape(*lead, height + pad_h, width + pad_w).to(tensor.dtype), height, width)
