"""Module paths of stego 0.1, importable for one more release with a DeprecationWarning.

0.2 grouped the modules by pipeline stage (``stego.models``, ``stego.features``, ``stego.train``,
``stego.eval``, ``stego.infer``, ``stego.cli``). Code written against 0.1 keeps working: importing
an old path returns the new module itself, so attributes and monkeypatches are shared.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

OLD_TO_NEW: dict[str, str] = {
    "stego.backbones": "stego.models.backbone",
    "stego.offline_dinov2": "stego.models.offline_dinov2",
    "stego.heads": "stego.models.heads",
    "stego.probes": "stego.models.probes",
    "stego.segmenter": "stego.models.segmenter",
    "stego.pretrained": "stego.models.pretrained",
    "stego.safe_pickle": "stego.models.safe_pickle",
    "stego.convert_official": "stego.models.convert_official",
    "stego.feature_cache": "stego.features.cache",
    "stego.fingerprint": "stego.features.fingerprint",
    "stego.neighbors": "stego.features.neighbors",
    "stego.calibration": "stego.features.calibration",
    "stego.training": "stego.train.trainer",
    "stego.training_data": "stego.train.pairs",
    "stego.train_logging": "stego.train.console",
    "stego.evaluation": "stego.eval.protocol",
    "stego.metrics": "stego.eval.metrics",
    "stego.report": "stego.eval.report",
    "stego.plots": "stego.viz",
    "stego.prediction": "stego.infer.predict",
    "stego.crf": "stego.infer.crf",
    "stego.onnx_export": "stego.infer.onnx",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module now holding that code."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in OLD_TO_NEW:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = OLD_TO_NEW[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new} in stego 0.2; the old path goes away in 0.3",
            DeprecationWarning,
            stacklevel=3,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: ``create_module`` returned the already-imported new module."""


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
