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
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from stego.atomic import atomic_write
from stego.errors import StegoError
from stego.models.choice import backbone_note, default_backbone

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
# The cluster probe is refit on the codes prediction computes (whole images at the prediction
# size, flip-averaged) of this many images of the folder, chosen at random (seeded): ~60k codes
# at 480 x 360, more than the 50k rows k-means samples. See _fit_clusters_to_folder.
PROBE_FIT_IMAGES = 64
# Smaller folders keep the clusters training fit on its five-cropped views: the refit was only
# measured on folders of 101-367 images (+1.4 mIoU), and on the 4 photos of `stego demo` it
# merged the cat, the cup and the backgrounds into one cluster that training's fit kept apart.
FOLDER_FIT_MIN_IMAGES = 64
# With labels (`--labels`), clusters found before naming when --clusters is not given: naming
# works best with more clusters than classes (docs/benchmarks.md, "Naming clusters").
NAMED_CLUSTERS = 44


@dataclass
class SegmentSettings:
    """What ``stego segment`` decided (or was told); saved in ``summary.json``."""

    clusters: int
    backbone: str
    layer: int | None
    resolution: int
    steps: int
    predict_side: int  # shorter side fed to the network at prediction, at most
    five_crop: bool
    crf: bool
    seed: int
    batch_size: int
    shifts: dict[str, float] = field(default_factory=dict)
    method: str = "stego"  # "cause": CAUSE's clusterbook and head instead of STEGO's loss
    weights: str | None = None  # a local weights file for the backbone


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


def _refuse_other_settings(config: Any, run: Path, out: Path) -> None:
    """A rerun into the same ``out`` continues the earlier run only with the same settings;
    otherwise it would reuse a model trained for others (e.g. another --clusters)."""
    from stego.train.checkpoints import config_diffs

    # --skip-bad may be added to get past a bad image: it does not change what was learnt
    diffs = config_diffs(config, run / "config.yaml")
    diffs = [d for d in diffs if not d.startswith("data.skip_bad")]
    if diffs:
        raise StegoError(
            f"{out} holds a run with other settings ({'; '.join(diffs)}); rerun with the same "
            "settings to continue it, or pass another --out (or delete that folder)"
        )


def _folder_model(
    out: Path,
    run: Path,
    images: list[tuple[Path, Path]],
    s: SegmentSettings,
    skip_bad: bool,
    progress: bool,
    with_features: bool = False,
) -> tuple[Any, list[Any]]:
    """The trained model, saved to ``out/model``, with its clusters refit to the folder when it
    holds at least ``FOLDER_FIT_MIN_IMAGES`` images, and the codes (and backbone features, with
    ``with_features``) of the images it was fit on (none when a model saved there by an
    interrupted run is reused, which keeps its labels consistent)."""
    from stego.models.pretrained import load, save_pretrained

    saved = out / "model"
    if (saved / "config.json").is_file():
        model = load(saved)
        if "cluster_fit" in model.meta.extra:
            return model, []
    model = load(run / "model")
    train_config = yaml.safe_load((run / "config.yaml").read_text())
    if len(images) < FOLDER_FIT_MIN_IMAGES:
        save_pretrained(model, saved, train_config=train_config)
        return model, []
    if progress:
        count = min(PROBE_FIT_IMAGES, len(images))
        print(f"fitting the {s.clusters} clusters to the codes of {count} images", flush=True)
    encoded = _fit_clusters_to_folder(model, images, s, skip_bad, with_features)
    n_codes = sum(e.found.code[0, 0].numel() for e in encoded)
    model.meta.extra["cluster_fit"] = {"codes": n_codes, "max_side": s.predict_side}
    save_pretrained(model, saved, train_config=train_config)
    return model, encoded


def _fit_clusters_to_folder(
    model: Any,
    images: list[tuple[Path, Path]],
    s: SegmentSettings,
    skip_bad: bool,
    with_features: bool = False,
) -> list[Any]:
    """Refit the model's cluster centroids by spherical k-means (10 restarts, seeded) on the codes
    that prediction will compute: up to ``PROBE_FIT_IMAGES`` whole images of the folder at the
    prediction size, flip-averaged. Returns their codes (:class:`stego.infer.predict.EncodedImage`
    list), from which prediction labels them without a second backbone pass.

    Training fits the centroids on its five-cropped 224-pixel views (without flip), whose codes
    are distributed differently from those of whole images at up to 2x that scale. On held-out
    CamVid sequences (each segmented as its own folder, seeds 0 / 1) this refit gave 28.8 / 28.6
    vs 27.5 / 27.1 mIoU (0006R0) and 27.7 / 27.9 vs 26.6 / 26.3 (0016E5); docs/benchmarks.md.
    """
    import torch

    from stego.infer.predict import encode_paths

    rng = np.random.default_rng(s.seed)
    count = min(PROBE_FIT_IMAGES, len(images))
    pick = sorted(rng.choice(len(images), size=count, replace=False).tolist())
    encoded = encode_paths(
        model,
        [images[i][0] for i in pick],
        max_side=s.predict_side,
        skip_bad=skip_bad,
        with_features=with_features,
    )
    if not encoded:
        raise StegoError(
            "none of the sampled images could be read to fit the clusters; check the folder"
        )
    rows = torch.cat([e.found.code[0].flatten(1).T for e in encoded])  # (N, D)
    generator = torch.Generator().manual_seed(s.seed)
    model.cluster_probe.fit_kmeans(rows, n_restarts=10, generator=generator)
    return encoded


