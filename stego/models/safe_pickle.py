"""Load PyTorch / Lightning checkpoints without letting them run code.

A pickle can name any Python callable (``os.system``, ``builtins.eval``...) and have it called
while loading. :func:`load_checkpoint` first tries ``torch.load(weights_only=True)`` (PyTorch's
own allowlist). Lightning checkpoints of the original STEGO usually fail that, because their
``hyper_parameters`` hold omegaconf ``DictConfig`` objects, ``argparse.Namespace`` or paths; then
the file is read again with :class:`RestrictedUnpickler`, whose ``find_class`` returns only:

- containers and scalars of ``builtins`` (dict, list, set, tuple, int, float, str, ...),
  ``collections.OrderedDict``, ``collections.defaultdict`` with a ``dict`` / ``list`` / no
  factory (omegaconf >= 2.1 pickles every config node's ``resolver_cache`` as
  ``defaultdict(dict)``), the tensor / parameter rebuild functions of ``torch._utils``,
  ``torch.Size``, ``torch.device``, torch dtypes (storages are resolved by ``torch.load`` itself);
- stand-ins for omegaconf, argparse, Lightning ``AttributeDict``, ``pathlib`` paths and
  ``typing`` names, which only collect the arguments and state they are given; omegaconf is
  never imported. :func:`to_plain` turns them into dicts, lists and strings;
- name-only stand-ins for Lightning callback classes: Lightning 1.x keys a checkpoint's
  ``callbacks`` dict by the callback class itself; the stand-in keeps the name and cannot be
  instantiated. Lightning is never imported.

Anything else raises :class:`StegoError` naming the refused global, before it could be called.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import types
import warnings
import zipfile
from collections import OrderedDict, defaultdict
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from stego.errors import StegoError

__all__ = [
    "NameOnly",
    "RestrictedUnpickler",
    "Record",
    "load_checkpoint",
    "to_plain",
    "restricted_pickle_module",
]

_BUILTINS = {
    "dict",
    "list",
    "set",
    "frozenset",
    "tuple",
    "int",
    "float",
    "complex",
    "str",
    "bytes",
    "bytearray",
    "bool",
    "slice",
    "NoneType",
}
_TORCH_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
}
_RECORD_MODULES = ("omegaconf", "argparse", "typing", "enum")  # collected, never imported
_DICT_LIKE = {"AttributeDict"}  # Lightning's dict subclass (any lightning module path)
_LIGHTNING = ("lightning", "pytorch_lightning")


class Record:
    """Stand-in for a refused-but-harmless class: keeps the global's name, args and state."""

    qualname = "Record"
    # Class-level defaults: pickle's NEWOBJ (protocol 2, how omegaconf objects are written)
    # creates instances through __new__ alone, without calling __init__.
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS on dict subclasses
        self.__dict__.setdefault("items", {})[key] = value

    @property
    def items(self) -> dict[Any, Any]:
        return self.__dict__.get("items", {})

    def __repr__(self) -> str:
        return f"<{self.qualname} args={self.args!r} state={type(self.state).__name__}>"


def _record_class(module: str, name: str) -> type[Record]:
    return type(name, (Record,), {"qualname": f"{module}.{name}", "__module__": __name__})


class NameOnly:
    """Stand-in for a class that a checkpoint may name (as a dict key) but never instantiate."""

    qualname = "NameOnly"

    def __new__(cls, *args: Any, **kwargs: Any) -> NameOnly:
        raise StegoError(
            f"refused to create an object of {cls.qualname}: a checkpoint may only name this "
            "class (Lightning keys its callback states by class), not build one"
        )


def _name_only_class(module: str, name: str) -> type[NameOnly]:
    return type(name, (NameOnly,), {"qualname": f"{module}.{name}", "__module__": __name__})


def _defaultdict(*args: Any) -> defaultdict[Any, Any]:
    """``collections.defaultdict`` as a pickle may call it: only ``dict`` / ``list`` / no factory
    (the factory runs on every missing key later, so anything else could run code then)."""
    factory = args[0] if args else None
    if len(args) > 1 or not (factory is None or factory is dict or factory is list):
        shown = getattr(factory, "qualname", None) or getattr(factory, "__qualname__", None)
        raise StegoError(
            f"refused to load collections.defaultdict with factory {shown or repr(factory)}: "
            "only dict, list or none are allowed in checkpoints"
        )
    return defaultdict(factory)


