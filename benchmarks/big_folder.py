"""Memory and time of `stego features` and `stego predict` on a folder of many small images.

Writes a synthetic folder of N noise PNGs (side x side pixels, 1000 per sub-folder; kept for
reruns), then runs, each in its own process, `stego features --dry-run`, `stego features` and
`stego predict` with the `tiny-vit` backbone, and prints one JSON line per command: wall time,
images/s and peak resident memory (RSS). Memory should not grow with N beyond the item lists.

    python benchmarks/big_folder.py --images 100000 --work /tmp/big
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# peak RSS of the command, read from its parent's children usage (Linux: KB)
MEASURE = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def write_folder(folder: Path, n: int, side: int) -> None:
    """``n`` noise PNGs in ``folder`` (skipped when they are there already)."""
    if len(list(folder.rglob("*.png"))) == n:
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        target = folder / f"{i // 1000:04d}" / f"{i:07d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(target)


def measure(argv: list[str]) -> dict:
    """Wall seconds and peak RSS (MB) of ``stego ARGV`` in a fresh interpreter."""
    start = time.perf_counter()
    command = [sys.executable, "-c", MEASURE, sys.executable, "-m", "stego.cli", *argv]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"stego {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    peak_kb = int(done.stdout.strip().splitlines()[-1])
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": peak_kb // 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--work", type=Path, default=Path("/tmp/stego-big-folder"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("dry-run", "features", "predict"),
        default=("dry-run", "features", "predict"),
        help="the commands to run (default: all three)",
    )
    args = parser.parse_args()
    folder = args.work / f"images-{args.images}-{args.side}"
    write_folder(folder, args.images, args.side)
    split = ["--dataset", "folder", "--data-root", str(folder), "--split", "all",
             "--resolution", str(args.side), "--backbone", "tiny-vit", "--quiet",
             "--cache-dir", str(args.work / f"cache-{args.images}-{args.side}"),
             "--num-workers", str(args.workers)]  # fmt: skip
    model = args.work / "model"
    if not (model / "config.json").is_file():
        sys.path.insert(0, str(REPO / "tests"))
        from test_prediction import tiny_segmenter

        from stego.models.pretrained import save_pretrained

        save_pretrained(tiny_segmenter(), model, include_backbone=True)
    runs = {
        "features --dry-run": ["features", *split, "--dry-run"],
        "features": ["features", *split],
        "predict": ["predict", "--checkpoint", str(model), str(folder), "--quiet",
                    "--out", str(args.work / f"predicted-{args.images}-{args.side}"),
                    "--workers", str(args.workers)],
    }  # fmt: skip
    chosen = {"dry-run": "features --dry-run", "features": "features", "predict": "predict"}
    for name, argv in runs.items():
        if name not in {chosen[c] for c in args.only}:
            continue
        result = measure(argv)
        if name != "features --dry-run":
            result["images_per_s"] = round(args.images / result["seconds"], 1)
        print(json.dumps({"command": name, "images": args.images, **result}), flush=True)


if __name__ == "__main__":
    main()
