"""stego.device: the one default device choice of commands and training."""

from __future__ import annotations

import torch

from stego.device import accelerator_device, resolve_device


def test_explicit_device_wins_and_the_default_follows_cuda() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device() == expected
    assert resolve_device(None) == expected


def test_accelerator_maps_to_a_device() -> None:
    assert accelerator_device("cpu") == "cpu"
    for accelerator in ("auto", "gpu", "cuda"):
        assert accelerator_device(accelerator) == resolve_device()
