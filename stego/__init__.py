"""stego: unsupervised semantic segmentation by distilling feature correspondences (STEGO).

Typical use::

    import stego
    model = stego.load("runs/camvid/model")       # a directory written by `stego train`
    labels = model.predict(images)                 # images (B, 3, H, W) in [0, 1]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stego import _aliases

__version__ = "0.2.0"

_aliases.install()

__all__ = ["__version__", "load", "save_pretrained", "Segmenter"]

if TYPE_CHECKING:
    from stego.models.pretrained import load, save_pretrained
    from stego.models.segmenter import Segmenter


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import stego` (and the CLI's start-up) fast.
    if name in ("load", "save_pretrained"):
        from stego.models import pretrained

        return getattr(pretrained, name)
    if name == "Segmenter":
        from stego.models.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'stego' has no attribute {name!r}")