def _pure_path(*parts: Any) -> str:
    return str(PurePosixPath(*[str(p) for p in parts]))


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose ``find_class`` serves only the allowlist of the module docstring."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 0-2 pickles (torch.save's default is 2) name some builtins by their Python 2
        # names (str is "__builtin__.unicode"); translate them as pickle's own find_class does,
        # then apply the allowlist to the Python 3 name.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return _builtin(name)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("collections", "defaultdict"):
            return _defaultdict
        if (module, name) in _TORCH_FUNCTIONS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in _RECORD_MODULES:
            return _record_class(module, name)
        if module.split(".")[0] in _LIGHTNING:
            if name in _DICT_LIKE:
                return dict
            if "callbacks" in module.split("."):
                return _name_only_class(module, name)
        if module in ("pathlib", "pathlib._local") and name.endswith("Path"):
            return _pure_path
        raise StegoError(
            f"refused to load the Python global {module}.{name}: it is not on the "
            "allowlist of checkpoint types and could run code"
        )


def _builtin(name: str) -> Any:
    import builtins

    return type(None) if name == "NoneType" else getattr(builtins, name)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data: bytes, **kwargs: Any) -> Any:
    import io

    return _restricted_load(io.BytesIO(data), **kwargs)


def restricted_pickle_module() -> types.ModuleType:
    """A module usable as ``torch.load(pickle_module=...)``: restricted Unpickler / load."""
    module = types.ModuleType("stego_restricted_pickle")
    module.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    module.load = _restricted_load  # type: ignore[attr-defined]
    module.loads = _restricted_loads  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return module


def load_checkpoint(path: str | Path) -> Any:
    """Load a torch checkpoint (zip or legacy format, or a plain pickle) without running code.

    Returns the stored object with stand-ins (:class:`Record`) for omegaconf / argparse objects;
    pass it through :func:`to_plain` to get plain dicts. Raises :class:`StegoError` naming the
    file and the refused global when the checkpoint wants anything outside the allowlist.
    """
    path = Path(path)
    if not path.is_file():
        raise StegoError(f"checkpoint {path} does not exist; check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes of torch's own unpickler
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # a global outside torch's allowlist: try ours, which knows the config types
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise StegoError(f"cannot read checkpoint {path}: {exc}; re-download it") from exc
    try:
        return torch.load(
            str(path),
            map_location="cpu",
            weights_only=False,
            pickle_module=restricted_pickle_module(),
        )
    except StegoError as exc:
        raise StegoError(
            f"checkpoint {path}: {exc}. Do not load it unless you trust its "
            "source (then convert it with plain torch.load yourself)"
        ) from None
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        AttributeError,
    ) as exc:
        raise StegoError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def to_plain(obj: Any, _seen: frozenset[int] = frozenset()) -> Any:
    """Replace stand-ins by plain data, recursively (JSON-like: dict, list, str, numbers).

    omegaconf ``DictConfig`` / ``ListConfig`` become dict / list of their values, value nodes
    their value, ``argparse.Namespace`` a dict; other stand-ins ``{"__class__", "args", "state"}``.
    Tensors are kept. Reference cycles (omegaconf ``_parent`` links) are cut. Stand-in classes
    (a Lightning callback class keying ``callbacks``, ``typing.Any``) become their dotted name.
    """
    if isinstance(obj, type) and issubclass(obj, (Record, NameOnly)):
        return obj.qualname
    if id(obj) in _seen:
        return None
    seen = _seen | {id(obj)}
    if isinstance(obj, Record):
        return _record_to_plain(obj, seen)
    if isinstance(obj, dict):
        return {to_plain(k, seen): to_plain(v, seen) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, seen) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def _record_to_plain(record: Record, seen: frozenset[int]) -> Any:
    state = record.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
        state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
    if isinstance(state, dict) and "_content" in state:  # omegaconf container
        content = state["_content"]
        if isinstance(content, (dict, list)):
            return to_plain(content, seen)
        return None if content in (None, "???") else to_plain(content, seen)
    if isinstance(state, dict) and "_val" in state:  # omegaconf value node
        return to_plain(state["_val"], seen)
    if record.qualname == "argparse.Namespace":
        return to_plain(state if isinstance(state, dict) else record.kwargs, seen)
    plain: dict[str, Any] = {"__class__": record.qualname}
    if record.args:
        plain["args"] = to_plain(list(record.args), seen)
    if state is not None:
        plain["state"] = to_plain(
            {k: v for k, v in state.items() if k != "_parent"}
            if isinstance(state, dict)
            else state,
            seen,
        )
    if record.items:
        plain["items"] = to_plain(record.items, seen)
    return plain
