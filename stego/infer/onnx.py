"""Export a trained model to ONNX, checked against PyTorch with onnxruntime.

Two graphs:

- head only (default): input ``features`` (B, C, h, w), the frozen backbone's patch features;
  outputs ``code`` (B, D, h, w) and ``cluster_log_probs`` (B, K, h, w) =
  ``log_softmax(alpha * cosine(code, centroids))``. Batch and spatial axes are dynamic (CAUSE's
  TR head: batch only, its positional embedding is resized for the exported feature size). Use
  it when the backbone runs elsewhere (another runtime, a feature cache).
- with backbone: input ``images`` (B, 3, H, W) RGB in [0, 1] (not normalised); outputs ``code``
  (B, D, H/p', W/p') and ``cluster_log_probs`` (B, K, H, W), the same numbers as
  ``Segmenter.forward(images, flip=flip)``. H and W are fixed at export (the position
  embedding is resized for them); the batch axis is dynamic.

A model whose clusters are named (:mod:`stego.naming`) gets a third output, ``class_ids``
(B, h, w) / (B, H, W) int64, as ``Segmenter.predict``: the class of the most probable cluster,
or, when the classes were fit by a pixel classifier (``stego segment --labels``), the argmax of
its logits on the code and the backbone features.

The legacy TorchScript exporter is used (no onnxscript needed); the file is written atomically
after onnxruntime reproduced PyTorch's output on a random batch of 2. Models over 2 GB (ViT-g)
do not fit one ONNX protobuf and are refused by the exporter.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stego.atomic import atomic_write
from stego.errors import StegoError

__all__ = ["export_onnx", "HeadGraph", "ImageGraph"]


class HeadGraph(nn.Module):
    """features (B, C, h, w) -> (code (B, D, h, w), cluster_log_probs (B, K, h, w))."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.head = model.head
        self.clusters = nn.Parameter(
            model.cluster_probe.clusters.detach().clone(), requires_grad=False
        )
        self.alpha = float(model.meta.alpha)
        self.lookup = _class_lookup(model)
        self.classifier = _classifier(model)

    def forward(self, features: Tensor) -> tuple[Tensor, ...]:
        code = self.head(features).code  # (B, D, h, w)
        log_probs = _cluster_log_probs(code, self.clusters, self.alpha)
        if self.classifier is not None:
            return code, log_probs, self.classifier(code, features).argmax(dim=1)  # (B, h, w)
        return _with_classes(code, log_probs, self.lookup)


