"""Speed benchmark on CamVid: feature extraction, training from the cache vs the live backbone.

Each case runs in a fresh subprocess so its peak resident memory (``VmHWM``) is its own:

* ``extract``: backbone forward of CamVid train images at 224 (batch 16, already decoded),
  images/s, for block 8 and the last block (``imgfocus-saliency-vits14``);
* ``train-cached`` / ``train-live``: training steps/s of the camvid preset (batch 16, linear
  probe on, data loading in the main process) from the feature cache vs the live backbone. The
  steps are the ones ``stego train`` runs (``StegoModule.training_step`` + Adam on batches of
  ``StegoDataModule``'s sampler), timed without Lightning's start-up; the first step is a
  warm-up and not timed. Peak memory is the process's VmHWM (backbone weights included).

Then, with ``--others``, the neighbour-search and prediction benchmarks written by others
(``benchmarks/neighbors.py``, ``benchmarks/predict.py``) run with small sizes and their JSON
is merged in.

    python benchmarks/speed.py --cache-dir /tmp/stego-camvid --out speed.json [--others]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared_data import CAMVID

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = str(CAMVID)  # --data-root overrides it


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def case_extract(args: argparse.Namespace) -> dict:
    import torch

    from stego.features.split import SplitSpec, open_split
    from stego.models.backbone import build_backbone

    layer = None if args.layer == "last" else int(args.layer)
    backbone = build_backbone("imgfocus-saliency-vits14", layer=layer)
    ds = open_split(SplitSpec("camvid", args.data_root, "train", resolution=224,
                              interpolation="bilinear", crop_type="none"))
    images = torch.stack([ds[i]["image"] for i in range(args.n)])  # (n, 3, 224, 224)
    with torch.no_grad():
        backbone(images[:2])  # warm-up
        start = time.perf_counter()
        for i in range(0, args.n, 16):
            backbone(images[i:i + 16])
        seconds = time.perf_counter() - start
    return {"images": args.n, "seconds": seconds, "images_per_s": args.n / seconds}


def case_train(args: argparse.Namespace, cached: bool) -> dict:
    from torch.utils.data import DataLoader

    from stego.config import load_config
    from stego.models.backbone import build_backbone
    from stego.train.datamodule import build_datamodule
    from stego.train.pairs import StepSampler
    from stego.train.trainer import build_module

    config = load_config("camvid", overrides=[
        f"data.data_root={args.data_root}", f"data.cache_dir={args.cache_dir}",
        f"train.use_feature_cache={'true' if cached else 'false'}", "data.num_workers=0",
        "train.accelerator=cpu", "data.val_images=0"])
    m = config.model
    backbone = build_backbone(m.backbone, weights=m.weights, layer=m.layer)
    data, info = build_datamodule(config, backbone, False)
    module = build_module(config, backbone, info.n_classes)
    optimizer = module.configure_optimizers()
    sampler = StepSampler(data.train_indices, config.data.batch_size, config.train.seed)
    loader = iter(DataLoader(data.train_pairs, batch_size=config.data.batch_size,
                             sampler=sampler, num_workers=0))
    module.train()
    # Warm-up: one step live; one epoch from the cache, since the cached dataset decodes each
    # label once (for the linear probe) and keeps it, as in any run longer than an epoch.
    warmup = math.ceil(len(data.train_indices) / config.data.batch_size) if cached else 1
    times = []
    for step in range(args.steps + warmup):
        start = time.perf_counter()
        batch = next(loader)
        optimizer.zero_grad()
        module.training_step(batch, step).backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    seconds = sum(times)
    return {"steps": len(times), "seconds": seconds, "steps_per_s": len(times) / seconds,
            "warmup_steps": warmup}


def run_case(name: str, extra: list[str], timeout: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", name, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=DATA_ROOT)
    parser.add_argument("--cache-dir", default="/tmp/stego-camvid",
                        help="feature caches (built by `stego calibrate` / training if missing)")
    parser.add_argument("--n", type=int, default=48, help="images for the extraction case")
    parser.add_argument("--cached-steps", type=int, default=20)
    parser.add_argument("--live-steps", type=int, default=3)
    parser.add_argument("--others", action="store_true",
                        help="also run benchmarks/neighbors.py and benchmarks/predict.py (small)")
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--layer", default="8", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        import torch

        torch.set_num_threads(2)
        if args.case == "extract":
            out = case_extract(args)
        else:
            out = case_train(args, cached=args.case == "train-cached")
        print(json.dumps({**out, "peak_rss_mb": peak_rss() / 2**20}))
        return 0

    common = ["--data-root", args.data_root, "--cache-dir", args.cache_dir]
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    results: dict = {"machine": {"cpus": __import__("os").cpu_count(), "loadavg_start": load}}
    for layer in ("8", "last"):
        results[f"extract_b{layer}"] = run_case(
            "extract", [*common, "--layer", layer, "--n", str(args.n)], 1800)
    results["train_cached"] = run_case("train-cached", [*common, "--steps",
                                                        str(args.cached_steps)], 1800)
    results["train_live"] = run_case("train-live", [*common, "--steps", str(args.live_steps)],
                                     1800)
    cached, live = results["train_cached"], results["train_live"]
    if "steps_per_s" in cached and "steps_per_s" in live:
        results["cache_speedup"] = cached["steps_per_s"] / live["steps_per_s"]
    if args.others:
        with tempfile.TemporaryDirectory() as tmp:
            for name, extra in (("neighbors", ["--sizes", "10000", "--methods", "torch", "faiss"]),
                                ("predict", ["-n", "8", "--crf-n", "4"])):
                script = REPO / "benchmarks" / f"{name}.py"
                if not script.is_file():
                    results[name] = {"note": f"{script} not present"}
                    continue
                out = Path(tmp) / f"{name}.json"
                proc = subprocess.run([sys.executable, str(script), *extra, "--out", str(out)],
                                      capture_output=True, text=True, timeout=1800, cwd=REPO)
                results[name] = (json.loads(out.read_text()) if out.is_file()
                                 else {"error": proc.stderr.strip().splitlines()[-1:]})
    with open("/proc/loadavg") as f:
        results["machine"]["loadavg_end"] = f.read().split()[:3]
    print(f"{'case':<16}{'rate':>14}{'peak RSS MB':>13}")
    for layer in ("8", "last"):
        r = results[f"extract_b{layer}"]
        print(f"{'extract b' + layer:<16}{r.get('images_per_s', float('nan')):>10.2f} im/s"
              f"{r.get('peak_rss_mb', float('nan')):>13.0f}")
    for name in ("train_cached", "train_live"):
        r = results[name]
        print(f"{name:<16}{r.get('steps_per_s', float('nan')):>8.3f} steps/s"
              f"{r.get('peak_rss_mb', float('nan')):>13.0f}")
    if "cache_speedup" in results:
        print(f"cache / live training speed: {results['cache_speedup']:.1f}x")
    if args.out:
        from stego.atomic import atomic_write

        with atomic_write(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
