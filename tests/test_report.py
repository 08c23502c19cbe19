"""The static HTML report and `stego report` (built from a tiny in-memory evaluation)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_evaluation import NAMES, PALETTE, block_dataset, colour_model

from stego.errors import StegoError
from stego.evaluation import evaluate, write_outputs
from stego.report import find_eval_dir, write_report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


@pytest.fixture()
def eval_dir(tmp_path: Path) -> Path:
    result = evaluate(colour_model(), block_dataset(4, size=(32, 32)), n_classes=3,
                      class_names=NAMES, progress=False, n_figure_images=3)
    out = tmp_path / "run" / "eval"
    write_outputs(result, out, PALETTE, dataset="synthetic", split="val", checkpoint="mem",
                  config={"model": {"backbone": "colour"}})
    return out


def test_report_has_scores_gallery_and_assets(eval_dir: Path) -> None:
    path = write_report(eval_dir)
    assert path == eval_dir / "report.html"
    page = path.read_text()
    assert 'id="gallery"' in page and page.count('class="example"') == 3
    for name in NAMES:
        assert name in page
    assert "100.0" in page and "report_assets/confusion.png" in page
    assert "http://" not in page and "https://" not in page  # no external assets
    assets = eval_dir / "report_assets"
    for name in ("confusion.png", "iou.png", "ex000_image.png", "ex000_label.png",
                 "ex000_cluster.png", "ex000_linear.png", "ex000_overlay.png", "ex002_image.png"):
        assert (assets / name).stat().st_size > 60, name
    for src in page.split('src="')[1:]:  # every referenced image exists
        assert (eval_dir / src.split('"')[0]).is_file()


def test_report_from_run_dir_and_custom_out(eval_dir: Path, tmp_path: Path) -> None:
    assert find_eval_dir(eval_dir.parent) == eval_dir
    out = write_report(eval_dir.parent, tmp_path / "site" / "index.html")
    assert out.is_file() and (tmp_path / "site" / "index_assets" / "ex000_overlay.png").is_file()


def test_report_without_examples_or_linear(tmp_path: Path) -> None:
    result = evaluate(colour_model(linear=False), block_dataset(2), n_classes=3,
                      progress=False, n_figure_images=0)
    write_outputs(result, tmp_path, PALETTE, split="val")
    page = write_report(tmp_path).read_text()
    assert "No examples" in page and "IoU linear" not in page


def test_report_errors(tmp_path: Path) -> None:
    with pytest.raises(StegoError, match="stego eval"):
        write_report(tmp_path)
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(StegoError, match="JSON"):
        write_report(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy": 1}))
    with pytest.raises(StegoError, match="stego eval"):
        write_report(tmp_path)


def test_cli_report(eval_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stego.cli import main

    assert main(["report", str(eval_dir.parent)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert main(["report", str(eval_dir / "missing")]) == 2


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_report_screenshot_is_not_blank(eval_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    page = write_report(eval_dir)
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--screenshot={shot}", "--window-size=1200,2000", page.resolve().as_uri()]
    subprocess.run(cmd, check=False, capture_output=True, timeout=120)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 20  # text, bars, confusion colour map and the gallery images
    # the pure red / green / blue blocks of the gallery images are on the page
    for rgb in PALETTE:
        assert (np.abs(pixels.astype(int) - rgb).sum(-1) < 30).sum() > 100
