"""The static HTML report and `stego report` (built from a tiny in-memory evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_evaluation import NAMES, PALETTE, block_dataset, colour_model

from stego.errors import StegoError
from stego.eval.outputs import write_outputs
from stego.eval.protocol import evaluate
from stego.eval.report import find_eval_dir, write_report


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


# The report in a real browser: what the page shows once Chromium has laid it out and decoded its
# images, read back from the DOM (the h2 headings and table layout are those _render writes).
RENDERED = """(() => {
  const after = t => [...document.querySelectorAll('h2')].find(h => h.textContent === t)
                     .nextElementSibling;
  const cells = table => [...table.rows].map(r => [...r.cells].map(c => c.innerText.trim()));
  return {
    scores: cells(after('Scores')),
    classes: cells(after('Per-class IoU')),
    images: [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth,
                                          i.naturalHeight, i.getBoundingClientRect().width]),
  };
})()"""


def test_report_renders_in_chromium(eval_dir: Path, tmp_path: Path, chromium: str) -> None:
    from chromium_cdp import Browser
    from PIL import Image

    # distinct scores in every cell (the tiny evaluation scores 100 everywhere), so a cell shown
    # in the wrong place or left empty is caught
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    for probe, scores in (("cluster", (91.24, 64.56, 71.1, 62.2, 53.3)),
                          ("linear", (88.81, 55.62, 44.4, 35.5, 26.6))):  # fmt: skip
        metrics[probe]["accuracy"], metrics[probe]["miou"] = scores[:2]
        metrics[probe]["iou"] = dict(zip(NAMES, scores[2:], strict=True))
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(eval_dir)
    # a copy with a missing figure and a failing script: the checks below must see both
    broken = page.with_name("broken.html")
    broken.write_text(
        page.read_text()
        .replace("report_assets/iou.png", "report_assets/gone.png")
        .replace("</body>", "<script>undefinedFunction()</script></body>")
    )
    with Browser(chromium, size=(1200, 2000)) as browser:
        browser.open(page.resolve().as_uri())
        shown = browser.evaluate(RENDERED)
        shot = browser.screenshot(tmp_path / "shot.png")
        assert browser.errors == []  # no console error, exception or failed load
        browser.open(broken.resolve().as_uri())
        broken_images = browser.evaluate(RENDERED)["images"]
        broken_errors = browser.errors

    fmt = "{:.1f}".format
    assert shown["scores"] == [
        ["metric", "cluster", "linear"],
        ["accuracy (%)", fmt(metrics["cluster"]["accuracy"]), fmt(metrics["linear"]["accuracy"])],
        ["mIoU (%)", fmt(metrics["cluster"]["miou"]), fmt(metrics["linear"]["miou"])],
    ]
    assert [row[0] for row in shown["classes"][1:]] == NAMES
    for row, name in zip(shown["classes"][1:], NAMES, strict=True):
        assert row[1] == fmt(metrics["cluster"]["iou"][name])
        assert row[3] == fmt(metrics["linear"]["iou"][name])
    # every figure decoded at its file's size and laid out: 2 plots + 3 examples x 5 panels
    assert len(shown["images"]) == 2 + 3 * 5
    for src, width, height, laid_out in shown["images"]:
        assert (width, height) == Image.open(eval_dir / src).size, src
        assert laid_out > 0, src
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 20  # text, plots, gallery
    for rgb in PALETTE:  # the pure red / green / blue blocks of the gallery images
        assert (np.abs(pixels.astype(int) - rgb).sum(-1) < 30).sum() > 100

    assert [w for src, w, *_ in broken_images if src.endswith("gone.png")] == [0]
    assert any("gone.png" in e for e in broken_errors), broken_errors
    assert any("undefinedFunction" in e for e in broken_errors), broken_errors