def _position_warning(
    model: Any, images: list[tuple[Path, Path]], s: SegmentSettings, progress: bool
) -> list[str]:
    """:func:`stego.eval.labelfree.position_warning` of the folder, with ``s``'s settings."""
    from stego.eval.labelfree import position_warning

    return position_warning(
        model,
        [source for source, _ in images],
        clusters=s.clusters,
        resolution=s.resolution,
        backbone=s.backbone,
        seed=s.seed,
        progress=progress,
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


def _id_counts(folder: Path, n: int) -> np.ndarray:
    """(n,) pixels of each id in the id PNGs under ``folder``."""
    from PIL import Image

    counts = np.zeros(n, dtype=np.int64)
    for path in folder.rglob("*.png"):
        with Image.open(path) as im:
            counts += np.bincount(np.asarray(im).ravel(), minlength=n)[:n]
    return counts


def _cluster_sizes(out: Path, clusters: int) -> list[float]:
    named = (out / "clusters").is_dir()  # named: labels/ hold class ids, clusters/ cluster ids
    counts = _id_counts(out / ("clusters" if named else "labels"), clusters)
    total = max(int(counts.sum()), 1)
    return [round(float(c) / total, 4) for c in counts]


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
    ``resolution`` and ``batch_size`` default to the config's (:class:`stego.config.DataConfig`);
    the resolution is then rounded down to a multiple of the backbone's patch size.

    Writes ``labels/`` and ``overlays/`` (same relative paths as the inputs, ``.png``),
    ``model/`` (loadable by ``stego predict`` / :func:`stego.load`), ``contact_sheet.png`` and
    ``summary.json``. Returns the summary.
    """
    from stego.config import StegoConfig
    from stego.infer.predict import collect_images, predict_paths
    from stego.losses import SHIFT_KEYS
    from stego.models.registry import patch_size
    from stego.train.trainer import train

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
    if labels is not None:  # bad labels fail now, not after the training
        from stego.naming.labels import check_labels

        check_labels(labels, images)
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
    _say_backbone(s, progress)
    work = out / "work"
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if use_five:
        from stego.data import write_five_crops

        _stage(1, f"five-crop {len(images)} images", progress)
        write_five_crops(
            "folder", input_dir, "all", work / "crops", progress=progress, skip_bad=skip_bad
        )
    else:
        _stage(1, f"{len(images)} images: large enough, no five-crop", progress)
    timings["crop"] = time.perf_counter() - start
    config = _config(input_dir, work, s, n_items, skip_bad)
    _stage(
        2,
        f"features, neighbours, "
        f"{'the CAUSE clusterbook' if method == 'cause' else 'loss shifts from the data'}, "
        f"{s.steps} training steps and "
        f"the k-means cluster fit ({s.backbone}, {n_items} views)",
        progress,
    )
    run = work / "run"
    last = run / "checkpoints" / "last.ckpt"
    finished = (run / "model" / "config.json").is_file()
    if run.exists() and not finished and not last.is_file():
        shutil.rmtree(run)  # stopped before its first checkpoint: nothing worth keeping
    _refuse_other_settings(config, run, out)
    if not finished:
        log = print if progress else None
        train(config, run, resume=last.is_file(), progress=progress, verbose=verbose, log=log)
    resolved = yaml.safe_load((run / "config.yaml").read_text())["loss"]
    if method == "stego":
        s.shifts = {term: round(float(resolved[key]), 4) for term, key in SHIFT_KEYS.items()}
    by_classifier = labels is not None and naming == "classifier"
    model, encoded = _folder_model(out, run, images, s, skip_bad, progress, by_classifier)
    if by_classifier:
        from stego.naming.classifier import name_folder_by_classifier

        if progress:
            print("fitting the pixel classifier to the labelled images", flush=True)
        name_folder_by_classifier(
            model, labels, images, out / "model", max_side=s.predict_side, seed=s.seed
        )
    warnings = _position_warning(model, images, s, progress)
    timings["train"] = time.perf_counter() - start - sum(timings.values())
    _stage(3, f"predicting {len(images)} images{' with CRF' if crf else ''}", progress)
    result = predict_paths(
        model,
        [input_dir],
        out,
        crf=crf,
        skip_bad=skip_bad,
        progress=progress,
        max_side=s.predict_side,
        encoded=encoded,
        probe="class" if by_classifier else "cluster",
        keep_clusters=by_classifier,  # cluster ids in clusters/, for `stego name` later
    )
    timings["predict"] = time.perf_counter() - start - sum(timings.values())
    classes = model.classes if by_classifier else None
    entries = None
    if classes is not None:
        class_counts = _id_counts(out / "labels", classes.n_classes)
        entries = [
            (n, c) for n, c, k in zip(classes.names, classes.colors, class_counts, strict=True) if k
        ]
    sheet = _contact_sheet(out, entries)
    summary = {
        "input": str(input_dir),
        "n_images": len(images),
        "n_training_views": n_items,
        "settings": asdict(s),
        "backbone": backbone_note(s.backbone, s.weights),
        "cluster_pixel_fraction": _cluster_sizes(out, clusters),
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
