"""Benchmark of the neighbour search: chunked torch vs faiss, time and peak memory.

Each (N, method) case runs in a fresh subprocess so its peak resident memory
(``VmHWM``, i.e. ``ru_maxrss`` of this process alone: after exec ``ru_maxrss`` still
counts the parent's size) can be measured: the number reported is the peak during
the search minus the resident memory just before it (the random (N, 768) features already
allocated), i.e. the search's own extra memory.

``--queries Q`` searches only the first Q rows of the table, each against all N items (the
index, the normalised copy and every similarity chunk are full size, so the peak memory is
that of the full run, less the N x k result); the full-table time is then extrapolated as
seconds x N / Q (every row costs the same exact N-item search) and reported as such.

    python benchmarks/neighbors.py --sizes 10000 100000 --out bench.json
    python benchmarks/neighbors.py --sizes 250000 --queries 25000 --out bench250k.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CASE = r"""
import json, resource, sys, time
def peak_rss():  # VmHWM: ru_maxrss also counts the parent's memory before exec
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import torch
from stego.features.neighbors import topk_cosine
n, dim, k, budget, queries = (int(a) for a in sys.argv[1:4] + sys.argv[5:6] + sys.argv[7:8])
method, device = sys.argv[4], sys.argv[6]
feats = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
topk_cosine(feats[:1000], k, backend=method, max_memory_bytes=budget, device=device)  # warm up
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * resource.getpagesize()
start = time.perf_counter()
rows = (0, min(n, queries))
out = topk_cosine(feats, k, backend=method, max_memory_bytes=budget, device=device, rows=rows)
seconds = time.perf_counter() - start
peak = peak_rss()
assert out.shape == (rows[1], k)
print(json.dumps({"queries": rows[1], "seconds": seconds * n / rows[1],
                  "measured_seconds": seconds, "peak_extra_mb": max(0, peak - before) / 2**20}))
"""


def run_case(n: int, method: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        "-c",
        CASE,
        str(n),
        str(args.dim),
        str(args.k),
        method,
        str(args.max_memory_mb * 2**20),
        args.device,
        str(args.queries or n),
    ]
    row = {
        "N": n,
        "method": method,
        "dim": args.dim,
        "k": args.k,
        "budget_mb": args.max_memory_mb if method == "torch" else None,
    }
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return {
            **row,
            "seconds": None,
            "peak_extra_mb": None,
            "note": f"timeout {args.case_timeout}s",
        }
    if res.returncode != 0:
        return {**row, "seconds": None, "peak_extra_mb": None, "note": res.stderr.strip()[-300:]}
    return {**row, **json.loads(res.stdout.strip().splitlines()[-1])}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[10_000, 100_000, 250_000],
        help="numbers of items N (default: 10000 100000 250000)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["torch", "faiss"],
        choices=["torch", "faiss"],
        help="backends to compare (default: torch faiss)",
    )
    parser.add_argument(
        "--dim", type=int, default=768, help="feature dimension (default: 768, ViT-B)"
    )
    parser.add_argument("--k", type=int, default=30, help="neighbours per item (default: 30)")
    parser.add_argument(
        "--max-memory-mb",
        type=int,
        default=256,
        help="chunk budget of the torch backend (default: 256)",
    )
    parser.add_argument(
        "--device", default="cpu", help="device of the torch backend (default: cpu)"
    )
    parser.add_argument(
        "--queries",
        type=int,
        default=None,
        help="search only this many rows against all N and extrapolate the time (default: all)",
    )
    parser.add_argument(
        "--case-timeout", type=int, default=1800, help="seconds per case before giving up"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    args = parser.parse_args()

    rows = []
    print(f"{'N':>9} {'method':>7} {'seconds':>9} {'peak MB':>9}  (seconds for all N rows)")
    for n in args.sizes:
        for method in args.methods:
            row = run_case(n, method, args)
            rows.append(row)
            secs = f"{row['seconds']:.1f}" if row["seconds"] is not None else "-"
            mem = f"{row['peak_extra_mb']:.0f}" if row["peak_extra_mb"] is not None else "-"
            note = row.get("note", "")
            if row.get("queries", n) < n:
                note = f"extrapolated from {row['queries']} rows in {row['measured_seconds']:.1f} s"
            print(f"{n:>9} {method:>7} {secs:>9} {mem:>9} {note}", flush=True)
    from stego.atomic import atomic_write

    with atomic_write(args.out, "w") as handle:
        json.dump(
            {"dim": args.dim, "k": args.k, "device": args.device, "results": rows}, handle, indent=2
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
