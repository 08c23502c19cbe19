"""stego: unsupervised semantic segmentation by distilling feature correspondences (STEGO)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
