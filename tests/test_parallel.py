"""Several processes (``--devices 2`` on the CPU: Lightning's ddp over gloo) write what one
process writes: the same feature-cache shards, byte for byte, and resume an interrupted run;
a failure in the main process ends them all."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stego.cli import main

REPO = Path(__file__).resolve().parents[1]
# each test starts two fresh interpreters (torch, Lightning): seconds on a quiet machine
pytestmark = pytest.mark.slow


def _python(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh interpreter, in its own session, until every process holding
    its output (Lightning's second process too) has ended; all of them killed and an
    AssertionError after ``timeout`` s."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s: {out!r} {err!r}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run_two_processes(args: list[str]) -> str:
    """``stego ARGS --devices 2 --accelerator cpu`` in a fresh interpreter; its output."""
    done = _python(["-m", "stego.cli", *args, "--devices", "2", "--accelerator", "cpu"])
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# run as a script (Lightning starts the second process by rerunning it): a job that fails in
# the main process; each process writes what it raised to rank<R>.txt before raising it
_FAILING_MAIN = """
import sys
from pathlib import Path

from stego.parallel import launch

out = Path(sys.argv[1])
group = launch(devices=2, accelerator="cpu")


def job():
    (out / f"ran-{group.rank}").touch()
    raise RuntimeError("disk full while writing the model")


try:
    group.on_main(job)
except Exception as exc:
    (out / f"rank{group.rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    raise
(out / f"rank{group.rank}.txt").write_text("returned")
"""


def test_a_failure_on_the_main_process_ends_both_processes(tmp_path: Path) -> None:
    """``ProcessGroup.on_main``: the job fails in rank 0; rank 0 raises its own exception, rank
    1 (which never runs the job) a StegoError naming it, and neither waits for the other."""
    script = tmp_path / "failing_main.py"
    script.write_text(_FAILING_MAIN)

    done = _python([str(script), str(tmp_path)], timeout=120)

    assert done.returncode != 0, done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.glob("ran-*")) == ["ran-0"]  # the main one only
    said = {r: (tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert said[0] == "RuntimeError: disk full while writing the model"
    assert said[1] == (
        "StegoError: the main process (rank 0) failed: "
        "RuntimeError: disk full while writing the model"
    )


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(10):  # noise, so that every item's features differ
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            folder / f"{i:02d}.png"
        )
    return folder


def _features_args(images: Path, out: Path) -> list[str]:
    return ["features", "--dataset", "folder", "--data-root", str(images), "--split", "all",
            "--resolution", "32", "--backbone", "tiny-vit", "--out", str(out),
            "--num-workers", "0", "--batch-size", "2", "--shard-size", "3"]  # fmt: skip


def test_two_processes_resume_a_feature_cache_to_one_process_bytes(
    images: Path, tmp_path: Path
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*_features_args(images, one), "--quiet"]) == 0
    # an interrupted run: shards 1 and 3 (of 0..3) missing, a half-written temp file, the
    # manifest not complete
    shutil.copytree(one, two)
    for name in ("feats-00001.npy", "global-00001.npy", "feats-00003.npy", "global-00003.npy"):
        (two / name).unlink()
    (two / ".feats-00003.npy.tmp-1234").write_bytes(b"torn")
    manifest = json.loads((two / "manifest.json").read_text())
    (two / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    kept = (two / "feats-00000.npy").stat().st_mtime_ns

    printed = _run_two_processes(_features_args(images, two))

    assert printed.count("feature cache ready") == 1  # one summary (rank 0)
    assert "2/4 shards" in printed  # only the missing shards were computed
    assert (two / "feats-00000.npy").stat().st_mtime_ns == kept
    names = sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in two.iterdir()) == names  # the torn temp file is gone
    for name in names:
        if name != ".lock":
            assert (two / name).read_bytes() == (one / name).read_bytes(), name


def test_two_processes_score_the_confusion_matrices_of_one(tmp_path: Path) -> None:
    from test_evaluation import _camvid_like, _tiny_camvid_model

    from stego.models.pretrained import save_pretrained

    data = _camvid_like(tmp_path / "camvid", n=5)
    save_pretrained(_tiny_camvid_model(), tmp_path / "model", include_backbone=True)
    args = ["eval", "--checkpoint", str(tmp_path / "model"), "--data-root", str(data),
            "--resolution", "32", "--batch-size", "2", "--no-progress",
            "--examples", "5"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "one")]) == 0

    printed = _run_two_processes([*args, "--out", str(tmp_path / "two")])

    assert printed.count("mIoU") == 1  # one summary (rank 0)
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert two["n_images"] == one["n_images"] == 5
    for probe in ("cluster", "linear"):
        assert two[probe]["confusion"] == one[probe]["confusion"]
        assert sum(map(sum, two[probe]["confusion"])) > 0
    # the example figures show the same first images (from both processes: 4 + 1)
    examples = [np.load(tmp_path / d / "examples.npz") for d in ("one", "two")]
    for key in examples[0].files:
        assert np.array_equal(examples[0][key], examples[1][key]), key


def test_two_processes_finish_an_interrupted_prediction_with_one_process_bytes(
    tmp_path: Path,
) -> None:
    """Images of mixed sizes (three of four pad to one network size, so they share batches):
    two processes finishing an interrupted run write the one process's bytes."""
    from test_prediction import tiny_segmenter

    from stego.models.pretrained import save_pretrained

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    sizes = [(24, 40), (22, 38), (30, 20), (17, 33)]  # at patch 8: 24x40, 24x40, 32x24, 24x40
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (*sizes[i % 4], 3), dtype=np.uint8)).save(
            folder / f"{i:02d}.png"
        )
    save_pretrained(tiny_segmenter(), tmp_path / "model", include_backbone=True)
    args = ["predict", "--checkpoint", str(tmp_path / "model"), str(folder), "--workers", "0",
            "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--out", str(one), "--quiet"]) == 0
    shutil.copytree(one, two)
    for i in (1, 3, 4, 5, 6, 7, 8, 9, 11, 12, 14, 15):  # an interrupted run: these missing
        (two / "labels" / f"{i:02d}.png").unlink()
        (two / "overlays" / f"{i:02d}.png").unlink()

    printed = _run_two_processes([*args, "--out", str(two)])

    # 12 left: chunks of 4 batches of 2 give the first process 8 and the second 4
    assert printed.count("predicted 12 images") == 1 and "4 already done" in printed
    written = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file()) == written
    for rel in written:
        assert (two / rel).read_bytes() == (one / rel).read_bytes(), rel


