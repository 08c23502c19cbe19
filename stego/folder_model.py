"""The model of ``stego segment``: trained on the folder, its clusters fit to the folder's
whole images, and the label-free position check (stage 2 of :mod:`stego.segment`).

Runs in one process; with several (``--devices``), the others share only the feature extraction
before it (:func:`share_features`) and the prediction after it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from stego.errors import StegoError
from stego.parallel import ProcessGroup

__all__ = ["SegmentSettings", "on_cpu", "share_features", "train_model"]

# The cluster probe is refit on the codes prediction computes (whole images at the prediction
# size, flip-averaged) of this many images of the folder, chosen at random (seeded): ~60k codes
# at 480 x 360, more than the 50k rows k-means samples. See _fit_clusters_to_folder.
PROBE_FIT_IMAGES = 64
# Smaller folders keep the clusters training fit on its five-cropped views: the refit was only
# measured on folders of 101-367 images (+1.4 mIoU), and on the 4 photos of `stego demo` it
# merged the cat, the cup and the backgrounds into one cluster that training's fit kept apart.
FOLDER_FIT_MIN_IMAGES = 64
# Images of the folder the label-free position check reads (stego.eval.labelfree): a few seconds
# of backbone time at the training size.


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


def share_features(config: Any, group: ProcessGroup, progress: bool) -> None:
    """The training split's feature cache, built by every process of ``group`` (a share each,
    :meth:`stego.features.split.PreparedSplit.build_feature_cache`) where training reads it:
    the same shards as training builds alone."""
    from stego.features.split import PreparedSplit
    from stego.models.backbone import build_backbone

    m = config.model
    backbone = build_backbone(m.backbone, weights=m.weights, layer=m.layer)
    split = PreparedSplit.from_config(config, backbone)
    split.build_feature_cache(
        device=group.device,
        batch_size=config.data.batch_size,
        num_workers=0,
        progress=progress,
        group=group,
    )


def train_model(
    config: Any,
    out: Path,
    images: list[tuple[Path, Path]],
    s: SegmentSettings,
    skip_bad: bool,
    progress: bool,
    verbose: bool = False,
    classifier_labels: Path | None = None,
) -> tuple[Any, list[Any], list[str]]:
    """Train (or reuse a finished or interrupted training in ``out/work/run``), fit the clusters
    to the folder, with ``classifier_labels`` (a LABELS folder) name them by a pixel classifier
    fit on the labelled pixels (:mod:`stego.naming.classifier`), and run the position check:
    (model, codes (and features) of the cluster fit's images, warnings)."""
    from stego.losses import SHIFT_KEYS
    from stego.train.trainer import train

    run = out / "work" / "run"
    last = run / "checkpoints" / "last.ckpt"
    finished = (run / "model" / "config.json").is_file()
    if run.exists() and not finished and not last.is_file():
        shutil.rmtree(run)  # stopped before its first checkpoint: nothing worth keeping
    _refuse_other_settings(config, run, out)
    if not finished:
        log = print if progress else None
        train(config, run, resume=last.is_file(), progress=progress, verbose=verbose, log=log)
    resolved = yaml.safe_load((run / "config.yaml").read_text())["loss"]
    if s.method == "stego":
        s.shifts = {term: round(float(resolved[key]), 4) for term, key in SHIFT_KEYS.items()}
    by_classifier = classifier_labels is not None
    model, encoded = _folder_model(out, run, images, s, skip_bad, progress, by_classifier)
    if classifier_labels is not None:
        from stego.naming.classifier import name_folder_by_classifier

        if progress:
            print("fitting the pixel classifier to the labelled images", flush=True)
        name_folder_by_classifier(
            model, classifier_labels, images, out / "model", max_side=s.predict_side, seed=s.seed
        )
    return model, encoded, _position_warning(model, images, s, progress)


def on_cpu(encoded: list[Any]) -> list[Any]:
    """Codes moved to the CPU, to be sent to the other processes."""
    def cpu(found: Any) -> Any:
        feat = None if found.feat is None else found.feat.cpu()
        return found._replace(code=found.code.cpu(), feat=feat)

    return [e._replace(found=cpu(e.found)) for e in encoded]
