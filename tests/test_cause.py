"""Tests of the CAUSE losses and heads against the original code (parity/cause.npz, see the
`cause.npz` section of parity/MANIFEST.md) and of their properties.

Tolerances: float32 scalars and tensors atol=1e-5 (the measured differences are below 1e-6);
indices and recorded draws are compared exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stego.errors import StegoError
from stego.losses.cause import (
    ConceptBank,
    centroid_assign,
    concept_contrastive_loss,
    grid_subsample,
    modularity_loss,
    nearest_concept,
)
from stego.models.cause_heads import (
    CauseMLPHead,
    CauseTRHead,
    load_original_state_dict,
    original_key_map,
)

ATOL = 1e-5
_HERE = Path(__file__).resolve().parent
_CANDIDATES = [_HERE / "data" / "parity" / "cause.npz", _HERE.parents[1] / "shared" / "parity" /
               "cause.npz"]


@pytest.fixture(scope="module")
def cause() -> dict[str, torch.Tensor]:
    path = next((p for p in _CANDIDATES if p.is_file()), None)
    if path is None:
        pytest.fail(f"cause.npz not found in {[str(p) for p in _CANDIDATES]}")
    with np.load(path) as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


def weights(cause: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in cause.items() if k.startswith(prefix)}


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    np.testing.assert_allclose(actual.detach().numpy(), expected.numpy(), rtol=0, atol=atol)


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize("temp", ["0.1", "0.5"])
def test_modularity_parity(cause, temp):
    close(modularity_loss(cause["concepts"], cause["feats"], float(temp)),
          cause[f"mod_t{temp}_loss"])


def test_grid_parity(cause):
    grid = grid_subsample(cause["feats"], cause["grid_order"])
    assert torch.equal(grid, cause["grid_feats"])
    close(modularity_loss(cause["concepts"], grid), cause["mod_grid_loss"])


def test_nearest_concept_parity(cause):
    vq = nearest_concept(cause["feats"], cause["concepts"])
    assert torch.equal(vq.indices, cause["vq_index"])
    assert torch.equal(vq.vectors, cause["vq_feats"])


def test_contrastive_parity(cause):
    c = cause
    args = (c["feats"], c["nce_proj"], c["nce_proj_ema"], c["concepts"])
    close(concept_contrastive_loss(*args, c["concepts"][c["nce_bank_ids"]], c["nce_bank_proj"]),
          c["nce_loss"])
    close(concept_contrastive_loss(*args, c["nce_bank_concepts_ordered"],
                                   c["nce_bank_proj_ordered"]), c["nce_loss"])
    close(concept_contrastive_loss(*args), c["nce_nobank_loss"])
    empty = torch.zeros(0, c["concepts"].shape[1]), torch.zeros(0, c["nce_proj"].shape[2])
    close(concept_contrastive_loss(*args, *empty), c["nce_nobank_loss"])


def test_mlp_head_parity(cause):
    head = CauseMLPHead(int(cause["meta_C"]), int(cause["meta_D"])).eval()
    load_original_state_dict(head, weights(cause, "head_w_"))
    close(head(cause["feats"]), cause["head_out"])


def test_tr_head_parity(cause):
    side, c_dim, d_dim = (int(cause[k]) for k in ("meta_side", "meta_C", "meta_D"))
    head = CauseTRHead(c_dim, d_dim, n_positions=side * side).eval()
    load_original_state_dict(head, weights(cause, "tr_w_"))
    with torch.no_grad():
        out = head(cause["feats"], cause["concepts"])
        close(out, cause["tr_out"])
        maps = cause["feats"].transpose(1, 2).reshape(-1, c_dim, side, side)
        close(head.forward_map(maps, cause["concepts"]).flatten(2).transpose(1, 2), out, 1e-6)


def test_centroid_parity(cause):
    out = centroid_assign(cause["cent_x"], cause["cent_centroids"])
    b, n, side = cause["cent_x"].shape[0], cause["cent_centroids"].shape[0], int(cause["meta_side"])
    close(out.loss, cause["cent_loss"])
    assert torch.equal(out.preds.reshape(b, side, side), cause["cent_preds"])
    close(out.log_probs.transpose(1, 2).reshape(b, n, side, side), cause["cent_log_probs"])


# --------------------------------------------------------------------------- modularity
def slow_modularity(concepts: torch.Tensor, feats: torch.Tensor, temp: float) -> float:
    """The MANIFEST's definition, one entry at a time in float64."""
    total = 0.0
    for x in feats.double():
        n = x.shape[0]

        def cos(a, b):
            return float(a @ b / (a.norm() * b.norm()))

        adj = [[0.0 if p == q else max(cos(x[p], x[q]), 0.0) for q in range(n)] for p in range(n)]
        deg = [sum(row) for row in adj]
        e = sum(deg)
        s = [[max(cos(x[p], k.double()), 0.0) for k in concepts] for p in range(n)]
        trace = 0.0
        for p in range(n):
            for q in range(n):
                delta = max(math.tanh(s[p][k] * s[q][k] / temp) for k in range(len(concepts)))
                trace += (adj[p][q] - deg[p] * deg[q] / e) / e * delta
        total += trace
    return -total / feats.shape[0]


