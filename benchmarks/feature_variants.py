"""Raw-feature variants of the backbone, clustered label-free on every development domain.

Screens what could lift label-free clustering before any head is trained (issue #23): which
block, attention keys instead of tokens, several blocks together, and transforms of the feature
space (folder-mean removal, principal components removed, per-image mean removed, position-cell
mean removed). For each domain of ``benchmarks/domains.py`` the images are resized to a short
side of ``--size`` (sides rounded to the patch size), every block's patch tokens are kept once
(``--work``), then per variant one cosine k-means (K = the domain's classes, 5 restarts, seed 0)
over all the folder's patches labels every patch; the patch maps are scored against the labels
at a quarter of their resolution (one confusion matrix over the folder, Hungarian matching).
A screen, not the pipeline: no head, no CRF, no 2x prediction scale.

    python benchmarks/feature_variants.py --domains coco camvid-0006R0 figground \
        --variants tok8 tok10 key12 cat8,10,12 tok8+pos8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from domains import Domain, all_domains, shared_root  # noqa: E402

BLOCKS = (4, 6, 8, 10, 12)
KEY_BLOCKS = (10, 12)
Record = dict[str, Any]


def extract(domain: Domain, size: int, backbone_name: str) -> list[Record]:
    """Per image: tokens of every block in BLOCKS (C, h, w), keys of KEY_BLOCKS, the truth."""
    from stego.models.backbone import _attention_keys, build_backbone

    bb = build_backbone(backbone_name)
    vit, p = bb.model, bb.patch_size
    records = []
    for path in domain.images:
        image = Image.open(path).convert("RGB")
        scale = size / min(image.size)
        W, H = (max(p, round(side * scale / p) * p) for side in image.size)
        pixels = np.asarray(image.resize((W, H), Image.BICUBIC), np.float32) / 255
        x = (torch.from_numpy(pixels).permute(2, 0, 1)[None] - bb._mean) / bb._std
        normed: dict[int, torch.Tensor] = {}
        hooks = [
            vit.blocks[b - 1].norm1.register_forward_hook(
                lambda _m, _i, out, b=b, store=normed: store.__setitem__(b, out)
            )
            for b in KEY_BLOCKS
        ]
        with torch.no_grad():
            tokens = vit.forward_intermediates(
                x,
                indices=[b - 1 for b in BLOCKS],
                norm=True,
                output_fmt="NCHW",
                intermediates_only=True,
            )
            record: Record = {"truth": torch.from_numpy(domain.truth(path.stem)).to(torch.int16)}
            for b, t in zip(BLOCKS, tokens, strict=True):
                record[f"tok{b}"] = t[0].half()
            for b in KEY_BLOCKS:
                keys = _attention_keys(vit.blocks[b - 1].attn, normed[b])[0, bb.num_prefix_tokens :]
                record[f"key{b}"] = keys.T.reshape(-1, H // p, W // p).half()
        for hook in hooks:
            hook.remove()
        records.append(record)
    return records


def _cells(h: int, w: int, grid: int) -> torch.Tensor:
    """(h*w,) index of each patch's cell in a grid x grid split of the frame."""
    ys = ((torch.arange(h) + 0.5) / h * grid).long()
    xs = ((torch.arange(w) + 0.5) / w * grid).long()
    return (ys[:, None] * grid + xs[None, :]).flatten()


def rows(records: list[Record], variant: str) -> list[torch.Tensor]:
    """A variant ``base[+op...]`` -> per image (h*w, D) rows. Bases: tokB, keyB, catB,B,..;
    ops: l2gmean (normalise, remove the folder mean), pcaK (remove the top K components),
    imean (remove each image's mean), posG (remove each cell's folder mean, G x G cells)."""
    base, *ops = variant.split("+")
    if base.startswith("cat"):
        names = [f"tok{b}" for b in base[3:].split(",")]
        X = [
            torch.cat([F.normalize(r[n].float().flatten(1).T, dim=1) for n in names], 1)
            for r in records
        ]
    else:
        X = [r[base].float().flatten(1).T for r in records]
    for op in ops:
        if op == "l2gmean":
            X = [F.normalize(x, dim=1) for x in X]
            mean = torch.cat(X).mean(0)
            X = [x - mean for x in X]
        elif op.startswith("pca"):
            k, mean = int(op[3:]), torch.cat(X).mean(0)
            _, _, V = torch.pca_lowrank(torch.cat(X) - mean, q=k + 8, center=False)
            P = V[:, :k]
            X = [(x - mean) - (x - mean) @ P @ P.T for x in X]
        elif op == "imean":
            X = [x - x.mean(0) for x in X]
        elif op.startswith("pos"):
            grid = int(op[3:])
            cells = [_cells(*r["tok10"].shape[1:], grid) for r in records]
            sums = torch.zeros(grid * grid, X[0].shape[1])
            for x, c in zip(X, cells, strict=True):
                sums.index_add_(0, c, x)
            counts = torch.bincount(torch.cat(cells), minlength=grid * grid).clamp(min=1)
            X = [x - (sums / counts[:, None])[c] for x, c in zip(X, cells, strict=True)]
        else:
            raise SystemExit(f"unknown transform {op!r} in {variant!r}")
    return X


def score(records: list[Record], X: list[torch.Tensor], k: int, seed: int) -> tuple[float, float]:
    """Cosine k-means over all rows, each patch labelled, Hungarian mIoU / accuracy."""
    from stego.eval.metrics import unsupervised_scores
    from stego.models.probes import spherical_kmeans

    gen = torch.Generator().manual_seed(seed)
    centres = spherical_kmeans(torch.cat(X), k, n_restarts=5, generator=gen).centroids
    preds, targets = [], []
    for r, x in zip(records, X, strict=True):
        h, w = r["tok10"].shape[1:]
        labels = (F.normalize(x, dim=1) @ centres.T).argmax(1).reshape(1, 1, h, w).float()
        truth = r["truth"].long()[::4, ::4]
        preds.append(F.interpolate(labels, size=truth.shape, mode="nearest").long().flatten())
        targets.append(truth.flatten())
    s = unsupervised_scores(torch.cat(preds).numpy(), torch.cat(targets).numpy(), k)
    return round(float(s.miou), 2), round(float(s.accuracy), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default=None)
    parser.add_argument("--work", default="/tmp/stego-bench/feature-variants")
    parser.add_argument("--domains", nargs="+", default=["coco", "camvid-0006R0", "figground"])
    parser.add_argument("--variants", nargs="+", default=["tok8", "tok10", "cat8,10,12"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="imgfocus-saliency-vits14")
    parser.add_argument("--out", default=None, help="append one JSON line per variant here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    domains = all_domains(shared_root(args.shared))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    records = {}
    for name in args.domains:
        cached = work / f"{name}-{args.backbone}-{args.size}.pt"
        if not cached.is_file():
            torch.save(extract(domains[name], args.size, args.backbone), cached)
        records[name] = torch.load(cached, weights_only=True)
    for variant in args.variants:
        row: dict[str, Any] = {"variant": variant, "size": args.size, "seed": args.seed}
        for name in args.domains:
            row[name] = score(
                records[name], rows(records[name], variant), domains[name].clusters, args.seed
            )
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
