"""Label-free segmentation on the saliency-tuned ViT-S/14: raw cosine k-means vs a CAUSE-style head.

Answers "which label-free method should ``stego segment DIR --clusters K`` use?" with a protocol
that never chooses settings on CamVid val:

* **held-out sequences** (default): CamVid ``train`` is split by sequence (file-name prefix
  before ``_``: 0001TP 62 images, 0006R0 101, 0016E5 204). For each held-out sequence S in
  ``--folds``, fit on the other train sequences, score on S (``inductive``); with
  ``--transductive`` also fit on all of train (S included, as ``stego segment`` fits on the folder
  it segments) and score on S (rows ``A<S>``).
* ``--val``: fit on all of train, score on val once (for the finalists only).

Labels are used only to score: cluster ids are Hungarian-matched to the 11 classes over one
confusion matrix per fold (:func:`stego.eval.metrics.unsupervised_scores`, K = 11, strict rule).
Predictions follow ``benchmarks/quality.py``'s protocol: images resized to short side 224 (or
``--resolution``), full frame, padded to the patch size, code averaged with the flipped image's,
cosine scores upsampled bilinearly and compared with labels at short side 224 (298x224).

Methods (``--methods``):

* ``raw-b<N>``: spherical k-means (k-means++, 5 restarts, lowest inertia) on the plain patch
  features of block N of the fit images (``stego.models.probes.spherical_kmeans``).
* ``cause-b<N>``: CAUSE (Kim et al., arXiv 2310.07379) on cached block-N features: a clusterbook
  of 2048 concepts fitted by the modularity objective (``stego.losses.cause.modularity_loss`` on
  one patch per 4x4 cell, Adam 1e-3, ``--cb-steps``), then the MLP head
  (``stego.models.cause_heads.CauseMLPHead``, 384 -> 90) and a linear projection
  (90 -> ``--proj-dim``)
  trained by the concept-wise contrastive loss against an EMA teacher (momentum 0.99) and a
  per-concept bank (``concept_contrastive_loss``, ``ConceptBank``; Adam 1e-3, weight decay 1e-4,
  gradient clip 1, ``--head-steps`` steps of 16 images); finally spherical k-means (as raw) on
  the teacher's codes of the fit images. Deviations from the original, for the CPU: projection
  dim 256 instead of 2048, cached features (no augmentation besides flips and crops),
  k-means instead of the modularity-fitted centroids.

Label-free model-selection signals are recorded for every run on the scored images' codes:
k-means inertia (mean 1 - cos to the nearest centroid), agreement (ARI) of two k-means fits with
different seeds, and the cosine silhouette of 3,000 sampled patches.

Features are extracted once per resolution into ``--work`` (plain and flipped, float16; ~0.75 GB
for 3 blocks at 224) and reused. Run from the repository root:

    python benchmarks/labelfree.py --work /tmp/labelfree --methods raw-b8 raw-b12 cause-b8 \\
        --seeds 0 1 --transductive --out heldout.json
    python benchmarks/labelfree.py --work /tmp/labelfree --methods raw-b8 raw-b12 cause-b8 \\
        --val --seeds 0 1 2 --crf --out val.json

Results of the first session (held-out means, val, costs, what did not work):
docs/labelfree-experiments.md. CAUSE on block 12 collapses its clusterbook (7 live concepts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from shared_data import CAMVID

DATA_ROOT = str(CAMVID)  # --data-root overrides it
BACKBONE = "imgfocus-saliency-vits14"
LABEL_SIZE = (224, 298)
THIN = ("pole", "sign_symbol", "pedestrian", "bicyclist", "fence")


# --------------------------------------------------------------------------- data
def extract(work: Path, root: str, res: int, blocks: list[int]) -> dict[str, Any]:
    """Features (N, 2, C, h, w) float16 per block (plain, flipped back), train then val;
    labels (N, 224, 298) uint8 and images (N, 224, 298, 3) uint8 at short side 224."""
    from stego.data import PairTransform, build_dataset, pad_to_multiple
    from stego.models.backbone import build_backbone

    paths = {b: work / f"r{res}_b{b}.npy" for b in blocks}
    names_path = work / f"r{res}_names.json"
    if not all(p.is_file() for p in paths.values()) or not names_path.is_file():
        bb = build_backbone(BACKBONE, layer=max(blocks))
        feats: dict[int, list[np.ndarray]] = {b: [] for b in blocks}
        names, t0 = [], time.perf_counter()
        for split in ("train", "val"):
            ds = build_dataset("camvid", root, split, transform=PairTransform(res, crop="none"))
            for i in range(len(ds)):
                item = ds[i]
                image = item["image"][None]  # (1, 3, H, W)
                padded = pad_to_multiple(image, bb.patch_size, mode="replicate").tensor
                x = (torch.cat([padded, padded.flip(-1)]) - bb._mean) / bb._std
                with torch.no_grad():
                    outs = bb.model.forward_intermediates(
                        x, indices=[b - 1 for b in blocks], norm=True, stop_early=True,
                        output_fmt="NCHW", intermediates_only=True)
                for b, o in zip(blocks, outs, strict=True):
                    feats[b].append(torch.stack([o[0], o[1].flip(-1)]).half().numpy())
                names.append(f"{split}/{Path(item['path']).stem}")
        for b in blocks:
            np.save(paths[b], np.stack(feats[b]))
        names_path.write_text(json.dumps({"names": names,
                                          "seconds": time.perf_counter() - t0}))
    if not (work / "labels224.npy").is_file():
        from stego.data import PairTransform, build_dataset

        labels, images = [], []
        for split in ("train", "val"):
            ds = build_dataset("camvid", root, split, transform=PairTransform(224, crop="none"))
            for i in range(len(ds)):
                item = ds[i]
                labels.append(item["label"].numpy().astype(np.uint8))
                images.append((item["image"] * 255).round().byte().permute(1, 2, 0).numpy())
        np.save(work / "labels224.npy", np.stack(labels))
        np.save(work / "images224.npy", np.stack(images))
    meta = json.loads(names_path.read_text())
    return {"feats": {b: torch.from_numpy(np.load(paths[b])) for b in blocks},
            "names": meta["names"], "extract_s": meta["seconds"],
            "labels": torch.from_numpy(np.load(work / "labels224.npy").astype(np.int64)),
            "images": np.load(work / "images224.npy", mmap_mode="r")}


def splits(names: list[str], folds: list[str], transductive: bool,
           val: bool) -> dict[str, tuple[list[int], list[int]]]:
    """{name: (fit indices, scored indices)}."""
    seq = [n.split("/")[1].split("_")[0] for n in names]
    train = [i for i, n in enumerate(names) if n.startswith("train/")]
    if val:
        return {"val": (train, [i for i, n in enumerate(names) if n.startswith("val/")])}
    out = {}
    for s in folds:
        held = [i for i in train if seq[i] == s]
        out[s] = ([i for i in train if seq[i] != s], held)
        if transductive:
            out["A" + s] = (train, held)
    return out


# --------------------------------------------------------------------------- scoring
def flip_avg(f: torch.Tensor) -> torch.Tensor:
    """(B, 2, D, h, w) -> (B, D, h, w)."""
    return (f[:, 0].float() + f[:, 1].float()) / 2


def upsample(maps: torch.Tensor, res: int, patch: int = 14) -> torch.Tensor:
    """maps (B, K, h, w) of images with short side ``res`` -> (B, K, 224, 298)."""
    height, width = res, int(res * 480 / 360)
    full = F.interpolate(maps, size=(maps.shape[-2] * patch, maps.shape[-1] * patch),
                         mode="bilinear", align_corners=False)[..., :height, :width]
    if (height, width) != LABEL_SIZE:
        full = F.interpolate(full, size=LABEL_SIZE, mode="bilinear", align_corners=False)
    return full


def predict(codes: torch.Tensor, centroids: torch.Tensor, res: int, *, crf: bool = False,
            images: np.ndarray | None = None, chunk: int = 16) -> torch.Tensor:
    """Cluster ids (B, 224, 298) from flip-pair codes (B, 2, D, h, w) and centroids (K, D)."""
    cent = F.normalize(centroids.float(), dim=1)
    out = []
    for s in range(0, len(codes), chunk):
        code = flip_avg(codes[s:s + chunk])
        if not crf:
            scores = torch.einsum("bdhw,kd->bkhw", code, cent)
            out.append(upsample(scores, res).max(dim=1).indices)
            continue
        from stego.infer.crf import dense_crf_batch

        cos = torch.einsum("bdhw,kd->bkhw", F.normalize(upsample(code, res), dim=1), cent)
        probs = torch.softmax(2.0 * cos, dim=1).numpy()  # alpha 2, as Segmenter.forward
        assert images is not None
        pics = [np.ascontiguousarray(images[i]) for i in range(s, s + len(code))]
        refined = dense_crf_batch(pics, list(probs), workers=2)
        out.append(torch.from_numpy(np.stack([r.argmax(0) for r in refined]).astype(np.int64)))
    return torch.cat(out)


def score(preds: torch.Tensor, labels: torch.Tensor, data_root: str) -> dict[str, Any]:
    from stego.eval.metrics import unsupervised_scores

    names = [line.split(" ", 1)[1] for line in
             (Path(data_root) / "classes.txt").read_text().splitlines() if line.strip()]
    s = unsupervised_scores(preds, labels, 11)
    return {"miou": float(s.miou), "acc": float(s.accuracy),
            "iou": {n: float(v) for n, v in zip(names, s.iou, strict=True)}}


def ari(a: torch.Tensor, b: torch.Tensor) -> float:
    """Adjusted Rand index of two labelings (N,)."""
    kb = int(b.max()) + 1
    table = torch.bincount(a * kb + b, minlength=(int(a.max()) + 1) * kb).double()
    table = table.reshape(-1, kb)
    pairs = lambda x: (x * (x - 1) / 2).sum()  # noqa: E731
    n = table.sum()
    both, sa, sb = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = sa * sb / (n * (n - 1) / 2)
    return float((both - expected) / (0.5 * (sa + sb) - expected))


def silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cosine silhouette of unit rows x (n, D) with labels (n,)."""
    dist = 1 - x @ x.T
    onehot = F.one_hot(labels, int(labels.max()) + 1).double()
    sums, count = dist.double() @ onehot, onehot.sum(0)
    own = count[labels]
    a = sums.gather(1, labels[:, None]).squeeze(1) / (own - 1).clamp_min(1)
    other = sums / count.clamp_min(1)
    other.scatter_(1, labels[:, None], float("inf"))
    other[:, count == 0] = float("inf")
    b = other.min(1).values
    s = (b - a) / torch.maximum(a, b)
    s[own <= 1] = 0
    return float(s.mean())


