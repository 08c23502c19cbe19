"""Dense CRF refinement (Kraehenbuehl & Koltun 2011) through ``pydensecrf``, as STEGO uses it.

``dense_crf`` refines one image's class probabilities; ``dense_crf_batch`` runs many images in
worker processes and can never hang: worker errors propagate with the failing image's index,
a crashed worker raises, and an overall timeout stops the workers.

The settings are the original's (10 mean-field iterations, Gaussian kernel sxy=1 compat=3,
bilateral kernel sxy=67 srgb=3 compat=4). The bilateral kernel receives the image in BGR order
as the original passed it: the permutohedral lattice is not invariant to the channel order, so
the order changes the result slightly.

This module imports neither torch nor pydensecrf at import time, so worker processes start fast
(torch is imported only to convert tensors or by :func:`upsample_probs`).
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from stego.errors import StegoError

__all__ = [
    "CRFParams",
    "dense_crf",
    "dense_crf_batch",
    "dense_crf_labels",
    "image_to_uint8",
    "images_to_uint8_original",
    "shutdown_pools",
    "unary_energy",
    "upsample_probs",
]


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF settings; defaults are the original STEGO's.

    Attributes:
        iterations: mean-field iterations (10: converged for these kernels).
        gaussian_sxy: spatial std (pixels) of the smoothness kernel (1: removes isolated pixels).
        gaussian_compat: Potts weight of the smoothness kernel.
        bilateral_sxy: spatial std (pixels) of the appearance kernel (67: long range).
        bilateral_srgb: colour std (0-255 scale) of the appearance kernel (3: sharp colour edges).
        bilateral_compat: Potts weight of the appearance kernel.
        unary_clip: probabilities are clipped to [unary_clip, 1] before -log.
        bgr: pass the image to the bilateral kernel in BGR order, as the original did.
    """

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0
    unary_clip: float = 1e-5
    bgr: bool = True

    def __post_init__(self) -> None:
        if int(self.iterations) != self.iterations or self.iterations < 0:
            raise StegoError(f"CRFParams.iterations must be an integer >= 0, got {self.iterations}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not getattr(self, name) > 0:
                raise StegoError(f"CRFParams.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.unary_clip < 1:
            raise StegoError(f"CRFParams.unary_clip must be in (0, 1), got {self.unary_clip}")


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array or (any-device) torch tensor, without importing torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _import_densecrf() -> Any:
    try:
        import pydensecrf.densecrf as dcrf  # type: ignore[import-not-found]
    except ImportError as exc:
        raise StegoError(
            "the dense CRF needs pydensecrf: pip install 'stego-seg[crf]' "
            "(builds pydensecrf2 from source; needs a C++ compiler)"
        ) from exc
    return dcrf


def image_to_uint8(image: Any) -> np.ndarray:
    """(3, H, W) float RGB image in [0, 1] (tensor or array) -> (H, W, 3) uint8 RGB.

    Values are scaled by 255 and truncated toward zero, as the original did after undoing the
    ImageNet normalisation.
    """
    img = _to_numpy(image)
    if img.ndim != 3 or img.shape[0] != 3 or not np.issubdtype(img.dtype, np.floating):
        raise StegoError(
            f"image_to_uint8 expects a (3, H, W) float image in [0, 1], got shape {img.shape} "
            f"dtype {img.dtype}"
        )
    return np.clip(img.transpose(1, 2, 0) * 255.0, 0, 255).astype(np.uint8)


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def images_to_uint8_original(images: Any) -> np.ndarray:
    """(B, 3, H, W) float RGB in [0, 1] -> (B, H, W, 3) uint8, exactly as the original's CRF.

    The original kept images ImageNet-normalised, undid that (``x * std + mean``), then cut
    ``x * 255`` to uint8. Each step is redone here in float32, one rounding per operation as
    torch does, so a stored byte that the round trip lowers by a hair is lowered by one as
    there; :func:`image_to_uint8` or rounding would keep it.
    """
    img = _to_numpy(images)
    if img.ndim != 4 or img.shape[1] != 3 or not np.issubdtype(img.dtype, np.floating):
        raise StegoError(
            f"images_to_uint8_original expects (B, 3, H, W) float images in [0, 1], got shape "
            f"{img.shape} dtype {img.dtype}"
        )
    x = img.astype(np.float32)
    mean = np.asarray(_IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(_IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    x = (x - mean) / std  # the original's input normalisation
    x = x * std + mean  # and its undoing before the CRF
    cut = np.trunc(x * np.float32(255.0))  # float -> uint8 casts truncate toward zero
    return np.clip(cut, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def upsample_probs(logits: Any, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly upsample logits (align_corners=False) and softmax over the class axis.

    Args:
        logits: (K, h, w) or (B, K, h, w) float, tensor (any device) or array.
        size: output (H, W), usually the image size.

    Returns:
        (K, H, W) or (B, K, H, W) float32 numpy probabilities (sum to 1 over K).
    """
    import torch
    import torch.nn.functional as F

    t = logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
    if t.ndim not in (3, 4) or not t.is_floating_point():
        raise StegoError(
            f"logits must be float (K, h, w) or (B, K, h, w), got shape {tuple(t.shape)} "
            f"dtype {t.dtype}"
        )
    batched = t.ndim == 4
    t = t if batched else t.unsqueeze(0)  # (B, K, h, w)
    up = F.interpolate(t.float(), size=tuple(size), mode="bilinear", align_corners=False)
    probs = torch.softmax(up, dim=1)  # (B, K, H, W)
    out = probs.detach().cpu().numpy()
    return out if batched else out[0]


def unary_energy(probs: Any, clip: float = 1e-5) -> np.ndarray:
    """(K, H, W) probabilities -> (K, H, W) float32 C-contiguous -log(clip(probs, clip, 1))."""
    p = np.clip(_to_numpy(probs).astype(np.float32), clip, 1.0)
    return np.ascontiguousarray(-np.log(p), dtype=np.float32)


def _check_inputs(image: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    img = _to_numpy(image)
    p = _to_numpy(probs)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise StegoError(
            f"dense_crf image must be (H, W, 3) uint8 RGB, got shape {img.shape} dtype "
            f"{img.dtype}; convert a (3, H, W) float image with stego.infer.crf.image_to_uint8"
        )
    if p.ndim != 3 or not np.issubdtype(p.dtype, np.floating):
        raise StegoError(
            f"dense_crf probs must be float (K, H, W), got shape {p.shape} dtype {p.dtype}; "
            "pass softmax probabilities, not labels"
        )
    if p.shape[1:] != img.shape[:2]:
        raise StegoError(
            f"probs spatial size {p.shape[1:]} != image size {img.shape[:2]}; upsample first "
            "with stego.infer.crf.upsample_probs(logits, image.shape[:2])"
        )
    if not np.isfinite(p).all():
        raise StegoError("dense_crf probs contain NaN or inf; check the model output")
    return img, p


def dense_crf(image: Any, probs: Any, params: CRFParams | None = None) -> np.ndarray:
    """Refine per-pixel class probabilities with a fully connected CRF.

    Args:
        image: (H, W, 3) uint8 RGB picture (numpy or tensor).
        probs: (K, H, W) float probabilities at the image resolution (numpy or tensor).
        params: CRF settings; default :class:`CRFParams`.

    Returns:
        (K, H, W) float32 marginals Q (each pixel sums to 1).
    """
    params = CRFParams() if params is None else params
    img, p = _check_inputs(image, probs)
    dcrf = _import_densecrf()
    n_labels, height, width = p.shape
    unary = unary_energy(p, params.unary_clip).reshape(n_labels, height * width)  # (K, H*W)
    rgbim = np.ascontiguousarray(img[:, :, ::-1] if params.bgr else img)  # (H, W, 3) uint8
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=rgbim,
        compat=params.bilateral_compat,
    )
    q = crf.inference(int(params.iterations))
    return np.asarray(q, dtype=np.float32).reshape(n_labels, height, width)


def dense_crf_labels(image: Any, probs: Any, params: CRFParams | None = None) -> np.ndarray:
    """(H, W) int64 labels = argmax over K of :func:`dense_crf`."""
    return dense_crf(image, probs, params).argmax(0).astype(np.int64)


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _stop_workers(executor: cf.ProcessPoolExecutor) -> None:
    """Cancel pending work and kill running workers so shutdown cannot block."""
    kill = getattr(executor, "kill_workers", None)  # Python >= 3.14
    if kill is not None:
        kill()
    else:
        for proc in list((getattr(executor, "_processes", None) or {}).values()):
            proc.kill()
    executor.shutdown(wait=True, cancel_futures=True)


# One pool per worker count, kept for the life of the process: `predict` and `eval` call the
# CRF once per few images, and a fresh pool per call paid the process start-up every time
# (which made 2 workers slower than 1 on this project's 2-core benchmark machine).
_POOLS: dict[int, cf.ProcessPoolExecutor] = {}


def _pool(workers: int) -> cf.ProcessPoolExecutor:
    """The kept pool of ``workers`` spawned processes (spawn: safe with torch/CUDA threads)."""
    executor = _POOLS.get(workers)
    if executor is None:
        ctx = multiprocessing.get_context("spawn")
        executor = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        _POOLS[workers] = executor
    return executor


def shutdown_pools() -> None:
    """Stop the kept CRF worker processes (also done at interpreter exit)."""
    while _POOLS:
        _, executor = _POOLS.popitem()
        executor.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown_pools)


def _run_pool(
    fn: Callable[..., Any],
    tasks: Sequence[tuple[Any, ...]],
    *,
    workers: int,
    timeout: float | None,
    what: str,
) -> list[Any]:
    """Run fn(*task) for each task in the kept worker pool; results in task order.

    Raises StegoError naming the task index when fn raises, when a worker dies, or when the
    whole run exceeds ``timeout`` seconds (then the workers are killed and the pool dropped).
    """
    executor = _pool(workers)
    if getattr(executor, "_broken", False):  # a worker died since the last call: start afresh
        _POOLS.pop(workers, None)
        _stop_workers(executor)
        executor = _pool(workers)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        futures = {executor.submit(fn, *task): i for i, task in enumerate(tasks)}
        pending = set(futures)
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = cf.wait(pending, timeout=left, return_when=cf.FIRST_EXCEPTION)
            if not done:
                raise StegoError(
                    f"{what} did not finish within {timeout} s ({len(pending)} of {len(tasks)} "
                    "images left); raise timeout or use more workers"
                )
            failed = sorted((futures[f], f.exception()) for f in done if f.exception())
            if failed:
                index, exc = failed[0]
                if isinstance(exc, BrokenProcessPool):
                    raise StegoError(
                        f"a {what} worker process crashed (while image {index} was pending; "
                        "out of memory?); retry with fewer workers or workers=1"
                    ) from exc
                raise StegoError(
                    f"{what} failed on image {index}: {type(exc).__name__}: {exc}"
                ) from exc
        results = [None] * len(tasks)
        for future, i in futures.items():
            results[i] = future.result()
        return results
    except BaseException:
        _POOLS.pop(workers, None)
        _stop_workers(executor)
        raise


def dense_crf_batch(
    images: Sequence[Any],
    probs: Sequence[Any],
    *,
    params: CRFParams | None = None,
    workers: int | None = None,
    timeout: float | None = None,
) -> list[np.ndarray]:
    """:func:`dense_crf` on many images, in parallel worker processes.

    Args:
        images: B pictures, each (H, W, 3) uint8 RGB (sizes may differ between images).
        probs: B probability maps, each (K, H, W) float at its image's resolution.
        params: CRF settings, shared by all images.
        workers: processes to use; None = the CPUs available, <= 1 = serial in this process.
        timeout: seconds for the whole batch; None = no limit. In serial mode it is checked
            between images.

    Returns:
        B arrays (K, H, W) float32, in input order.

    Raises:
        StegoError: naming the image index if one fails, if a worker crashes, or on timeout.
    """
    params = CRFParams() if params is None else params
    if len(images) != len(probs):
        raise StegoError(f"got {len(images)} images but {len(probs)} probability maps")
    # numpy copies: workers then never unpickle torch tensors (so never import torch)
    tasks = [(_to_numpy(img), _to_numpy(p), params) for img, p in zip(images, probs, strict=True)]
    n_workers = _default_workers() if workers is None else int(workers)
    n_workers = min(n_workers, len(tasks))
    if n_workers <= 1:
        start = time.monotonic()
        out = []
        for i, task in enumerate(tasks):
            if timeout is not None and time.monotonic() - start > timeout:
                raise StegoError(
                    f"dense CRF did not finish within {timeout} s ({len(tasks) - i} images left)"
                )
            try:
                out.append(dense_crf(*task))
            except Exception as exc:
                raise StegoError(
                    f"dense CRF failed on image {i}: {type(exc).__name__}: {exc}"
                ) from exc
        return out
    return _run_pool(dense_crf, tasks, workers=n_workers, timeout=timeout, what="dense CRF")
