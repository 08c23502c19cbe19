"""CAUSE (``model.method: cause``) through the training pipeline: clusterbook artefact, EMA
teacher, concept bank in checkpoints, exact resume, save/load, ONNX, ``stego segment``.

The tiny CamVid-layout data and the random ``tiny-vit`` backbone (4x4 features at resolution 32)
of ``test_training.py``; small CAUSE settings (16 concepts, one patch per 2x2 cell, projection 8,
bank 4 rows per concept) so that each run takes seconds.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_segment import _own_prediction, _write_images
from test_training import (  # noqa: F401
    assert_same_state,
    data_root,
    tiny_config,
    tiny_overrides,
    trained_state,
)

import stego
from stego.config import load_config
from stego.errors import StegoError
from stego.features.build import clusterbook
from stego.features.clusterbook import (
    CLUSTERBOOK_FILE,
    ClusterbookSettings,
    count_live,
    fit_clusterbook,
    read_clusterbook,
)
from stego.train.trainer import build_module, train

SMALL = {
    "model.method": "cause",
    "train.use_feature_cache": True,
    "loss.cause_concepts": 16,
    "loss.cause_cell": 2,
    "loss.cause_proj_dim": 8,
    "loss.cause_bank_size": 4,
    "train.cause_clusterbook_steps": 5,
}


def cause_config(root: Path, steps: int = 4, head: str = "mlp", **extra: object):
    return tiny_config(root, steps, **{**SMALL, "model.cause_head": head, **extra})


def tiny_module(root: Path, **extra: object):
    """A CauseModule on random concepts (16, C) of the tiny backbone, 3 classes."""
    from stego.models.backbone import build_backbone

    config = cause_config(root, **extra)
    backbone = build_backbone("tiny-vit")
    concepts = torch.randn(16, backbone.embed_dim, generator=torch.Generator().manual_seed(3))
    return build_module(config, backbone, 3, concepts=concepts)


_RUNS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def trained(data_root: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """Run folder of a 3-step CAUSE run with the k-means refit, per head kind (trained once)."""

    def get(kind: str) -> Path:
        if kind not in _RUNS:
            out = tmp_path_factory.mktemp(f"cause-{kind}") / "run"
            config = cause_config(data_root, 3, kind, **{"train.kmeans_probe": True})
            _RUNS[kind] = train(config, out, progress=False)
        return _RUNS[kind]

    return get


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.method=cuase", "model.method"),
        ("model.cause_head=conv", "model.cause_head"),
        ("loss.cause_concepts=0", "cause_concepts"),
        ("loss.cause_temperature=0", "cause_temperature"),
        ("loss.cause_neg_threshold=0.5", "must not exceed"),
        ("loss.cause_pos_threshold=1.5", "cosine"),
        ("loss.cause_bank_keep=0", "cause_bank_keep"),
        ("loss.cause_bank_size=-1", "cause_bank_size"),
        ("train.cause_momentum=1", "cause_momentum"),
        ("train.cause_clusterbook_steps=-1", "cause_clusterbook_steps"),
        ("train.cause_grad_clip=-1", "cause_grad_clip"),
    ],
)
def test_impossible_cause_settings_are_refused(override: str, match: str) -> None:
    with pytest.raises(StegoError, match=match):
        load_config(overrides=[override])


def test_uniform_init_needs_a_fit_and_defaults_stay_stego() -> None:
    with pytest.raises(StegoError, match="uniform concept init"):
        load_config(
            overrides=["loss.cause_concept_init=uniform", "train.cause_clusterbook_steps=0"]
        )
    config = load_config()
    assert config.model.method == "stego" and config.loss.cause_concept_init == "data"


# --------------------------------------------------------------------------- clusterbook
def _features(n: int = 10, channels: int = 8, side: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(channels, side, side, generator=g) for _ in range(n)]


FP = {"backbone": "tiny", "weights_digest": "abc", "layer": 2, "num_items": 10}
SETTINGS = ClusterbookSettings(n_concepts=6, steps=4, batch_size=3, cell=2, seed=0)


def test_data_init_picks_patches_of_the_training_items() -> None:
    feats, indices = _features(), [0, 2, 3, 5, 7]
    concepts = fit_clusterbook(feats, indices, replace(SETTINGS, steps=0))
    patches = torch.cat([feats[i].flatten(1).T for i in indices])  # (5*16, 8)
    others = torch.cat([feats[i].flatten(1).T for i in range(10) if i not in indices])
    for row in concepts:
        assert (patches == row).all(dim=1).any() and not (others == row).all(dim=1).any()
    assert len({tuple(r.tolist()) for r in concepts}) == 6  # distinct picks


def test_live_count_matches_a_brute_force_count() -> None:
    feats = _features()
    concepts = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    rows = torch.cat([f.flatten(1).T for f in feats])  # (160, 8)
    cos = torch.nn.functional.cosine_similarity(rows[:, None], concepts[None], dim=2)
    want = len(set(cos.argmax(1).tolist()))
    assert 1 < want < 200
    assert count_live(concepts, feats, list(range(10)), batch=3) == want


def test_clusterbook_is_reused_when_fresh_and_refit_when_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stego.features.clusterbook as cb

    feats, logs = _features(), []
    first = clusterbook(
        feats, list(range(8)), FP, tmp_path, SETTINGS, progress=False, log=logs.append
    )
    path = tmp_path / CLUSTERBOOK_FILE
    saved = path.read_bytes()
    assert torch.equal(read_clusterbook(path).concepts, first.concepts)
    assert first.live == count_live(first.concepts, feats, list(range(8)))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a fresh clusterbook was fitted again")

    monkeypatch.setattr(cb, "fit_clusterbook", refuse)
    again = clusterbook(
        feats, list(range(8)), FP, tmp_path, SETTINGS, progress=False, log=logs.append
    )
    assert torch.equal(again.concepts, first.concepts) and path.read_bytes() == saved
    assert logs == []
    monkeypatch.undo()

    more = clusterbook(
        feats,
        list(range(8)),
        FP,
        tmp_path,
        replace(SETTINGS, steps=5),
        progress=False,
        log=logs.append,
    )
    assert len(logs) == 1 and "stale (steps: 4 -> 5)" in logs[0]
    assert not torch.equal(more.concepts, first.concepts)
    assert read_clusterbook(path).fingerprint["settings"]["steps"] == 5
    other_items = clusterbook(
        feats,
        list(range(9)),
        FP,
        tmp_path,
        replace(SETTINGS, steps=5),
        progress=False,
        log=logs.append,
    )
    assert "training items: 8 -> 9" in logs[-1] and other_items.fingerprint["num_indices"] == 9
    clusterbook(
        feats,
        list(range(9)),
        {**FP, "weights_digest": "new"},
        tmp_path,
        replace(SETTINGS, steps=5),
        progress=False,
        log=logs.append,
    )
    assert "weights_digest: 'abc' -> 'new'" in logs[-1]
    assert not list(tmp_path.glob("*partial*")) and not list(tmp_path.glob(".*tmp*"))


def test_interrupted_fit_resumes_to_the_same_concepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stego.features.clusterbook as cb

    feats, settings = _features(), replace(SETTINGS, steps=7)
    monkeypatch.setattr(cb, "PARTIAL_EVERY", 2)
    full = fit_clusterbook(feats, list(range(8)), settings)
    partial = tmp_path / "partial.safetensors"
    calls, real = [], cb.modularity_loss

    def dies_at_step_5(*args: object, **kwargs: object):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cb, "modularity_loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        fit_clusterbook(feats, list(range(8)), settings, partial=partial)
    monkeypatch.setattr(cb, "modularity_loss", real)
    assert partial.is_file()  # saved after step 4
    resumed = fit_clusterbook(feats, list(range(8)), settings, partial=partial)
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)


def test_too_small_grid_is_refused() -> None:
    with pytest.raises(StegoError, match="cause_cell"):
        fit_clusterbook(_features(side=4), [0, 1], replace(SETTINGS, cell=4))


# --------------------------------------------------------------------------- module
def test_ema_update_is_the_formula(data_root: Path) -> None:  # noqa: F811
    module = tiny_module(data_root, **{"train.cause_momentum": 0.9})
    teacher = [*module.head.parameters(), *module.teacher_proj.parameters()]
    student = [*module.student.parameters(), *module.student_proj.parameters()]
    assert all(torch.equal(s, t) for s, t in zip(student, teacher, strict=True))  # a copy at first
    assert not any(t.requires_grad for t in teacher)
    optimised = {
        id(p) for group in module.configure_optimizers().param_groups for p in group["params"]
    }
    assert not optimised & {id(t) for t in teacher} and {id(s) for s in student} <= optimised
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in student:
            s.add_(torch.randn(s.shape, generator=g))
    before_t, before_s = [t.clone() for t in teacher], [s.clone() for s in student]
    module.ema_update()
    for t, t0, s0 in zip(teacher, before_t, before_s, strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s0, rtol=0, atol=1e-6)
    assert all(torch.equal(s, s0) for s, s0 in zip(student, before_s, strict=True))


def test_bank_survives_a_checkpoint_round_trip(data_root: Path) -> None:  # noqa: F811
    module, other = tiny_module(data_root), tiny_module(data_root)
    empty: dict = {}
    module.on_save_checkpoint(empty)
    other.on_load_checkpoint(empty)
    assert len(other.bank) == 0
    g = torch.Generator().manual_seed(0)
    for step in range(6):  # wraps the 4-row ring of several concepts
        ids, proj = torch.randint(5, (24,), generator=g), torch.randn(24, 8, generator=g)
        module.bank.update(ids, proj, generator=torch.Generator().manual_seed(step))
    assert int(module.bank.count.max()) == 4
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    other.on_load_checkpoint(torch.load(buffer, weights_only=True))
    for a, b in zip(module.bank.as_tensors(), other.bank.as_tensors(), strict=True):
        assert torch.equal(a, b)
    ids, proj = torch.randint(5, (24,), generator=g), torch.randn(24, 8, generator=g)
    for bank in (module.bank, other.bank):  # the ring positions came back too
        bank.update(ids, proj, generator=torch.Generator().manual_seed(9))
    for a, b in zip(module.bank.as_tensors(), other.bank.as_tensors(), strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- runs
def test_resume_reaches_the_same_weights_and_bank(data_root: Path, tmp_path: Path) -> None:  # noqa: F811
    full = train(cause_config(data_root, 6), tmp_path / "full", progress=False)
    part = train(cause_config(data_root, 2), tmp_path / "part", progress=False)
    train(cause_config(data_root, 6), part, resume=True, progress=False)
    assert_same_state(trained_state(part), trained_state(full), atol=0)
    banks = [
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["cause_bank"]
        for run in (part, full)
    ]
    assert banks[0] is not None and banks[0].keys() == banks[1].keys()
    for key in banks[0]:
        assert torch.equal(banks[0][key], banks[1][key]), key


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_saved_model_is_the_teacher_and_loads_everywhere(trained, kind: str) -> None:
    from stego.eval.loading import load_for_eval
    from stego.models.cause_heads import CauseCodeHead

    run = trained(kind)
    model = stego.load(run / "model")
    assert model.meta.head_kind == f"cause-{kind}" and isinstance(model.head, CauseCodeHead)
    state = trained_state(run)
    head_state = model.head.state_dict()
    for key, value in head_state.items():  # the EMA teacher's weights, not the student's
        assert torch.equal(value, state[f"head.{key}"]), key
    assert any(not torch.equal(v, state[f"student.{k}"]) for k, v in head_state.items())
    if kind == "tr":
        assert torch.equal(head_state["concepts"], state["concepts"])
    # an independent rebuild of the teacher head gives the model's code
    fresh = CauseCodeHead(kind, 32, 8, n_concepts=16, n_positions=16).eval()
    fresh.load_state_dict(
        {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    )
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = fresh(model.backbone(images).feat).code
    torch.testing.assert_close(model(images, flip=False).code, want, rtol=0, atol=1e-6)
    # the model directory and the Lightning checkpoint rebuild the same predictor
    from_ckpt = load_for_eval(run / "checkpoints" / "last.ckpt").model
    other = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.predict(other), from_ckpt.predict(other))
    assert torch.equal(model.cluster_probe.clusters, state["cluster_probe.clusters"])


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_onnx_export_of_a_cause_model_matches_pytorch(trained, kind: str, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from stego.infer.onnx import export_onnx

    model = stego.load(trained(kind) / "model")
    export_onnx(
        model, tmp_path / "full.onnx", include_backbone=True, height=32, width=32, flip=True
    )
    session = ort.InferenceSession(str(tmp_path / "full.onnx"), providers=["CPUExecutionProvider"])
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    _, log_probs = session.run(None, {"images": images.numpy()})
    want = model(images, flip=True).cluster_log_probs.numpy()
    np.testing.assert_allclose(log_probs, want, rtol=0, atol=1e-4)
    export_onnx(model, tmp_path / "head.onnx", height=32, width=32)
    session = ort.InferenceSession(str(tmp_path / "head.onnx"), providers=["CPUExecutionProvider"])
    side = (4, 4) if kind == "tr" else (5, 7)  # TR: positions fixed at export; MLP: any size
    feat = torch.randn(2, 32, *side, generator=torch.Generator().manual_seed(3))
    code, _ = session.run(None, {"features": feat.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(code, model.head(feat).code.numpy(), rtol=0, atol=1e-4)


def test_segment_with_cause_writes_the_models_own_prediction(tmp_path: Path) -> None:
    from stego.cli import main

    images, out = tmp_path / "images", tmp_path / "out"
    _write_images(images)
    args = ["segment", str(images), "-k", "2", "--out", str(out), "--backbone", "tiny-vit"]
    assert main([*args, "--steps", "4", "--resolution", "32", "--method", "cause", "--quiet"]) == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["method"] == "cause" and summary["settings"]["shifts"] == {}
    model = stego.load(out / "model")
    assert model.meta.head_kind == "cause-mlp"
    seen = set()
    for source in sorted(p for p in images.rglob("*") if p.is_file()):
        want = _own_prediction(model, source)
        seen |= set(np.unique(want).tolist())
        got = np.asarray(
            Image.open(out / "labels" / source.relative_to(images).with_suffix(".png"))
        )
        np.testing.assert_array_equal(got, want, err_msg=str(source))
    assert seen == {0, 1}


def test_stego_eval_scores_a_cause_run_from_either_output(
    trained,
    data_root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """`stego eval` reads a CAUSE run folder (its model/) and its Lightning checkpoint alike."""
    import json

    from stego.cli import main

    run, scores = trained("mlp"), []
    for source in (run, run / "checkpoints" / "last.ckpt"):
        out = tmp_path / source.name
        argv = ["eval", "--checkpoint", str(source), "--data-root", str(data_root)]
        argv += ["--split", "val", "--out", str(out), "--resolution", "32", "--no-progress"]
        assert main(argv) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["config"]["model"]["method"] == "cause" and metrics["n_images"] == 12
        scores.append((metrics["cluster"]["miou"], metrics["linear"]["miou"]))
    assert scores[0] == scores[1]


def test_cli_method_flag_and_the_live_concept_warning(
    data_root: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`stego train --method cause` trains CAUSE; 16 concepts for 11 CamVid clusters are fewer
    than 2 x 11 live ones, which is said on one line even with --quiet."""
    from stego.cli import main

    overrides = [o for o in tiny_overrides(data_root, 2, **SMALL) if "model.method" not in o]
    args = [f"--set={o}" for o in overrides]
    assert main(["train", "--out", str(tmp_path / "r"), "--method", "cause", "--quiet", *args]) == 0
    assert load_config(file=tmp_path / "r" / "config.yaml").model.method == "cause"
    warnings = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "of 16 CAUSE concepts are live" in warnings[0]
    assert "fewer than 2 x 11 clusters" in warnings[0]


def test_kmeans_refit_clusters_the_teachers_codes(trained, data_root: Path) -> None:  # noqa: F811
    """train.kmeans_probe on a CAUSE run: the saved centroids are spherical k-means (seeded as
    the refit is) of the EMA teacher's eval-mode codes of every cached training item, computed
    here from the checkpoint's head.* weights and the feature cache."""
    from stego.features.cache import FeatureCache
    from stego.models.cause_heads import CauseCodeHead
    from stego.models.probes import spherical_kmeans

    run = trained("mlp")
    state = trained_state(run)
    (manifest,) = (data_root / "stego-cache").rglob("train_none_32/*/features/manifest.json")
    cache = FeatureCache.open(manifest.parent)
    teacher = CauseCodeHead("mlp", 32, 8).eval()
    teacher.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
    with torch.no_grad():
        codes = teacher(torch.stack([cache[i] for i in range(len(cache))])).code
    want = spherical_kmeans(codes, 11, n_restarts=10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        stego.load(run / "model").cluster_probe.clusters, want.centroids, rtol=0, atol=1e-5
    )