def test_two_processes_segment_a_folder_to_one_process_bytes(tmp_path: Path) -> None:
    """`stego segment --devices 2`: both processes extract features and predict a share,
    training runs in the first; every output is the one process's, byte for byte. 66 images,
    so that the clusters are fit to 64 of them (their codes sent to the other process)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(66):
        image = np.zeros((24, 32, 3), np.uint8)
        image[:, : 8 + i % 16] = (200, 30, 30)  # two kinds of things, the border moving
        image[:, 8 + i % 16 :] = (30, 30, 200)
        noisy = np.clip(image + rng.integers(0, 40, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:02d}.png")
    args = ["segment", str(folder), "--clusters", "2", "--backbone", "tiny-vit", "--steps", "4",
            "--resolution", "32", "--five-crop", "no", "--quiet"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--out", str(one), "--device", "cpu"]) == 0

    printed = _run_two_processes([*args, "--out", str(two)])

    assert printed.count("segmented 66 images") == 1  # one summary (rank 0)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["n_images"] == 66
    for sub in ("labels", "overlays"):
        names = sorted(p.name for p in (one / sub).iterdir())
        assert len(names) == 66 and sorted(p.name for p in (two / sub).iterdir()) == names
        for name in names:
            assert (two / sub / name).read_bytes() == (one / sub / name).read_bytes(), name
    assert (two / "model" / "model.safetensors").read_bytes() == (
        one / "model" / "model.safetensors"
    ).read_bytes()


def test_thread_map_keeps_the_order_and_a_failure_stops_what_has_not_started() -> None:
    import time

    from stego.parallel import thread_map

    def slow_first(i: int) -> int:
        time.sleep(0.02 if i % 2 == 0 else 0)  # later items finish first
        return i * i

    assert list(thread_map(slow_first, range(20), workers=3)) == [i * i for i in range(20)]
    started: list[int] = []

    def failing(i: int) -> int:
        started.append(i)
        if i == 2:
            raise ValueError("image 2 is broken")
        return i

    with pytest.raises(ValueError, match="image 2"):
        list(thread_map(failing, range(1000), workers=2))
    assert len(started) < 20  # at most two items a thread ahead were submitted
