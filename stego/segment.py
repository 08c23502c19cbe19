"""``stego segment``: segment a folder of unlabeled images into K kinds of things.

The whole method in one call, with label-free defaults:

1. five-crop the images when the folder is small (more, smaller views to learn from);
2. train with :func:`stego.train.trainer.train`, which caches the frozen backbone's features and
   builds the nearest-neighbour table (one pass), chooses the loss shifts from the data itself
   (``"auto"``, :mod:`stego.features.calibration`), trains the head, and refits the cluster probe by
   cosine k-means with restarts on the learnt codes (``train.kmeans_probe``: lowest inertia
   wins, no labels needed, and steadier than the online probe alone); then, in folders of 64
   images or more, the clusters are fit once more on the codes prediction sees (whole images of
   the folder at the prediction size);
3. predict every image at its own size (:func:`stego.infer.predict.predict_paths`), optionally with
   the dense CRF, and write a contact sheet and a summary.

Every stage writes its results atomically into ``OUT/`` and skips work already done, so an
interrupted run continues where it stopped when the same command is run again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from stego.atomic import atomic_write
from stego.errors import StegoError
from stego.folder_model import SegmentSettings, on_cpu, share_features, train_model
from stego.models.choice import backbone_note, default_backbone
from stego.parallel import ONE_PROCESS, ProcessGroup

__all__ = [
    "SegmentSettings",
    "segment_folder",
    "default_backbone",
    "default_out_dir",
    "choose_steps",
]

FIVE_CROP_BELOW = 500  # folders smaller than this are five-cropped (5x the training views)
# Checkpoints (to resume an interrupted run) about five times a run, but no more often than
# every 100 steps: short runs would otherwise spend much of their time writing checkpoints.
MIN_CHECKPOINT_EVERY = 100
MAX_STEPS = 400  # see choose_steps
# Prediction: the shorter side fed to the network is at most this many times the training
# resolution (larger photos are downscaled for the network and the labels upsampled back).
# On held-out CamVid (0016E5, 480x360) predicting at short side 224 / 322 / 360 / 448 gave
# 23.2 / 23.2 / 23.7 / 23.5 mIoU at 134 / 227 / 283 / 423 s: above ~2x the training scale
# there is nothing to gain, and the cost grows with the square of the side.
PREDICT_SCALE = 2
CODE_DIM = 32  # better than 70 and 128 on CamVid at this many steps (docs/benchmarks.md)
# With labels (`--labels`), clusters found before naming when --clusters is not given: naming
# works best with more clusters than classes (docs/benchmarks.md, "Naming clusters").
NAMED_CLUSTERS = 44
# Images suggested for labelling in summary.json (stego.naming.suggest): one labelled image
# named the clusters of held-out CamVid sequences best when chosen this way.
LABEL_FIRST = 5


def default_out_dir(input_dir: str | Path) -> Path:
    """Where ``stego segment DIR`` writes without ``--out``: ``./NAME-segments`` in the current
    folder (NAME = the input folder's name), never inside the input folder itself."""
    name = Path(input_dir).expanduser().resolve().name or "images"
    return Path.cwd() / f"{name}-segments"


def choose_steps(n_items: int) -> int:
    """Training steps for ``n_items`` training views: ~13 passes (of batch 16), at least 200,
    at most 400. On held-out CamVid sequences (each segmented as its own folder, seed 0) more
    steps did not help: 0016E5 (1020 views) 24.4 mIoU after 300 steps, 23.7 after 828; 0006R0
    (505 views) 26.0 after 150, 28.1 after 410; on CamVid val the camvid preset peaked near 300
    (docs/benchmarks.md). The cap also keeps ``stego segment`` fast on large folders."""
    return int(min(MAX_STEPS, max(200, 13 * n_items // 16)))


def _say_backbone(s: SegmentSettings, progress: bool) -> None:
    if progress:
        layer = f", block {s.layer}" if s.layer else ""
        print(f"{backbone_note(s.backbone, s.weights)}{layer}", flush=True)


def _stage(number: int, text: str, progress: bool) -> None:
    if progress:
        print(f"[{number}/3] {text}", flush=True)


def _config(input_dir: Path, work: Path, s: SegmentSettings, n_items: int, skip_bad: bool) -> Any:
    from stego.config import StegoConfig

    config = StegoConfig()
    d, m, lo, t = config.data, config.model, config.loss, config.train
    d.dataset, d.data_root, d.split = "folder", str(input_dir), "all"
    d.crop_type = "five" if s.five_crop else "none"
    d.crop_dir = str(work / "crops") if s.five_crop else None
    d.cache_dir, d.skip_bad = str(work / "cache"), skip_bad
    d.resolution, d.batch_size, d.val_images, d.num_workers = s.resolution, s.batch_size, 0, 0
    m.backbone, m.layer, m.n_clusters, m.code_dim = s.backbone, s.layer, s.clusters, CODE_DIM
    m.weights = s.weights
    # Loss weights and pointwise of the Cityscapes preset: the paper's most general setting.
    lo.pos_intra_weight, lo.pos_inter_weight, lo.neg_inter_weight = 1.0, 0.577, 0.906
    lo.pointwise = False
    t.steps, t.seed, t.val_every, t.figure_every = s.steps, s.seed, 0, 0
    t.checkpoint_every = max(MIN_CHECKPOINT_EVERY, s.steps // 5)
    # the config's table size and positive ranks, shrunk for folders with fewer images
    t.knn_k = min(t.knn_k, n_items)
    t.num_neighbors = max(1, min(t.num_neighbors, t.knn_k - 1))
    t.use_feature_cache = True
    # Label-free choices: shifts calibrated on the data, clusters refit by k-means on the codes.
    lo.pos_intra_shift = lo.pos_inter_shift = lo.neg_inter_shift = "auto"
    t.kmeans_probe = True
    if s.method == "cause":
        _use_cause(config, s, n_items)
    return config


def _use_cause(config: Any, s: SegmentSettings, n_items: int) -> None:
    """CAUSE's settings (its defaults) in place of the STEGO loss's, which it does not use."""
    from stego.config import LossConfig
    from stego.models.registry import patch_size

    config.model.method = "cause"
    lo = config.loss = LossConfig()
    # one patch per cell x cell block: keep at least 2 x 2 blocks on small feature grids
    side = s.resolution // patch_size(s.backbone)
    lo.cause_cell = 4 if side >= 8 else max(1, side // 2)
    # no more concepts than sub-sampled patches in the folder (more could only be duplicates)
    lo.cause_concepts = min(lo.cause_concepts, n_items * (side // lo.cause_cell) ** 2)


def _refuse_other_naming(out: Path, naming: str) -> None:
    """A rerun with labels into ``out`` continues it only with the same ``naming``: its written
    label maps would otherwise keep the other method's classes beside a model renamed."""
    from stego.models.class_map import CLASSES_FILE

    path = out / "model" / CLASSES_FILE
    if not path.is_file():
        return
    done = json.loads(path.read_text()).get("fit", {}).get("method")
    if done in ("classifier", "majority") and done != naming:
        raise StegoError(
            f"{out} was named with --naming {done}; rerun with --naming {done} to continue it, "
            "or pass another --out (or delete that folder)"
        )


def _contact_sheet(
    out: Path, entries: list[Any] | None = None, max_images: int = 24
) -> Path | None:
    """A grid of the first images' overlay thumbnails, as one PNG (with a legend of
    ``entries``, (name, [r, g, b]), when given)."""
    from stego.viz import contact_sheet, save_png

    sheet = contact_sheet(
        sorted((out / "overlays").rglob("*.png"))[:max_images], entries=entries or ()
    )
    return None if sheet is None else save_png(sheet, out / "contact_sheet.png")


def _cluster_maps(
    out: Path, images: list[tuple[Path, Path]], clusters: int
) -> tuple[list[Path], np.ndarray]:
    """The images whose cluster map was written (skipped ones have none) and the (images,
    clusters) pixels of each cluster in those maps."""
    from stego.naming.suggest import id_histograms

    named = (out / "clusters").is_dir()  # named: labels/ hold class ids, clusters/ cluster ids
    folder = out / ("clusters" if named else "labels")
    found = [(source, folder / rel) for source, rel in images if (folder / rel).is_file()]
    return [source for source, _ in found], id_histograms([m for _, m in found], clusters)


def _images_to_label(
    input_dir: Path, sources: list[Path], counts: np.ndarray, labelled: set[Path]
) -> list[str]:
    """Up to ``LABEL_FIRST`` images (paths relative to ``input_dir``) worth labelling next
    (:func:`stego.naming.suggest.images_to_label`), leaving out the ``labelled`` sources."""
    from stego.naming.suggest import images_to_label

    skip = [i for i, source in enumerate(sources) if source in labelled]
    picks = images_to_label(counts, LABEL_FIRST, skip=skip)
    return [str(sources[i].relative_to(input_dir)) for i in picks]


def _id_counts(folder: Path, n: int) -> np.ndarray:
    """(n,) pixels of each id in the id PNGs under ``folder``."""
    from stego.naming.suggest import id_histograms

    return id_histograms(sorted(folder.rglob("*.png")), n).sum(0)


def _cluster_sizes(counts: np.ndarray) -> list[float]:
    """Each cluster's share of all pixels, from (images, clusters) pixel counts."""
    total_per_cluster = counts.sum(0)
    total = max(int(total_per_cluster.sum()), 1)
    return [round(float(c) / total, 4) for c in total_per_cluster]


def segment_folder(
    input_dir: str | Path,
    out_dir: str | Path,
    *,
    clusters: int | None = None,
    labels: str | Path | None = None,
    backbone: str | None = None,
    weights: str | Path | None = None,
    layer: int | None = None,
    steps: int | None = None,
    resolution: int | None = None,
    five_crop: bool | None = None,
    crf: bool = False,
    batch_size: int | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
    verbose: bool = False,
    method: str = "stego",
    group: ProcessGroup = ONE_PROCESS,
    naming: str = "classifier",
) -> dict[str, Any]:
    """Segment every image under ``input_dir`` into ``clusters`` kinds; outputs in ``out_dir``.

    ``method``: "stego" (default) or "cause" (``model.method``: CAUSE's clusterbook and head,
    its default settings; the rest of the run is the same).

    ``labels``: a LABELS folder (label PNGs for some of the images, same relative path and
    stem; ``classes.txt``): ``labels/`` then hold class ids (the cluster ids go to
    ``clusters/``), ``model/classes.json`` the classes, and ``clusters`` defaults to
    ``NAMED_CLUSTERS``. ``naming`` says how: "classifier" (default) fits a pixel classifier on
    the labelled pixels' codes and backbone features (:mod:`stego.naming.classifier`) and
    predicts every image with it; "majority" names each cluster after its labelled pixels'
    majority class (:func:`stego.naming.name_results`). Without labels, ``clusters`` is
    required.

    ``verbose``: also what the libraries print during training (hidden by default).
    ``group``: processes sharing the feature extraction and the prediction
    (:func:`stego.parallel.launch`); training runs in the main one, the same as in a run of one
    process, so every process's labels are those one process writes. The others return only
    ``n_images`` and ``skipped``.
    ``resolution`` and ``batch_size`` default to the config's (:class:`stego.config.DataConfig`);
    the resolution is then rounded down to a multiple of the backbone's patch size.

    Writes ``labels/`` and ``overlays/`` (same relative paths as the inputs, ``.png``),
    ``model/`` (loadable by ``stego predict`` / :func:`stego.load`), ``contact_sheet.png`` and
    ``summary.json`` (with ``images_to_label``: the images worth labelling first to name the
    clusters, :mod:`stego.naming.suggest`, leaving out those already labelled). Returns the
    summary.
    """
    from stego.config import StegoConfig
    from stego.infer.predict import collect_images, predict_paths
    from stego.models.registry import patch_size

    input_dir, out = Path(input_dir).expanduser(), Path(out_dir).expanduser()
    if clusters is None and labels is None:
        raise StegoError("say how many kinds of things to find (--clusters K), or pass --labels")
    clusters = clusters or NAMED_CLUSTERS
    if clusters < 2:
        raise StegoError(f"--clusters must be at least 2, got {clusters}")
    if method not in ("stego", "cause"):
        raise StegoError(f"--method must be stego or cause, got {method!r}")
    if naming not in ("classifier", "majority"):
        raise StegoError(f"--naming must be classifier or majority, got {naming!r}")
    images = collect_images([input_dir], exclude=out)
    if len(images) < 2:
        raise StegoError(f"{input_dir} holds {len(images)} image(s); STEGO needs at least 2")
    weights = str(Path(weights).expanduser().resolve()) if weights is not None else None
    labelled: set[Path] = set()  # sources of the labelled images
    if labels is not None:  # bad labels fail now, not after the training
        from stego.naming.labels import check_labels

        label_set = check_labels(labels, images)
        labelled = {source for source, rel in images if rel in label_set.files}
        _refuse_other_naming(out, naming)
    if backbone is None:
        backbone, default_layer = default_backbone(weights)
        layer = default_layer if layer is None else layer
    use_five = len(images) < FIVE_CROP_BELOW if five_crop is None else five_crop
    n_items = len(images) * (5 if use_five else 1)
    defaults = StegoConfig().data
    patch = patch_size(backbone)  # an unknown name fails here, listing the valid ones
    res = resolution or (defaults.resolution // patch) * patch
    s = SegmentSettings(
        clusters=clusters,
        backbone=backbone,
        layer=layer,
        resolution=res,
        steps=steps or choose_steps(n_items),
        predict_side=PREDICT_SCALE * res,
        five_crop=use_five,
        crf=crf,
        seed=seed,
        batch_size=min(batch_size or defaults.batch_size, n_items),
        method=method,
        weights=weights,
    )
    main = group.main
    progress_here = progress and main  # one process prints
    _say_backbone(s, progress_here)
    work = out / "work"
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if use_five:
        from stego.data import write_five_crops

        _stage(1, f"five-crop {len(images)} images", progress_here)
        group.on_main(
            lambda: write_five_crops(
                "folder", input_dir, "all", work / "crops", progress=progress, skip_bad=skip_bad
            )
        )
    else:
        _stage(1, f"{len(images)} images: large enough, no five-crop", progress_here)
    timings["crop"] = time.perf_counter() - start
    config = _config(input_dir, work, s, n_items, skip_bad)
    _stage(
        2,
        f"features, neighbours, "
        f"{'the CAUSE clusterbook' if method == 'cause' else 'loss shifts from the data'}, "
        f"{s.steps} training steps and "
        f"the k-means cluster fit ({s.backbone}, {n_items} views)",
        progress_here,
    )
    by_classifier = labels is not None and naming == "classifier"
    if group.world > 1:  # every process extracts its share; training then reads the cache
        share_features(config, group, progress_here)
    # training, the cluster fit (and the pixel classifier) run in one process, as in a run of
    # one; the others wait, then read the saved model
    trained = group.on_main(
        lambda: train_model(
            config,
            out,
            images,
            s,
            skip_bad,
            progress,
            verbose,
            classifier_labels=labels if by_classifier else None,
        )
    )
    model, encoded, warnings = trained if main else (None, [], [])
    if not main:
        from stego.models.pretrained import load

        model = load(out / "model")
    # every process labels the images whose codes the cluster fit computed from those codes
    encoded = [e for part in group.gather(on_cpu(encoded)) for e in part]
    timings["train"] = time.perf_counter() - start - sum(timings.values())
    _stage(3, f"predicting {len(images)} images{' with CRF' if crf else ''}", progress_here)
    result = predict_paths(
        model,
        [input_dir],
        out,
        crf=crf,
        skip_bad=skip_bad,
        progress=progress_here,
        max_side=s.predict_side,
        encoded=encoded,
        probe="class" if by_classifier else "cluster",
        keep_clusters=by_classifier,  # cluster ids in clusters/, for `stego name` later
        device=group.device,
        group=group,
    )
    timings["predict"] = time.perf_counter() - start - sum(timings.values())
    if not main:  # the summary, contact sheet and naming are written once
        return {"n_images": len(images), "skipped": [str(p) for p, _ in result.skipped]}
    classes = model.classes if by_classifier else None
    entries = None
    if classes is not None:
        class_counts = _id_counts(out / "labels", classes.n_classes)
        entries = [
            (n, c) for n, c, k in zip(classes.names, classes.colors, class_counts, strict=True) if k
        ]
    sheet = _contact_sheet(out, entries)
    sources, cluster_counts = _cluster_maps(out, images, clusters)
    summary = {
        "input": str(input_dir),
        "n_images": len(images),
        "n_training_views": n_items,
        "settings": asdict(s),
        "backbone": backbone_note(s.backbone, s.weights),
        "cluster_pixel_fraction": _cluster_sizes(cluster_counts),
        "images_to_label": _images_to_label(input_dir, sources, cluster_counts, labelled),
        "skipped": [str(p) for p, _ in result.skipped],
        "warnings": warnings,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(time.perf_counter() - start, 1),
        "outputs": {
            "labels": str(out / "labels"),
            "overlays": str(out / "overlays"),
            "model": str(out / "model"),
            "contact_sheet": str(sheet) if sheet else None,
        },
    }
    if classes is not None:
        from stego.naming.render import named_summary

        summary = named_summary(summary, classes, class_counts, out, out / "model")
    with atomic_write(out / "summary.json", "w") as handle:
        json.dump(summary, handle, indent=2)
    if labels is not None and not by_classifier:
        from stego.naming import name_results

        name_results(out, labels=labels, progress=progress)
        summary = json.loads((out / "summary.json").read_text())
    return summary
