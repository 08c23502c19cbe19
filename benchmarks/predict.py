"""Throughput of ``stego predict`` against the bare backbone, and of the CRF serial vs parallel.

Model: the offline saliency-tuned ViT-S/14 (``imgfocus-saliency-vits14``) with a random head
and cluster probe; images at their native size (padded to the patch size). Measures, in images/s:

1. bare backbone forward (one image at a time, already decoded);
2. :func:`stego.infer.predict.predict_paths` without CRF (reading, flip averaging, writing PNGs),
   with and without the flip;
3. the same two (no flip) on a folder of mixed sizes: the images cropped in turn to 4 sizes
   (480x360, 476x357, 470x350, 462x345: 4 padded network sizes), as photos of several cameras;
4. the dense CRF alone on the same predictions, serial vs ``--crf-workers`` processes (the
   worker pool is kept between calls, as in ``predict``; its start-up is timed separately).

Works with older versions of the package too (``PYTHONPATH=<checkout>``), to compare code before
and after a change in one sitting: options they lack are only passed when given.

Usage: python benchmarks/predict.py [--images DIR] [-n 32] [--no-crf] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from shared_data import CAMVID

DEFAULT_IMAGES = CAMVID / "images" / "val"  # --images overrides it


def build_model(name: str, n_clusters: int, code_dim: int):
    """Segmenter with a real backbone and a random (seeded) head and probe."""
    from stego.models.backbone import build_backbone
    from stego.models.heads import SegmentationHead
    from stego.models.probes import ClusterProbe
    from stego.models.segmenter import Segmenter, SegmenterMeta

    torch.manual_seed(0)
    backbone = build_backbone(name)
    head = SegmentationHead(backbone.embed_dim, code_dim)
    probe = ClusterProbe(code_dim, n_clusters)
    meta = SegmenterMeta(
        backbone=name,
        backbone_layer=None,
        head_kind="nonlinear",
        code_dim=code_dim,
        n_clusters=n_clusters,
    )
    return Segmenter(backbone, head, probe, None, meta).eval()


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def bench_backbone(model, files: list[Path]) -> float:
    """images/s of the bare backbone on decoded, padded images (decode time excluded)."""
    from stego.data.transforms import pad_to_multiple
    from stego.infer.predict import read_image_rgb

    images = [
        torch.from_numpy(read_image_rgb(f)).permute(2, 0, 1)[None].float() / 255 for f in files
    ]
    with torch.inference_mode():
        model.backbone(
            pad_to_multiple(images[0], model.patch_size, mode="replicate").tensor
        )  # warm-up
        start = time.perf_counter()
        for image in images:
            model.backbone(pad_to_multiple(image, model.patch_size, mode="replicate").tensor)
    return rate(len(images), time.perf_counter() - start)


def bench_predict(model, files: list[Path], *, flip: bool, batch_size: int, **options) -> float:
    """images/s of ``predict_paths`` on ``files`` (decoding, network, writing the PNGs)."""
    from stego.infer.predict import predict_paths

    with tempfile.TemporaryDirectory() as out:
        summary = predict_paths(
            model, files, out, flip=flip, batch_size=batch_size, progress=False, **options
        )
    return summary.images_per_second


MIXED_SIZES = ((360, 480), (357, 476), (350, 470), (345, 462))  # (H, W), cycled


def mixed_folder(files: list[Path], folder: Path) -> list[Path]:
    """``files`` cropped in turn to :data:`MIXED_SIZES` (top-left crops), saved as PNGs."""
    from PIL import Image

    out = []
    for i, source in enumerate(files):
        height, width = MIXED_SIZES[i % len(MIXED_SIZES)]
        with Image.open(source) as image:
            crop = image.convert("RGB").crop((0, 0, width, height))
        out.append(folder / f"{i:04d}.png")
        crop.save(out[-1])
    return out


def bench_crf(model, files: list[Path], workers: int) -> dict[str, float]:
    """images/s of the dense CRF alone, serial vs ``workers`` processes, same inputs."""
    from stego.infer.crf import dense_crf_batch
    from stego.infer.predict import read_image_rgb

    arrays = [read_image_rgb(f) for f in files]
    probs = []
    with torch.inference_mode():
        for array in arrays:
            image = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
            probs.append(model(image).cluster_log_probs[0].exp().numpy())
    out = {}
    start = time.perf_counter()  # first call: starts the kept worker pool (as predict does once)
    dense_crf_batch(arrays[:workers], probs[:workers], workers=workers)
    out["crf_pool_start_and_first_images_s"] = time.perf_counter() - start
    for n_workers in (1, workers):
        start = time.perf_counter()
        dense_crf_batch(arrays, probs, workers=n_workers)
        out[f"crf_{n_workers}_workers"] = rate(len(arrays), time.perf_counter() - start)
    out["crf_scaling"] = out[f"crf_{workers}_workers"] / out["crf_1_workers"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of images")
    parser.add_argument("-n", type=int, default=32, help="number of images (first n, sorted)")
    parser.add_argument("--crf-n", type=int, default=None, help="images for the CRF (default n)")
    parser.add_argument("--crf-workers", type=int, default=2, help="parallel CRF processes")
    parser.add_argument("--backbone", default="imgfocus-saliency-vits14", help="registry backbone")
    parser.add_argument("--clusters", type=int, default=11, help="clusters of the random probe")
    parser.add_argument("--batch-size", type=int, default=4, help="predict batch size")
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: the package's)"
    )
    parser.add_argument("--no-crf", action="store_true", help="skip the CRF measures")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-size folder")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from stego.infer.predict import collect_images

    files = [src for src, _ in collect_images([args.images])][: args.n]
    model = build_model(args.backbone, args.clusters, 70)
    sizes = sorted({tuple(reversed(read_size(f))) for f in files})
    results: dict[str, object] = {
        "backbone": args.backbone,
        "images": len(files),
        "sizes_hw": [list(s) for s in sizes],
        "torch_threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)),
    }
    options = {} if args.workers is None else {"num_workers": args.workers}
    results["load_average_1min"] = os.getloadavg()[0]
    bare = results["backbone_images_per_s"] = bench_backbone(model, files)
    results["predict_images_per_s"] = bench_predict(
        model, files, flip=True, batch_size=args.batch_size, **options
    )
    results["predict_noflip_images_per_s"] = bench_predict(
        model, files, flip=False, batch_size=args.batch_size, **options
    )
    # the target's ratio: one backbone pass per image on both sides
    results["predict_noflip_over_backbone"] = results["predict_noflip_images_per_s"] / bare
    # flip averaging runs the backbone twice: compare with two bare passes
    results["predict_flip_over_two_passes"] = results["predict_images_per_s"] / (bare / 2)
    if not args.no_mixed:
        with tempfile.TemporaryDirectory() as folder:
            mixed = mixed_folder(files, Path(folder))
            mixed_bare = results["mixed_backbone_images_per_s"] = bench_backbone(model, mixed)
            results["mixed_predict_noflip_images_per_s"] = bench_predict(
                model, mixed, flip=False, batch_size=args.batch_size, **options
            )
        results["mixed_predict_noflip_over_backbone"] = (
            results["mixed_predict_noflip_images_per_s"] / mixed_bare
        )
    if not args.no_crf:
        crf_files = files[: args.crf_n or args.n]
        results["crf_images"] = len(crf_files)
        results.update(bench_crf(model, crf_files, args.crf_workers))
    results["load_average_1min_after"] = os.getloadavg()[0]
    results["peak_rss_mb_main_process"] = peak_rss_mb()
    print_table(results)
    if args.out:
        from stego.atomic import atomic_write

        with atomic_write(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM), MB; CRF workers not included."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))


def read_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def print_table(results: dict[str, object]) -> None:
    print(f"{'measure':34s} value", file=sys.stdout)
    for key, value in results.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:34s} {shown}")


if __name__ == "__main__":
    sys.exit(main())