def signals(codes: torch.Tensor, km1: Any, km2: Any) -> dict[str, float]:
    """Label-free clusterability of scored codes (B, 2, D, h, w) under two k-means fits."""
    code = flip_avg(codes)
    rows = F.normalize(code.permute(0, 2, 3, 1).reshape(-1, code.shape[1]), dim=1)
    sim = rows @ F.normalize(km1.centroids, dim=1).T
    a1 = sim.argmax(1)
    a2 = (rows @ F.normalize(km2.centroids, dim=1).T).argmax(1)
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:3000]
    return {"inertia": float(1 - sim.max(1).values.mean()), "ari": ari(a1, a2),
            "silhouette": silhouette(rows[pick], a1[pick])}


# --------------------------------------------------------------------------- methods
def kmeans(rows: torch.Tensor, seed: int) -> Any:
    from stego.models.probes import spherical_kmeans

    return spherical_kmeans(rows, 11, n_restarts=5,
                            generator=torch.Generator().manual_seed(seed))


def plain_rows(codes: torch.Tensor) -> torch.Tensor:
    """Plain (unflipped) codes (B, 2, D, h, w) as rows (B*h*w, D) float32."""
    x = codes[:, 0].float()
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def train_cause(feats: torch.Tensor, fit: list[int], seed: int,
                args: argparse.Namespace) -> torch.nn.Module:
    """Clusterbook + MLP head on the fit images' features (N, 2, C, h, w); returns the teacher."""
    from stego.losses.cause import (
        ConceptBank,
        concept_contrastive_loss,
        grid_subsample,
        modularity_loss,
        nearest_concept,
    )
    from stego.models.cause_heads import CauseMLPHead

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    channels, h, w = feats.shape[2:]
    hc, wc = h - h % 4, w - w % 4
    fit_t = torch.tensor(fit)

    def batch() -> tuple[torch.Tensor, tuple[int, int]]:
        """16 random fit images, random flip and crop to multiples of 4: (B, N, C)."""
        idx = fit_t[torch.randint(len(fit), (16,), generator=gen)]
        x = feats[idx, torch.randint(2, (16,), generator=gen)].float()
        oy = int(torch.randint(h - hc + 1, (1,), generator=gen))
        ox = int(torch.randint(w - wc + 1, (1,), generator=gen))
        return x[:, :, oy:oy + hc, ox:ox + wc].flatten(2).transpose(1, 2), (hc, wc)

    n_concepts = 2048
    concepts = torch.nn.Parameter(
        torch.empty(n_concepts, channels).uniform_(-1 / n_concepts, 1 / n_concepts, generator=gen))
    opt = torch.optim.Adam([concepts], lr=1e-3)
    for _ in range(args.cb_steps):
        x, grid = batch()
        loss = modularity_loss(concepts, grid_subsample(x, generator=gen, grid=grid))
        opt.zero_grad()
        loss.backward()
        opt.step()
    concepts = concepts.detach()

    head, head_t = CauseMLPHead(channels, 90), CauseMLPHead(channels, 90)
    proj, proj_t = torch.nn.Linear(90, args.proj_dim), torch.nn.Linear(90, args.proj_dim)
    head_t.load_state_dict(head.state_dict())
    proj_t.load_state_dict(proj.state_dict())
    teacher = [*head_t.parameters(), *proj_t.parameters()]
    student = [*head.parameters(), *proj.parameters()]
    for p in teacher:
        p.requires_grad_(False)
    opt = torch.optim.Adam(student, lr=1e-3, weight_decay=1e-4)
    bank = ConceptBank(n_concepts, 100)
    head.train()
    head_t.train()  # the teacher sees dropout too, as in the original
    for _ in range(args.head_steps):
        x, grid = batch()
        xg = grid_subsample(x, generator=gen, grid=grid)  # (B, n, C)
        with torch.no_grad():
            pt = proj_t(head_t(xg))
        ps = proj(head(xg))
        if len(bank):
            ids, bank_proj = bank.as_tensors()
            loss = concept_contrastive_loss(xg, ps, pt, concepts, concepts[ids], bank_proj)
        else:
            loss = concept_contrastive_loss(xg, ps, pt, concepts)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student, 1.0)
        opt.step()
        with torch.no_grad():
            for s, t in zip(student, teacher, strict=True):
                t.mul_(0.99).add_(s, alpha=0.01)
        bank.update(nearest_concept(xg, concepts).indices, pt, generator=gen)
    return head_t.eval()


