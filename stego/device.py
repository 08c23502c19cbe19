"""The one default device choice: what a command or a training run computes on when not told.

``stego features``, ``stego knn``, ``stego calibrate``, ``stego predict`` and training's own
backbone passes (feature cache, neighbour table, auto shifts) all ask here, so they agree.
"""

from __future__ import annotations

__all__ = ["resolve_device", "accelerator_device", "cuda_available"]


def cuda_available() -> bool:
    """Whether PyTorch sees a CUDA device."""
    import torch

    return torch.cuda.is_available()


def resolve_device(name: str | None = None) -> str:
    """``name`` when given (``cpu``, ``cuda:1``, ...); otherwise ``cuda`` when available, else
    ``cpu``."""
    if name:
        return name
    return "cuda" if cuda_available() else "cpu"


def accelerator_device(accelerator: str) -> str:
    """The torch device of a Lightning accelerator (``train.accelerator``) for the passes that
    run outside Lightning: ``cpu`` stays on the CPU, anything else takes the default device."""
    return "cpu" if accelerator == "cpu" else resolve_device()
