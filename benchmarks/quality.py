"""Quality benchmark on CamVid: raw-feature k-means baselines vs STEGO variants, over seeds.

Train on CamVid ``train`` (labels only reach the linear probe), score on ``val`` with
:func:`stego.eval.protocol.evaluate` (flip averaging, one confusion matrix, Hungarian matching).
Evaluation protocol here: resolution 224 FULL FRAME (shorter side 224, 298x224, no centre crop),
labels at that size. Rows:

* ``raw-b8`` / ``raw-last``: cosine k-means (K = 11, k-means++ with 5 restarts, lowest inertia)
  on the cached training patch features of block 8 / the last block; a Segmenter with head kind
  ``"none"`` and a ClusterProbe holding the centroids goes through ``evaluate`` like any model
  (also with the dense CRF for the first ``--crf-seeds`` seeds).
* ``stego-*``: ``stego.train.trainer.train`` with the camvid preset and the variant's overrides
  (``--steps``; training from the feature cache, no in-training validation). Each run is scored
  with its gradient-trained cluster probe (``cluster``), with the probe replaced by spherical
  k-means on the training codes (10 restarts, lowest inertia, label-free: ``kmeans``; when the
  config already has ``train.kmeans_probe`` both are the same model), by its linear probe
  (``linear``), and for the first ``--crf-seeds`` seeds with the dense CRF.

Val backbone features are computed once per block and memoised (also on disk under ``--work``),
so every later evaluation only runs heads and probes. Wall time of every stage is recorded.

    python benchmarks/quality.py --data-root /work/shared/data/camvid \
        --cache-dir /tmp/stego-camvid --work /tmp/stego-bench/quality --seeds 0 1 2 \
        --steps 1000 --variants preset auto --crf-seeds 1 --out quality.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from shared_data import CAMVID
from torch import nn

DATA_ROOT = str(CAMVID)  # --data-root overrides it
BACKBONE = "imgfocus-saliency-vits14"
AUTO = ["loss.pos_intra_shift=auto", "loss.pos_inter_shift=auto", "loss.neg_inter_shift=auto"]
VARIANTS: dict[str, list[str]] = {
    "preset": [],  # camvid preset: block 8, label-tuned shifts
    "auto": AUTO,  # block 8, label-free calibrated shifts
    "last-auto": ["model.layer=null", *AUTO],  # last block (the preset shifts are block 8's)
}
FAST = ["train.val_every=0", "data.val_images=0", "train.checkpoint_every=0",
        "train.figure_every=0", "data.num_workers=0", "train.use_feature_cache=true",
        "train.accelerator=cpu", "train.log_every=50"]


class MemoBackbone(nn.Module):
    """A frozen backbone whose outputs are memoised by the bytes of the input batch.

    Evaluation of many heads on one split then runs the ViT once per image (and flip).
    """

    def __init__(self, backbone: nn.Module, store: Path | None = None) -> None:
        super().__init__()
        self.inner = backbone
        for name in ("name", "patch_size", "embed_dim", "num_heads", "num_blocks", "layer",
                     "weights_digest"):
            setattr(self, name, getattr(backbone, name))
        self.store = store
        self.memo: dict[str, Any] = {}
        if store is not None and store.is_file():
            self.memo = torch.load(store, weights_only=True)
        self.misses = 0

    def check_size(self, height: int, width: int) -> None:
        self.inner.check_size(height, width)

    def forward(self, images: torch.Tensor, *, with_keys: bool = False) -> Any:
        from stego.models.backbone import BackboneOutput

        key = hashlib.blake2b(images.detach().cpu().contiguous().numpy().tobytes(),
                              digest_size=16).hexdigest()
        if key not in self.memo:
            self.misses += 1
            out = self.inner(images)
            self.memo[key] = (out.feat.half(), out.global_feat)
        feat, glob = self.memo[key]
        return BackboneOutput(feat=feat.float(), keys=None, global_feat=glob)

    def save(self) -> None:
        if self.store is not None and self.misses:
            from stego.atomic import atomic_write

            with atomic_write(self.store) as handle:
                torch.save(self.memo, handle)
            self.misses = 0


def val_dataset(root: str, resolution: int) -> Any:
    from stego.data import PairTransform, build_dataset

    return build_dataset("camvid", root, "val", transform=PairTransform(resolution, crop="none"))


def train_cache(root: str, cache_dir: str, layer: int | None, resolution: int,
                crop_type: str = "none", crop_dir: str | None = None) -> Any:
    from stego.features.split import PreparedSplit, SplitSpec
    from stego.models.backbone import build_backbone

    backbone = build_backbone(BACKBONE, layer=layer)
    spec = SplitSpec("camvid", root, "train", resolution=resolution, crop_type=crop_type,
                     interpolation="bilinear", crop_dir=crop_dir, cache_dir=cache_dir)
    split = PreparedSplit(spec, backbone)
    run = dict(device="cpu", batch_size=16, num_workers=0, progress=False)
    cache = split.feature_cache(True, **run)
    split.neighbor_table(30, cache=cache, **run)
    return cache


def cache_rows(cache: Any) -> torch.Tensor:
    return torch.stack([cache[i] for i in range(len(cache))])  # (N, C, h, w)


def score(model: Any, val: Any, *, crf: bool = False) -> dict[str, Any]:
    from stego.eval.protocol import evaluate

    names = list(getattr(val, "class_names", []) or [])
    t0 = time.perf_counter()
    result = evaluate(model, val, n_classes=11, class_names=names or None, crf=crf,
                      crf_workers=2, batch_size=8, progress=False, n_figure_images=0)
    out = {"cluster_miou": result.cluster.miou, "cluster_acc": result.cluster.accuracy,
           "eval_s": time.perf_counter() - t0}
    if result.linear is not None:
        out.update(linear_miou=result.linear.miou, linear_acc=result.linear.accuracy)
    return out


def raw_baseline(layer: int | None, seed: int, cache: Any, backbone: MemoBackbone,
                 val: Any, crf: bool = False) -> dict[str, Any]:
    from stego.models.heads import SegmentationHead
    from stego.models.probes import ClusterProbe, spherical_kmeans
    from stego.models.segmenter import Segmenter, SegmenterMeta

    t0 = time.perf_counter()
    km = spherical_kmeans(cache_rows(cache), 11, n_restarts=5,
                          generator=torch.Generator().manual_seed(seed))
    kmeans_s = time.perf_counter() - t0
    dim = backbone.embed_dim
    probe = ClusterProbe(dim, 11)
    with torch.no_grad():
        probe.clusters.copy_(km.centroids)
    meta = SegmenterMeta(backbone=BACKBONE, backbone_layer=layer, head_kind="none",
                         code_dim=dim, n_clusters=11, dataset="camvid")
    model = Segmenter(backbone, SegmentationHead(dim, dim, "none"), probe, None, meta)
    out = {"kmeans_s": kmeans_s, **score(model, val)}
    if crf:
        out.update({f"crf_{k}": v for k, v in score(model, val, crf=True).items()})
    return out


def stego_run(name: str, seed: int, args: argparse.Namespace, backbones: dict, val: Any,
              crf: bool) -> dict[str, Any]:
    from stego.config import load_config
    from stego.eval.loading import load_for_eval
    from stego.train.trainer import train

    overrides = [f"data.data_root={args.data_root}", f"data.cache_dir={args.cache_dir}",
                 f"train.steps={args.steps}", f"train.seed={seed}",
                 f"data.resolution={args.resolution}", f"data.crop_type={args.crop_type}",
                 *([f"data.crop_dir={args.crop_dir}"] if args.crop_dir else []), *FAST,
                 *VARIANTS[name], *args.set]
    config = load_config("camvid", overrides=overrides)
    res = "" if args.resolution == 224 else f"-r{args.resolution}"
    run = Path(args.work) / f"{name}{args.tag}{res}-s{seed}-{args.steps}"
    timing = run / "bench_timing.json"
    if not timing.is_file():  # reuse finished runs of an interrupted benchmark
        import shutil

        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        train(config, run, progress=False)
        timing.write_text(json.dumps({"train_s": time.perf_counter() - t0}))
    out: dict[str, Any] = json.loads(timing.read_text())
    import yaml

    loss = yaml.safe_load((run / "config.yaml").read_text())["loss"]
    out["shifts"] = [loss["pos_intra_shift"], loss["pos_inter_shift"], loss["neg_inter_shift"]]
    model = load_for_eval(run).model
    layer = config.model.layer
    model.backbone = backbones[layer]
    out.update(score(model, val))
    if crf:
        out.update({f"crf_{k}": v for k, v in score(model, val, crf=True).items()})
    if config.train.kmeans_probe:  # train() already refit the probe the same way: no repeat
        out.update({f"kmeans_{k}": v for k, v in out.items() if "cluster" in k})
        return out
    # label-free probe refit: spherical k-means with restarts on the training codes
    t0 = time.perf_counter()
    feats = cache_rows(args.caches[layer])
    with torch.no_grad():
        model.head.eval()
        codes = torch.cat([model.head(feats[i:i + 64]).code for i in range(0, len(feats), 64)])
    model.cluster_probe.fit_kmeans(codes, n_restarts=10,
                                   generator=torch.Generator().manual_seed(seed))
    out["kmeans_refit_s"] = time.perf_counter() - t0
    out.update({f"kmeans_{k}": v for k, v in score(model, val).items() if "cluster" in k})
    if crf:
        out.update({f"kmeans_crf_{k}": v for k, v in score(model, val, crf=True).items()
                    if "cluster" in k})
    return out


def summarise(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "spread": max(values) - min(values),
            "std": statistics.pstdev(values), "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=DATA_ROOT)
    parser.add_argument("--cache-dir", default="/tmp/stego-camvid",
                        help="feature caches / neighbour tables (never the read-only data root)")
    parser.add_argument("--work", default="/tmp/stego-bench/quality",
                        help="run folders and the memoised val features")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--variants", nargs="*", default=["preset", "auto"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--raw-layers", nargs="*", default=["8", "last"],
                        help="blocks of the raw k-means baseline ('last' = final block)")
    parser.add_argument("--crf-seeds", type=int, default=1,
                        help="CRF evaluation (raw and STEGO rows) on the first N seeds only")
    parser.add_argument("--val-limit", type=int, default=None,
                        help="score on the first N val images only (default: all 101)")
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    parser.add_argument("--tag", default="", help="suffix of run folder names (for --set runs)")
    parser.add_argument("--crop-type", choices=("none", "five"), default="none",
                        help="training split: full frames or five-crops (val is always full)")
    parser.add_argument("--crop-dir", default=None,
                        help="where `stego crop` wrote the five-crops (with --crop-type five)")
    parser.add_argument("--resolution", type=int, default=224,
                        help="shorter side for training and val (a multiple of 14; default 224)")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    from stego.models.backbone import build_backbone

    stages: dict[str, float] = {}
    val = val_dataset(args.data_root, args.resolution)
    if args.val_limit:
        from torch.utils.data import Subset

        val = Subset(val, range(min(args.val_limit, len(val))))
    layers: set[int | None] = {None if s == "last" else int(s) for s in args.raw_layers}
    layers |= {8 if "last" not in v else None for v in args.variants}
    backbones, args.caches = {}, {}
    for layer in sorted(layers, key=lambda x: x or 99):
        tag = "last" if layer is None else str(layer)
        t0 = time.perf_counter()
        args.caches[layer] = train_cache(args.data_root, args.cache_dir, layer, args.resolution,
                                         args.crop_type, args.crop_dir)
        stages[f"train_cache_open_or_build_b{tag}_s"] = time.perf_counter() - t0
        res = "" if args.resolution == 224 else f"_r{args.resolution}"
        backbones[layer] = MemoBackbone(build_backbone(BACKBONE, layer=layer),
                                        Path(args.work) / f"val_feats_b{tag}{res}.pt")
    results: dict[str, Any] = {"protocol": f"val, resolution {args.resolution} full frame, flip",
                               "overrides": args.set,
                               "steps": args.steps, "seeds": args.seeds, "stages_s": stages,
                               "runs": {}}

    def flush() -> None:
        if args.out:
            from stego.atomic import atomic_write

            with atomic_write(args.out, "w") as handle:
                json.dump(results, handle, indent=2)

    for tag in args.raw_layers:
        layer = None if tag == "last" else int(tag)
        for i, seed in enumerate(args.seeds):
            key = f"raw-b{tag}" + ("" if args.resolution == 224 else f"-r{args.resolution}")
            r = raw_baseline(layer, seed, args.caches[layer], backbones[layer], val,
                             crf=i < args.crf_seeds)
            backbones[layer].save()
            results["runs"].setdefault(key, {})[str(seed)] = r
            print(f"{key} seed {seed}: {r['cluster_miou']:.1f} mIoU ({r['eval_s']:.0f}s eval)",
                  flush=True)
            flush()
    for i, seed in enumerate(args.seeds):  # seed-major: partial results cover every variant
        for name in args.variants:
            key = f"stego-{name}{args.tag}"
            r = stego_run(name, seed, args, backbones, val, crf=i < args.crf_seeds)
            for b in backbones.values():
                b.save()
            results["runs"].setdefault(key, {})[str(seed)] = r
            print(f"{key} seed {seed}: " + ", ".join(
                f"{k} {v:.1f}" for k, v in r.items() if "miou" in k), flush=True)
            flush()
    summarise_all(results)
    print_table(results)
    flush()
    return 0


def summarise_all(results: dict[str, Any]) -> None:
    """Mean / spread / std over seeds of every mIoU of every row (also for partial results)."""
    results["summary"] = {
        key: {metric: summarise([r[metric] for r in runs.values() if metric in r])
              for metric in sorted({m for r in runs.values() for m in r if "miou" in m})}
        for key, runs in results["runs"].items()}


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'row':<18}{'metric':<22}{'mean':>7}{'spread':>8}{'n':>3}")
    for key, metrics in results["summary"].items():
        for metric, s in metrics.items():
            print(f"{key:<18}{metric:<22}{s['mean']:>7.1f}{s['spread']:>8.1f}{s['n']:>3}")


if __name__ == "__main__":
    sys.exit(main())
