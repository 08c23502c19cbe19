"""The paper's evaluation protocol (reference section 9), for a model or a saved checkpoint.

Per image: code averaged with its horizontal flip, upsampled bilinearly to the label size;
cluster probe ``log_softmax(2 * cosine)``, linear probe ``log_softmax(logits)`` (both done by
:class:`~stego.models.segmenter.Segmenter`); optionally a dense CRF on the probabilities (in worker
processes); argmax. Then ONE confusion matrix over the whole split, Hungarian matching for the
cluster probe, the identity for the linear probe (:mod:`stego.eval.metrics`; rule ``"strict"``
counts pixels of unmatched extra clusters as errors, ``"original"`` drops them as the original
code did).

The CRF sees the un-normalised image as uint8. ``crf_image="round"``: ``floor(x * 255 + 0.5)``
clipped to [0, 255], which gives back the stored bytes exactly. ``"truncate"``: the original's rule
(:func:`stego.infer.crf.images_to_uint8_original`: ImageNet normalisation undone in float32, then
``x * 255`` cut), where float error drops some bytes by one; the paper presets use it so that CRF
results match the original's. :func:`evaluate_checkpoint` takes this and the image resize from the
model's training config (a converted original checkpoint: nearest and truncate).

:func:`evaluate_checkpoint` loads the model (:mod:`stego.eval.loading`) and writes the
evaluation's files to ``out/`` (:mod:`stego.eval.outputs`); the HTML report is a separate step
built from those files (:func:`stego.eval.report.write_report`, ``stego eval --report``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stego.data.classes import generic_class_names
from stego.errors import StegoError
from stego.eval.loading import load_for_eval
from stego.eval.metrics import UnsupervisedMetrics, map_clusters
from stego.eval.outputs import (
    EvalResult,
    format_table,
    load_examples,
    metrics_dict,
    save_examples,
    write_outputs,
)
from stego.models.segmenter import Segmenter
from stego.parallel import ONE_PROCESS, ProcessGroup
from stego.viz import Example, default_palette

# The protocol, plus names defined in stego.eval.outputs / stego.eval.loading and re-exported so
# that code importing them from here (or from the 0.1 path ``stego.evaluation``) keeps working.
__all__ = [
    "EvalResult",
    "Example",
    "evaluate",
    "evaluate_checkpoint",
    "images_to_uint8",
    "load_for_eval",
    "format_table",
    "metrics_dict",
    "save_examples",
    "load_examples",
    "write_outputs",
]


def images_to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) float RGB in [0, 1] -> (B, H, W, 3) uint8, rounding half up."""
    u8 = (images.detach().float() * 255.0 + 0.5).floor().clamp(0, 255).to(torch.uint8)
    return u8.permute(0, 2, 3, 1).cpu().numpy()