class ImageGraph(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> (code (B, D, h, w), cluster_log_probs (B, K, H, W))."""

    def __init__(self, model: Any, flip: bool) -> None:
        super().__init__()
        self.model = model
        self.flip = flip
        self.lookup = _class_lookup(model)
        self.classifier = _classifier(model)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images, flip=self.flip)
        if self.classifier is not None:  # the classifier's class log-probs (B, C, H, W)
            return out.code, out.cluster_log_probs, out.class_log_probs.argmax(dim=1)
        return _with_classes(out.code, out.cluster_log_probs, self.lookup)


def _class_lookup(model: Any) -> Tensor | None:
    """(K,) cluster id -> class id of a model with named clusters, else None."""
    classes = getattr(model, "classes", None)
    return classes.lookup() if classes is not None else None


def _classifier(model: Any) -> nn.Module | None:
    """The pixel classifier of a model whose classes were fit by one, else None."""
    classes = getattr(model, "classes", None)
    return classes.classifier if classes is not None else None


def _with_classes(code: Tensor, log_probs: Tensor, lookup: Tensor | None) -> tuple[Tensor, ...]:
    """(code, log_probs) and, for named clusters, class ids (B, H, W) of the best cluster."""
    if lookup is None:
        return code, log_probs
    return code, log_probs, lookup[log_probs.argmax(dim=1)]


def _cluster_log_probs(code: Tensor, clusters: Tensor, alpha: float) -> Tensor:
    """log_softmax(alpha * cosine) for code (B, D, h, w), clusters (K, D) -> (B, K, h, w).

    Written with 1x1 convolution and explicit norms (no einsum) so every ONNX runtime has it.
    """
    code_n = code / code.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cent_n = clusters / clusters.norm(dim=1, keepdim=True).clamp_min(1e-12)
    scores = F.conv2d(code_n, cent_n[:, :, None, None])  # (B, K, h, w)
    return F.log_softmax(alpha * scores, dim=1)


def _export_bytes(
    graph: nn.Module, example: Tensor, input_name: str, dynamic: dict[int, str], opset: int
) -> bytes:
    buffer = io.BytesIO()
    outputs = ["code", "cluster_log_probs"]
    if getattr(graph, "lookup", None) is not None or getattr(graph, "classifier", None) is not None:
        outputs.append("class_ids")
    axes: dict[str, dict[int, str]] = {input_name: dynamic}
    for name in outputs:
        axes[name] = {0: "batch"}
    if len(dynamic) > 1:  # head graph: spatial axes follow the input
        axes["code"] = axes["cluster_log_probs"] = dynamic
        if "class_ids" in axes:
            axes["class_ids"] = {0: "batch", 1: "height", 2: "width"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on Python bools: shapes are fixed here
            torch.onnx.export(
                graph,
                (example,),
                buffer,
                input_names=[input_name],
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
    except Exception as exc:  # exporter errors are many kinds; all mean "cannot export this"
        raise StegoError(
            f"ONNX export failed ({type(exc).__name__}: {exc}); try another "
            "--opset or export the head only"
        ) from exc
    return buffer.getvalue()


def _check(data: bytes, graph: nn.Module, sample: Tensor, input_name: str) -> float:
    """Max abs difference between onnxruntime and PyTorch outputs on ``sample``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise StegoError(
            "checking the ONNX file needs onnxruntime: pip install 'stego-seg[onnx]'"
        ) from exc
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {input_name: sample.cpu().numpy()})
    with torch.no_grad():
        want = [t.detach().cpu().numpy() for t in graph(sample)]
    return max(
        float(np.abs(g.astype(np.float64) - w).max()) for g, w in zip(got, want, strict=True)
    )


def export_onnx(
    model: Any,
    path: str | Path,
    *,
    include_backbone: bool = False,
    height: int = 224,
    width: int = 224,
    opset: int = 17,
    flip: bool = False,
    atol: float = 1e-4,
) -> float:
    """Export ``model`` (a Segmenter) to ``path``; return the max abs onnxruntime-vs-PyTorch diff.

    ``height`` / ``width`` size the example input (the image size of the backbone graph; for the
    head graph the feature map is ``height // patch`` x ``width // patch``). ``flip`` adds the
    horizontal-flip averaging to the backbone graph (2x the cost). Raises :class:`StegoError`
    when the difference exceeds ``atol`` (nothing is written then).
    """
    model = model.cpu().eval()
    patch = int(model.patch_size)
    generator = torch.Generator().manual_seed(0)
    if include_backbone:
        graph: nn.Module = ImageGraph(model, flip).eval()
        name, dynamic = "images", {0: "batch"}
        shape: tuple[int, ...] = (3, height, width)
    else:
        graph = HeadGraph(model).eval()
        name, dynamic = "features", {0: "batch", 2: "height", 3: "width"}
        if getattr(model.head, "kind", None) == "tr":  # CAUSE-TR: positions sized at export
            dynamic = {0: "batch"}
        h, w = max(1, height // patch), max(1, width // patch)
        shape = (int(model.head.in_dim), h, w)
    example = torch.rand(1, *shape, generator=generator)
    data = _export_bytes(graph, example, name, dynamic, opset)
    diff = _check(data, graph, torch.rand(2, *shape, generator=generator), name)
    if not diff <= atol:
        raise StegoError(
            f"the ONNX graph differs from PyTorch by {diff:.2e} (> {atol:.0e}); "
            f"not writing {path}. Try another opset"
        )
    with atomic_write(path) as handle:
        handle.write(data)
    return diff