def test_modularity_by_hand():
    g = torch.Generator().manual_seed(0)
    feats, concepts = torch.randn(2, 4, 3, generator=g), torch.randn(3, 3, generator=g)
    for temp in (0.1, 0.7):
        assert modularity_loss(concepts, feats, temp).item() == pytest.approx(
            slow_modularity(concepts, feats, temp), abs=1e-6)


def test_modularity_chunks_and_order_invariance(cause):
    f, c = cause["feats"], cause["concepts"]
    ref = modularity_loss(c, f)
    for chunk in (1, 5, 100):
        close(modularity_loss(c, f, chunk=chunk), ref, 1e-6)
    perm = torch.randperm(f.shape[1], generator=torch.Generator().manual_seed(1))
    close(modularity_loss(c, f[:, perm]), ref, 1e-6)
    close(modularity_loss(c, f.flip(0)), ref, 1e-6)
    close(modularity_loss(c[torch.randperm(c.shape[0])], f), ref, 1e-6)


def test_modularity_trains_concepts_only(cause):
    f, c = cause["feats"].clone().requires_grad_(), cause["concepts"].clone().requires_grad_()
    modularity_loss(c, f).backward()
    assert f.grad is None and c.grad is not None and c.grad.abs().sum() > 0


# --------------------------------------------------------------------------- contrastive
def slow_contrastive(feats, proj, teacher, concepts, bank_c, bank_p, temp=0.07, hi=0.3, lo=0.1):
    """The MANIFEST's nce_loss, patch by patch in float64 with the shift-by-row-max form."""
    unit = torch.nn.functional.normalize
    f, p, t = feats.double(), unit(proj.double(), dim=-1), unit(teacher.double(), dim=-1)
    k = concepts.double()
    idx = (unit(f, dim=-1) @ unit(k, dim=-1).T).argmax(-1)
    vq = unit(k[idx], dim=-1)  # (B, N, C)
    b, n = idx.shape
    cols = [(vq[j, q], t[j, q], (j, q)) for j in range(b) for q in range(n)]
    bank = [] if bank_c is None else [(unit(bc.double(), dim=0), unit(bp.double(), dim=0), None)
                                      for bc, bp in zip(bank_c, bank_p, strict=True)]
    terms = []
    for i in range(b):
        for columns in ([cols, bank] if bank else [cols]):
            entries = []
            for a in range(n):
                rows = [(float(p[i, a] @ tc) / temp, float(vq[i, a] @ vc), where)
                        for vc, tc, where in columns]  # (logit, concept cosine, column id)
                pos = [(s > hi and where != (i, a)) for _, s, where in rows]
                keep = [ps or s < lo for ps, (_, s, _) in zip(pos, rows, strict=True)]
                top = max(lg for lg, _, _ in rows)
                denom = math.log(sum(math.exp(lg - top)
                                     for (lg, _, _), kp in zip(rows, keep, strict=True) if kp))
                entries += [denom - (lg - top)
                            for (lg, _, _), ps in zip(rows, pos, strict=True) if ps]
            terms.append(sum(entries) / len(entries))
    return sum(terms) / len(terms)


