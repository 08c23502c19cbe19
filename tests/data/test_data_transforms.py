"""PairTransform keeps image and label aligned; sizes and crops follow the paper's protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from stego.data import IGNORE, PairTransform, pad_to_multiple
from stego.data.transforms import resized_size
from stego.errors import StegoError


def coded_pair(height: int, width: int) -> tuple[Image.Image, np.ndarray]:
    """Image whose R, G channels encode (row, col); label = row * 1000 + col."""
    rows, cols = np.mgrid[0:height, 0:width]
    img = np.stack([rows * 5, cols * 5, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    return Image.fromarray(img), rows * 1000 + cols


def decode(image: torch.Tensor) -> torch.Tensor:
    rgb = (image * 255).round().long()
    return (rgb[0] // 5) * 1000 + rgb[1] // 5


@pytest.mark.parametrize("seed", range(6))
def test_random_crop_and_flip_keep_alignment(seed: int) -> None:
    image, label = coded_pair(20, 30)
    t = PairTransform(20, crop="random", hflip_prob=0.5)  # shorter side already 20: no resampling
    out = t(image, label, generator=torch.Generator().manual_seed(seed))
    assert out.image.shape == (3, 20, 20) and out.label.shape == (20, 20)
    assert torch.equal(decode(out.image), out.label)


def test_alignment_survives_nearest_resize() -> None:
    image, label = coded_pair(24, 40)
    t = PairTransform(16, crop="random", interpolation="nearest", hflip_prob=0.5)
    for seed in range(4):
        out = t(image, label, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(decode(out.image), out.label)


def test_generator_makes_it_reproducible_and_flips_happen() -> None:
    image, label = coded_pair(20, 60)
    t = PairTransform(20, crop="random", hflip_prob=0.5, generator=torch.Generator().manual_seed(0))
    outs = [t(image, label).label for _ in range(8)]
    assert len({tuple(o[0, :2].tolist()) for o in outs}) > 1  # crops or flips vary
    again = PairTransform(
        20, crop="random", hflip_prob=0.5, generator=torch.Generator().manual_seed(0)
    )
    assert all(torch.equal(a, again(image, label).label) for a in outs)
    flipped = [bool(o[0, 0] > o[0, 1]) for o in outs]
    assert any(flipped) and not all(flipped)


def test_matches_original_nearest_pipeline() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    ref = T.Compose([T.Resize(24, T.InterpolationMode.NEAREST), T.CenterCrop(24), T.ToTensor()])(
        image
    )
    ours = PairTransform(24, interpolation="nearest")(image).image
    assert torch.equal(ref, ours)


def test_bilinear_center_crop_shapes_and_label_nearest() -> None:
    image = Image.new("RGB", (50, 30), (10, 200, 30))
    label = np.full((30, 50), 7)
    label[:, :5] = IGNORE
    out = PairTransform(12)(image, label)
    assert out.image.shape == (3, 12, 12) and out.image.dtype == torch.float32
    assert out.label.dtype == torch.int64 and set(out.label.unique().tolist()) <= {7, IGNORE}
    assert torch.allclose(out.image[:, 5, 5], torch.tensor([10, 200, 30]) / 255.0)
    assert PairTransform(12, crop="none")(image).image.shape == (3, 12, 20)
    assert resized_size(30, 50, 12) == (12, 20) and resized_size(50, 30, 12) == (20, 12)


def test_tensor_image_input() -> None:
    img = torch.rand(3, 10, 10)
    label = torch.arange(100).reshape(10, 10)
    out = PairTransform(20, interpolation="nearest")(img, label)
    assert out.image.shape == (3, 20, 20) and out.label.shape == (20, 20)
    assert torch.equal(out.image[:, ::2, ::2], img) and torch.equal(out.label[::2, ::2], label)
    assert PairTransform(5)(img).image.shape == (3, 5, 5)


def test_bad_arguments_and_size_mismatch() -> None:
    with pytest.raises(StegoError, match="center, none, random"):
        PairTransform(10, crop="corner")  # type: ignore[arg-type]
    with pytest.raises(StegoError, match="bilinear or nearest"):
        PairTransform(10, interpolation="cubic")  # type: ignore[arg-type]
    with pytest.raises(StegoError, match="same size"):
        PairTransform(4)(Image.new("RGB", (8, 8)), np.zeros((8, 9)))


def test_pad_to_multiple() -> None:
    x = torch.ones(2, 3, 10, 13)
    padded = pad_to_multiple(x, 8)
    assert padded.tensor.shape == (2, 3, 16, 16) and (padded.height, padded.width) == (10, 13)
    assert torch.equal(padded.tensor[..., :10, :13], x) and padded.tensor[..., 10:, :].sum() == 0
    lab = pad_to_multiple(torch.zeros(5, 5, dtype=torch.long), 4, value=IGNORE).tensor
    assert lab.shape == (8, 8) and lab.dtype == torch.long and int(lab[7, 7]) == IGNORE
    rep = pad_to_multiple(torch.arange(6.0).reshape(2, 3), 4, mode="replicate").tensor
    assert rep.shape == (4, 4) and float(rep[3, 3]) == 5.0
    assert pad_to_multiple(x, 1).tensor is x
