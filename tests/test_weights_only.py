"""No checkpoint is unpickled with code execution allowed, outside ``stego.models.safe_pickle``.

``torch.load`` runs arbitrary code from the file unless ``weights_only=True``. Leaving the
argument out is not enough: torch then decides from its version and from the environment
(``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns it off), so every load must say ``True``. The same
holds for what loads on our behalf: Lightning's ``Trainer.fit(ckpt_path=...)`` and
``load_from_checkpoint``, and ``torch.hub.load_state_dict_from_url``. Two checks: every call in
the library's source, and the loads that actually happen while training, resuming and evaluating.
"""

from __future__ import annotations

import ast
import traceback
from pathlib import Path

import pytest
import torch
from test_training import data_root, tiny_config  # noqa: F401 - data_root is a fixture

import stego
from stego.eval.loading import load_for_eval
from stego.train.trainer import train

PACKAGE = Path(stego.__file__).resolve().parent
# the one place allowed to unpickle, with its allow-list
RESTRICTED = PACKAGE / "models" / "safe_pickle.py"
TORCH_LOADS = {"torch.load", "torch.serialization.load", "load_state_dict_from_url",
               "torch.hub.load_state_dict_from_url", "load_from_checkpoint"}  # fmt: skip
LIGHTNING_RESTORES = {"fit", "validate", "test", "predict"}  # with ckpt_path=...
PICKLE_LOADS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads",
                "cloudpickle.load", "cloudpickle.loads", "joblib.load"}  # fmt: skip


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _is_true(call: ast.Call, keyword: str) -> bool:
    return any(
        k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def unsafe_loads(source: str, filename: str) -> list[str]:
    """``file:line: call`` for every load in ``source`` that may execute pickled code."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # `from torch import load as tl` -> tl: torch.load
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{aliases[head]}.{rest}".rstrip(".") if head in aliases else name
        short = full.rsplit(".", 1)[-1]
        bad = (
            ((full in TORCH_LOADS or short in TORCH_LOADS - {"load"})
             and not _is_true(node, "weights_only"))
            or (short in LIGHTNING_RESTORES and any(k.arg == "ckpt_path" for k in node.keywords)
                and not _is_true(node, "weights_only"))
            or full in PICKLE_LOADS
            or (short == "load" and full.startswith(("np.", "numpy."))
                and _is_true(node, "allow_pickle"))
        )  # fmt: skip
        if bad:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_scanner_flags_unsafe_loads() -> None:
    bad = """
import torch, pickle
import numpy as np
from torch import load as tl
torch.load(p)
torch.load(p, weights_only=False)
tl(p, map_location="cpu")
torch.hub.load_state_dict_from_url(url)
trainer.fit(module, datamodule=dm, ckpt_path=last)
Module.load_from_checkpoint(p, weights_only=None)
pickle.loads(blob)
np.load(p, allow_pickle=True)
"""
    good = """
import torch
import numpy as np
torch.load(p, map_location="cpu", weights_only=True)
trainer.fit(module, datamodule=dm, ckpt_path=last, weights_only=True)
trainer.fit(module, datamodule=dm)
np.load(p, allow_pickle=False)
json.load(f)
"""
    assert len(unsafe_loads(bad, "bad.py")) == 8
    assert unsafe_loads(good, "good.py") == []


def test_library_never_loads_with_code_execution() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path != RESTRICTED:
            found += unsafe_loads(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert not found, "load without weights_only=True (or pickle) outside safe_pickle:\n" + (
        "\n".join(found)
    )


@pytest.fixture
def torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, str]]:
    """Records (weights_only, stego caller) of every torch.load reached from stego's code."""
    calls: list[tuple[object, str]] = []
    real = torch.load

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        callers = [f for f in traceback.extract_stack()[:-1]
                   if Path(f.filename).resolve().is_relative_to(PACKAGE)]  # fmt: skip
        if callers and Path(callers[-1].filename).resolve() != RESTRICTED:
            module = Path(callers[-1].filename).resolve().relative_to(PACKAGE).as_posix()
            where = f"{module}:{callers[-1].lineno}"  # e.g. "train/trainer.py:171"
            calls.append((kwargs.get("weights_only"), where))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    return calls


def test_train_resume_and_eval_load_weights_only(
    data_root: Path,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    torch_loads: list[tuple[object, str]],
) -> None:
    run = tmp_path / "run"
    train(tiny_config(data_root, 2), run, progress=False)
    train(tiny_config(data_root, 3), run, resume=True, progress=False)  # reads last.ckpt
    load_for_eval(run / "checkpoints" / "last.ckpt")
    load_for_eval(run)
    where = [w for _, w in torch_loads]
    assert any(w.startswith("train/") for w in where), where  # the resume was seen
    assert any(w.startswith("eval/loading.py") for w in where), where
    unsafe = [(flag, w) for flag, w in torch_loads if flag is not True]
    assert not unsafe, f"torch.load without weights_only=True from: {unsafe}"