def small_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    concepts = torch.randn(5, 6, generator=g)
    noise = 0.3 * torch.randn(3, 4, 6, generator=g)
    feats = concepts[torch.randint(5, (3, 4), generator=g)] + noise
    proj, teacher = torch.randn(3, 4, 7, generator=g), torch.randn(3, 4, 7, generator=g)
    ids = torch.randint(5, (9,), generator=g)
    return feats, proj, teacher, concepts, concepts[ids], torch.randn(9, 7, generator=g)


def test_contrastive_against_slow_loop():
    feats, proj, teacher, concepts, bank_c, bank_p = small_case()
    got = concept_contrastive_loss(feats, proj, teacher, concepts, bank_c, bank_p)
    assert got.item() == pytest.approx(
        slow_contrastive(feats, proj, teacher, concepts, bank_c, bank_p), abs=1e-5)
    got = concept_contrastive_loss(feats, proj, teacher, concepts)
    assert got.item() == pytest.approx(
        slow_contrastive(feats, proj, teacher, concepts, None, None), abs=1e-5)


def test_contrastive_invariances(cause):
    c = cause
    f, p, t, k = c["feats"], c["nce_proj"], c["nce_proj_ema"], c["concepts"]
    bank_c, bank_p = k[c["nce_bank_ids"]], c["nce_bank_proj"]
    ref = concept_contrastive_loss(f, p, t, k, bank_c, bank_p)
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(f.shape[1], generator=g)  # same patch shuffle for the three maps
    close(concept_contrastive_loss(f[:, perm], p[:, perm], t[:, perm], k, bank_c, bank_p), ref)
    close(concept_contrastive_loss(f.flip(0), p.flip(0), t.flip(0), k, bank_c, bank_p), ref)
    rows = torch.randperm(bank_c.shape[0], generator=g)
    close(concept_contrastive_loss(f, p, t, k, bank_c[rows], bank_p[rows]), ref)
    # the concepts enter only through the chosen vectors' cosines: their scale does not matter
    close(concept_contrastive_loss(f, p, t, 3.0 * k, 3.0 * bank_c, bank_p), ref)


def test_contrastive_gradients_reach_student_only(cause):
    c = cause
    proj = c["nce_proj"].clone().requires_grad_()
    teacher = c["nce_proj_ema"].clone().requires_grad_()
    bank_p = c["nce_bank_proj"].clone().requires_grad_()
    loss = concept_contrastive_loss(c["feats"], proj, teacher, c["concepts"],
                                    c["concepts"][c["nce_bank_ids"]], bank_p)
    loss.backward()
    assert proj.grad is not None and torch.isfinite(proj.grad).all() and proj.grad.abs().sum() > 0
    assert teacher.grad is None and bank_p.grad is None


def test_contrastive_rows_without_pairs_keep_gradients_finite():
    # concepts at 60 degrees: cosine 0.5 is neither positive (> 0.9) nor negative (< 0.1), so the
    # rows of patches whose concept occurs once have no pair at all
    concepts = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(0.75)]])
    feats = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [0.5, 0.87]]])
    proj = torch.randn(1, 3, 4, requires_grad=True)
    loss = concept_contrastive_loss(feats, proj, torch.randn(1, 3, 4), concepts,
                                    pos_threshold=0.9)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(proj.grad).all()
    assert proj.grad[0, 2].abs().sum() == 0  # the lone patch takes no part


def test_contrastive_bad_input():
    feats, proj, teacher, concepts, bank_c, bank_p = small_case()
    with pytest.raises(StegoError, match="both"):
        concept_contrastive_loss(feats, proj, teacher, concepts, bank_c, None)
    with pytest.raises(StegoError, match="agree"):
        concept_contrastive_loss(feats, proj, teacher[:, :2], concepts)


# --------------------------------------------------------------------------- grid, concepts
def test_grid_subsample_picks_named_cells():
    feats = torch.arange(2 * 8 * 4, dtype=torch.float32).reshape(2, 32, 1)  # 2 images, 8 x 4
    order = torch.tensor([0, 5, 15, 10])  # (image, block) = (0,0), (0,1), (1,0), (1,1)
    got = grid_subsample(feats, order, grid=(8, 4)).flatten().tolist()
    # block (r, 0) of image i starts at patch 16 r; position o is row o // 4, column o % 4
    assert got == [0.0, 16 + 4 + 1, 32 + 12 + 3, 32 + 16 + 8 + 2]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(grid_subsample(feats, generator=g1, grid=(8, 4)),
                       grid_subsample(feats, generator=g2, grid=(8, 4)))
    with pytest.raises(StegoError, match="divisible"):
        grid_subsample(feats, grid=(16, 2))
    with pytest.raises(StegoError, match="square"):
        grid_subsample(feats)


