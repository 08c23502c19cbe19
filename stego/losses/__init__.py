"""Training objectives: pure tensor functions plus the modules combining them.

- :mod:`stego.losses.stego`: STEGO's correlation-distillation loss.
"""

from stego.losses.stego import *  # noqa: F403
from stego.losses.stego import __all__ as _stego_all

__all__ = list(_stego_all)