def _batches(dataset: Iterable[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Group consecutive items of equal image and label size into lists of <= batch_size."""
    batch: list[dict[str, Any]] = []
    for item in dataset:
        if "label" not in item:
            raise StegoError(
                f"item {item.get('path', item.get('index'))} has no label: evaluation needs a "
                "labelled split (use `stego predict` for unlabelled images)"
            )
        key = (tuple(item["image"].shape), tuple(item["label"].shape))
        if batch and (len(batch) == batch_size or key != batch[0]["_key"]):
            yield batch
            batch = []
        batch.append({**item, "_key": key})
    if batch:
        yield batch


def _crf_argmax(
    log_probs: Sequence[Tensor], images_u8: np.ndarray, workers: int | None
) -> list[Tensor]:
    """Dense CRF on each (B, K, H, W) log-prob map (all in one worker pool) -> (B, H, W) ids."""
    from stego.infer.crf import dense_crf_batch

    probs = [p.exp().float().cpu().numpy() for p in log_probs]
    flat = [p[i] for p in probs for i in range(p.shape[0])]  # each (K, H, W)
    refined = dense_crf_batch([*images_u8] * len(probs), flat, workers=workers)
    n = images_u8.shape[0]
    out = []
    for j, p in enumerate(log_probs):
        ids = np.stack([q.argmax(0) for q in refined[j * n : (j + 1) * n]])  # (B, H, W)
        out.append(torch.from_numpy(ids.astype(np.int64)).to(p.device))
    return out


def _predict(
    model: Segmenter,
    images: Tensor,
    size: tuple[int, int],
    *,
    flip: bool,
    crf: bool,
    crf_workers: int | None,
    use_linear: bool,
    crf_image: str = "round",
) -> tuple[Tensor, Tensor | None]:
    """Cluster ids (B, H, W) and linear ids (B, H, W) or None, at label size ``size``."""
    if not crf:  # ids only: the cheaper exact argmax (Segmenter.labels)
        with_linear = use_linear and model.linear_probe is not None
        probes = ("cluster", "linear") if with_linear else ("cluster",)
        ids = model.predict_probes(images, flip=flip, size=size, probes=probes)
        return ids["cluster"], ids.get("linear")
    out = model(images, flip=flip, size=size)
    maps = [out.cluster_log_probs]  # (B, K, H, W)
    if use_linear and out.linear_log_probs is not None:
        maps.append(out.linear_log_probs)  # (B, n, H, W)
    at_size = (
        images
        if images.shape[-2:] == size
        else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    )
    if crf_image == "truncate":
        from stego.infer.crf import images_to_uint8_original

        picture = images_to_uint8_original(at_size)
    else:
        picture = images_to_uint8(at_size)
    preds = _crf_argmax(maps, picture, crf_workers)
    return preds[0], preds[1] if len(preds) > 1 else None


def _n_clusters(model: Segmenter) -> int:
    probe: Any = model.cluster_probe
    return int(probe.clusters.shape[0])


def _check_model(model: Segmenter, n_classes: int, extra_clusters: int | None) -> tuple[int, bool]:
    """Resolve extra clusters and whether the linear probe can be scored on these classes."""
    n_clusters = _n_clusters(model)
    extra = n_clusters - n_classes if extra_clusters is None else int(extra_clusters)
    if n_classes + extra != n_clusters:
        raise StegoError(
            f"the model has {n_clusters} clusters but n_classes + extra_clusters = "
            f"{n_classes} + {extra}; set extra_clusters={n_clusters - n_classes} or leave it None"
        )
    if extra < 0:
        raise StegoError(
            f"the model has {n_clusters} clusters, fewer than the {n_classes} classes of this "
            "dataset; evaluate on the dataset it was trained for (--dataset) or retrain"
        )
    probe: Any = model.linear_probe
    use_linear = probe is not None and int(probe.n_classes) == n_classes
    if probe is not None and not use_linear:
        warnings.warn(
            f"linear probe has {probe.n_classes} classes, the dataset {n_classes}; "
            "skipping linear-probe scores",
            stacklevel=3,
        )
    return extra, use_linear


def evaluate(
    model: Segmenter,
    dataset: Iterable[dict[str, Any]] | Any,
    *,
    n_classes: int,
    class_names: Sequence[str] | None = None,
    crf: bool = False,
    crf_workers: int | None = None,
    crf_image: str = "round",
    flip: bool = True,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    extra_clusters: int | None = None,
    rule: str = "strict",
    progress: bool = True,
    n_figure_images: int = 8,
    group: ProcessGroup = ONE_PROCESS,
) -> EvalResult:
    """Score ``model`` on a labelled dataset with the paper's protocol.

    Args:
        model: the inference model.
        dataset: items ``{"image": (3, H, W) float [0, 1], "label": (H, W) int64, ...}``. Items
            of different sizes are fine (full-frame): batches group consecutive equal sizes.
        n_classes: number of classes; class_names: their names (default "class k").
        crf: refine both probes' probabilities with the dense CRF (in ``crf_workers`` processes,
            None = all CPUs).
        crf_image: the CRF's uint8 picture, ``"round"`` or ``"truncate"`` (the original's).
        flip: average the code with the horizontally flipped image's (the paper's protocol).
        extra_clusters: clusters beyond n_classes; None = read from the model.
        rule: "strict" or "original" counting of extra-cluster pixels (see stego.eval.metrics).
        n_figure_images: how many leading images to keep as :class:`Example` for figures.
        group: the processes sharing the items (:func:`stego.parallel.launch`), each calling
            this: each scores a stretch of whole batches (:meth:`ProcessGroup.block`), the
            confusion matrices are summed over the processes (torchmetrics' sync when the
            scores are computed), every process gets the result.
    """
    names = list(generic_class_names(n_classes) if class_names is None else class_names)
    if len(names) != n_classes:
        raise StegoError(f"got {len(names)} class names for {n_classes} classes")
    if batch_size < 1:
        raise StegoError(f"batch_size must be >= 1, got {batch_size}")
    if crf_image not in ("round", "truncate"):
        raise StegoError(f"unknown crf_image {crf_image!r}; choose round or truncate")
    extra, use_linear = _check_model(model, n_classes, extra_clusters)
    model = model.to(device).eval()
    cluster_metric = UnsupervisedMetrics(n_classes, extra_clusters=extra, rule=rule).to(device)  # type: ignore[arg-type]
    linear_metric = UnsupervisedMetrics(n_classes, rule=rule, hungarian=False).to(device)  # type: ignore[arg-type]
    raw: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, str]] = []
    n_images = 0
    bar = _progress(dataset, progress and group.main)
    if group.world > 1:  # a stretch of whole batches: batched as one process batches them
        from torch.utils.data import Subset

        dataset = Subset(dataset, group.block(len(dataset), batch_size))
    for items in _batches(dataset, batch_size):
        images = torch.stack([it["image"] for it in items]).to(device)  # (B, 3, H, W)
        labels = torch.stack([torch.as_tensor(it["label"]) for it in items]).to(device)  # (B, H, W)
        size = (int(labels.shape[-2]), int(labels.shape[-1]))
        cluster, linear = _predict(
            model,
            images,
            size,
            flip=flip,
            crf=crf,
            crf_workers=crf_workers,
            use_linear=use_linear,
            crf_image=crf_image,
        )
        cluster_metric.update(cluster, labels)
        if linear is not None:
            linear_metric.update(linear, labels)
        _keep_examples(raw, items, images, labels, cluster, linear, n_figure_images)
        n_images += len(items)
        if bar is not None:
            bar.update(len(items) * group.world)
    if bar is not None:
        bar.close()
    if group.world > 1:
        n_images = int(group.sum(torch.tensor(n_images, device=group.device)))
        raw = group.concat(raw)[:n_figure_images]
    if n_images == 0:
        raise StegoError("the evaluation dataset is empty; check --data-root and --split")
    cluster_scores = cluster_metric.scores()
    linear_scores = linear_metric.scores() if use_linear else None
    examples = [
        Example(img, lab, map_clusters(clu, cluster_scores.assignment), lin, name)
        for img, lab, clu, lin, name in raw
    ]
    return EvalResult(
        cluster_scores, linear_scores, examples, n_images, names, crf, flip, extra, rule
    )


def _progress(dataset: Any, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    total = len(dataset) if hasattr(dataset, "__len__") else None
    return tqdm(total=total, unit="img", desc="evaluating")


def _keep_examples(
    raw: list[Any],
    items: list[dict[str, Any]],
    images: Tensor,
    labels: Tensor,
    cluster: Tensor,
    linear: Tensor | None,
    limit: int,
) -> None:
    """Append (image u8 at label size, label, cluster ids, linear ids, name) until ``limit``."""
    take = min(limit - len(raw), len(items))
    if take <= 0:
        return
    size = labels.shape[-2:]
    imgs = images[:take]
    if imgs.shape[-2:] != size:
        imgs = F.interpolate(imgs, size=tuple(size), mode="bilinear", align_corners=False)
    u8 = images_to_uint8(imgs)
    for i in range(take):
        name = Path(str(items[i].get("path", items[i].get("index", len(raw))))).name
        lin = None if linear is None else linear[i].cpu().numpy()
        raw.append((u8[i], labels[i].cpu().numpy(), cluster[i].cpu().numpy(), lin, name))


# --------------------------------------------------------------------------- end to end


def _dataset_info(name: str, model: Segmenter) -> tuple[str, list[str], np.ndarray]:
    """Canonical name, class names and (n, 3) uint8 palette of dataset ``name``.

    ``folder`` datasets have no classes of their own: they come from the model (its class names,
    else "class k" for its linear-probe classes or its clusters).
    """
    from stego.data import dataset_info

    info = dataset_info(name)
    meta = model.meta
    names = list(info.class_names) or list(meta.class_names or [])
    if not names:
        n = meta.n_classes or _n_clusters(model)
        names = list(generic_class_names(n))
    palette = np.asarray(info.palette, dtype=np.uint8)
    if len(palette) < len(names):
        fallback = meta.palette if meta.palette and len(meta.palette) >= len(names) else None
        palette = np.asarray(fallback if fallback else default_palette(len(names)), dtype=np.uint8)
    return info.name, names, palette[: len(names)]


def _preparation(config: dict[str, Any] | None) -> tuple[str, str]:
    """(image interpolation, CRF picture rule) a model was trained with: its config's ``data``
    section; an original checkpoint converted by ``stego convert-official`` (config key
    ``official``) gets the original's nearest resize and truncation; else bilinear, round."""
    if isinstance(config, dict) and isinstance(config.get("data"), dict):
        data = config["data"]
        return str(data.get("interpolation", "bilinear")), str(data.get("crf_image", "round"))
    if isinstance(config, dict) and "official" in config:
        return "nearest", "truncate"
    return "bilinear", "round"


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path,
    *,
    out: str | Path,
    dataset: str | None = None,
    split: str = "val",
    label_dir: str | Path | None = None,
    crf: bool = False,
    crf_workers: int | None = None,
    crf_image: str | None = None,
    interpolation: str | None = None,
    flip: bool = True,
    full_frame: bool = False,
    resolution: int = 320,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    rule: str = "strict",
    progress: bool = True,
    n_figure_images: int = 8,
    echo: Any = print,
    group: ProcessGroup = ONE_PROCESS,
) -> EvalResult:
    """Evaluate a saved model on a dataset split and write the results to ``out``.

    ``checkpoint``: a run directory, a model directory or a Lightning ``.ckpt`` (see
    :func:`load_for_eval`). ``dataset`` defaults to the one the model was trained on. Images are
    resized (shorter side ``resolution``) and centre-cropped to a square, the paper's protocol;
    ``full_frame`` keeps the whole resized image instead. ``label_dir``: the label folder of a
    ``folder`` dataset (its split is always "all"). ``interpolation`` (image resize, labels are
    always nearest) and ``crf_image`` (see :func:`evaluate`) default to what the model was
    trained with (:func:`_preparation`). ``echo`` receives the score table (None = silent).
    The HTML report is a later step on ``out``: :func:`stego.eval.report.write_report`.
    ``group``: the processes sharing the items (see :func:`evaluate`); the first writes ``out``.
    """
    from stego.data import PairTransform, build_dataset

    loaded = load_for_eval(checkpoint, device=device)
    model = loaded.model
    name = dataset or model.meta.dataset
    if not name:
        raise StegoError(f"{checkpoint} does not record its dataset; pass --dataset NAME")
    name, class_names, palette = _dataset_info(name, model)
    trained_interpolation, trained_crf_image = _preparation(loaded.config)
    interpolation = interpolation or trained_interpolation
    crf_image = crf_image or trained_crf_image
    crop = "none" if full_frame else "center"
    transform = PairTransform(resolution, crop=crop, interpolation=interpolation)  # type: ignore[arg-type]
    extra: dict[str, Any] = {}
    if name == "folder":
        if label_dir is None:
            raise StegoError("the folder dataset needs its labels: pass --label-dir DIR")
        extra = {"label_dir": label_dir, "n_classes": len(class_names)}
        split = "all"
    data = build_dataset(name, data_root, split, transform=transform, **extra)
    result = evaluate(
        model,
        data,
        n_classes=len(class_names),
        class_names=class_names,
        crf=crf,
        crf_workers=crf_workers,
        crf_image=crf_image,
        flip=flip,
        batch_size=batch_size,
        device=device,
        rule=rule,
        progress=progress,
        n_figure_images=n_figure_images,
        group=group,
    )
    if not group.main:
        return result
    settings: dict[str, Any] = dict(full_frame=full_frame, resolution=resolution)
    settings.update(batch_size=batch_size, interpolation=interpolation, crf_image=crf_image)
    result.settings = settings
    write_outputs(
        result,
        out,
        palette,
        dataset=name,
        split=split,
        checkpoint=str(loaded.source),
        config=loaded.config,
        eval_settings=settings,
    )
    if echo is not None:
        echo(f"{name} / {split}: {result.n_images} images, crf={crf}, flip={flip}, rule={rule}")
        echo(format_table(result))
    return result