def test_nearest_concept_ties_and_scale():
    concepts = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # 0 and 1 tie on every cosine
    vq = nearest_concept(torch.tensor([[3.0, 0.1], [0.1, 5.0]]), concepts)
    assert vq.indices.tolist() == [0, 2]
    assert torch.equal(vq.vectors, concepts[[0, 2]])


# --------------------------------------------------------------------------- bank
def test_bank_fifo_and_capacity():
    bank = ConceptBank(3, capacity=3, keep_fraction=1.0)
    assert len(bank) == 0 and bank.as_tensors().ids.numel() == 0
    rows = torch.arange(8, dtype=torch.float32).unsqueeze(1)
    bank.update(torch.tensor([0, 2, 0, 0]), rows[:4])
    bank.update(torch.tensor([0, 0, 2]), rows[4:7])
    ids, proj = bank.as_tensors()
    # concept 0 received 0, 2, 3, 4, 5: the oldest two fall out; concept 2 holds 1 and 6
    assert ids.tolist() == [0, 0, 0, 2, 2]
    assert proj.flatten().tolist() == [3.0, 4.0, 5.0, 1.0, 6.0]
    bank.update(torch.tensor([1, 1, 1, 1, 1]), torch.arange(10.0, 15.0).unsqueeze(1))
    ids, proj = bank.as_tensors()
    assert len(bank) == 8 and ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert proj.flatten().tolist() == [3.0, 4.0, 5.0, 12.0, 13.0, 14.0, 1.0, 6.0]


def test_bank_keep_fraction_and_errors():
    bank = ConceptBank(4, capacity=100)  # keeps half, as the original
    ids = torch.tensor([0] * 5 + [1] * 4 + [3])
    proj = torch.arange(10.0).unsqueeze(1)
    bank.update(ids, proj, generator=torch.Generator().manual_seed(0))
    got_ids, got = bank.as_tensors()
    assert got_ids.tolist() == [0, 0, 1, 1]  # floor(5/2), floor(4/2), floor(1/2)
    assert all(ids[int(v)] == i for v, i in zip(got.flatten(), got_ids, strict=True))
    again = ConceptBank(4, capacity=100)
    again.update(ids, proj, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.as_tensors().proj, got)
    with pytest.raises(StegoError, match="concept ids"):
        bank.update(torch.tensor([4]), torch.zeros(1, 1))
    with pytest.raises(StegoError, match="channels"):
        bank.update(torch.tensor([0]), torch.zeros(1, 2))


# --------------------------------------------------------------------------- heads
def test_tr_positions_resize_and_grid_checks():
    head = CauseTRHead(8, 4, n_positions=16, hidden_dim=32).eval()
    assert torch.equal(head.positions((4, 4)), head.query_pos)
    assert head.positions((6, 2)).shape == (12, 8)
    # a constant embedding stays constant under bicubic resizing
    with torch.no_grad():
        head.query_pos.copy_(torch.ones(16, 8))
    close(head.positions((5, 7)), torch.ones(35, 8), 1e-6)
    with torch.no_grad():
        out = head(torch.randn(2, 12, 8), torch.randn(3, 8), grid=(3, 4))
    assert out.shape == (2, 12, 4)
    with pytest.raises(StegoError, match="square"):
        head(torch.randn(2, 12, 8), torch.randn(3, 8))
    with pytest.raises(StegoError, match="square number"):
        CauseTRHead(8, 4, n_positions=12)


def test_original_state_dict_errors():
    head = CauseMLPHead(4, 2)
    with pytest.raises(StegoError, match="missing"):
        load_original_state_dict(head, {"f1.weight": torch.zeros(2, 4, 1, 1)})
    with pytest.raises(StegoError, match="unknown CAUSE head kind"):
        original_key_map("cnn")