def head_codes(head: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """(B, 2, C, h, w) -> (B, 2, D, h, w) through a row-wise head, in chunks."""
    out = []
    with torch.no_grad():
        for s in range(0, len(feats), 32):
            x = feats[s:s + 32].float()
            b, t, c, h, w = x.shape
            y = head(x.permute(0, 1, 3, 4, 2).reshape(-1, c))
            out.append(y.reshape(b, t, h, w, -1).permute(0, 1, 4, 2, 3))
    return torch.cat(out)


def run(method: str, data: dict[str, Any], fit: list[int], scored: list[int], seed: int,
        args: argparse.Namespace) -> dict[str, Any]:
    kind, block = method.split("-b")
    feats = data["feats"][int(block)]
    t0 = time.perf_counter()
    if kind == "raw":
        fit_codes, scored_codes = feats[fit], feats[scored]
    elif kind == "cause":
        head = train_cause(feats, fit, seed, args)
        fit_codes, scored_codes = head_codes(head, feats[fit]), head_codes(head, feats[scored])
    else:
        raise SystemExit(f"unknown method {method!r}; use raw-b<N> or cause-b<N>")
    train_s = time.perf_counter() - t0
    km = kmeans(plain_rows(fit_codes), seed)
    fit_s = time.perf_counter() - t0
    out = {"train_s": train_s, "fit_s": fit_s,
           **score(predict(scored_codes, km.centroids, args.resolution), data["labels"][scored],
                    args.data_root)}
    out.update(signals(scored_codes, km, kmeans(plain_rows(fit_codes), seed + 1000)))
    if args.crf:
        t1 = time.perf_counter()
        pics = data["images"][scored]
        crf = score(predict(scored_codes, km.centroids, args.resolution, crf=True, images=pics),
                    data["labels"][scored], args.data_root)
        out.update({f"crf_{k}": v for k, v in crf.items()}, crf_s=time.perf_counter() - t1)
    return out


# --------------------------------------------------------------------------- main
def table(results: dict[str, Any]) -> str:
    lines = [f"{'method':<12}{'split':<9}{'mIoU':>6}{'spread':>7}{'+CRF':>6}  "
             + " ".join(f"{c[:5]:>5}" for c in THIN) + f"{'fit s':>7}"]
    for method, by_split in results["runs"].items():
        for split, by_seed in by_split.items():
            rs = list(by_seed.values())
            m = [r["miou"] for r in rs]
            crf = [r["crf_miou"] for r in rs if "crf_miou" in r]
            thin = [statistics.fmean(r["iou"][c] for r in rs) for c in THIN]
            lines.append(f"{method:<12}{split:<9}{statistics.fmean(m):6.1f}{max(m) - min(m):7.1f}"
                         f"{statistics.fmean(crf) if crf else float('nan'):6.1f}  "
                         + " ".join(f"{t:5.1f}" for t in thin)
                         + f"{statistics.fmean(r['fit_s'] for r in rs):7.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=DATA_ROOT)
    parser.add_argument("--work", default="/tmp/labelfree", help="feature arrays (reused)")
    parser.add_argument("--methods", nargs="+", default=["raw-b8", "raw-b12", "cause-b8"])
    parser.add_argument("--folds", nargs="+", default=["0016E5", "0006R0"])
    parser.add_argument("--transductive", action="store_true",
                        help="also fit on all of train and score each held-out sequence")
    parser.add_argument("--val", action="store_true", help="fit on train, score val (finalists)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--crf", action="store_true", help="also score with the dense CRF")
    parser.add_argument("--cb-steps", type=int, default=600)
    parser.add_argument("--head-steps", type=int, default=400)
    parser.add_argument("--proj-dim", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    blocks = sorted({int(m.split("-b")[1]) for m in args.methods})
    data = extract(work, args.data_root, args.resolution, blocks)
    results: dict[str, Any] = {"resolution": args.resolution, "extract_s": data["extract_s"],
                               "args": vars(args), "runs": {}}
    for name, (fit, scored) in splits(data["names"], args.folds, args.transductive,
                                      args.val).items():
        for method in args.methods:
            for seed in args.seeds:
                r = run(method, data, fit, scored, seed, args)
                results["runs"].setdefault(method, {}).setdefault(name, {})[str(seed)] = r
                print(f"{method} {name} seed {seed}: {r['miou']:.1f} mIoU "
                      f"({r['fit_s']:.0f} s)", flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
