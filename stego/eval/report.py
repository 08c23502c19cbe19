"""A static HTML report of an evaluation: scores, per-class IoU, confusion matrix, gallery.

Built only from what :func:`stego.eval.outputs.write_outputs` saved (``metrics.json`` and
``examples.npz``), so ``stego report DIR`` can rebuild it at any time without the model or the
data. The page uses no network and no external asset: inline CSS, and PNGs written next to it
in ``<name>_assets/`` (``report_assets/`` for the default ``report.html``), referenced by
relative paths, so the page plus that folder can be copied or zipped anywhere.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stego.atomic import atomic_write
from stego.errors import StegoError
from stego.eval.outputs import EXAMPLES_FILE, METRICS_FILE, load_examples
from stego.viz import (
    Example,
    colorize,
    confusion_figure,
    default_palette,
    iou_bars,
    overlay,
    save_png,
)

__all__ = ["find_eval_dir", "write_report"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; font-size: 13px; }
th:first-child, td:first-child { text-align: left; }
.bar { background: #e8e8e8; width: 220px; height: 10px; display: inline-block; }
.bar > span { display: block; height: 10px; }
.cluster { background: #3b75af; } .linear { background: #ef8636; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #333;
          margin: 0 4px 0 10px; vertical-align: middle; }
.gallery { max-height: 900px; overflow: auto; border: 1px solid #ccc; background: #fff;
           padding: 8px; }
.example { display: flex; gap: 6px; margin-bottom: 10px; align-items: flex-start; }
.example figure { margin: 0; text-align: center; font-size: 12px; }
.example img { width: 200px; image-rendering: pixelated; border: 1px solid #bbb; }
.meta td { text-align: left; }
.name { font-size: 12px; color: #555; margin: 4px 0; }
"""


def find_eval_dir(path: str | Path) -> Path:
    """``path`` itself if it holds metrics.json, else its newest sub-folder that does."""
    path = Path(path)
    if (path / METRICS_FILE).is_file():
        return path
    found = sorted(path.glob(f"*/{METRICS_FILE}"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1].parent
    raise StegoError(
        f"no {METRICS_FILE} in {path} or its sub-folders; run `stego eval --checkpoint RUN "
        f"--out {path / 'eval'}` first"
    )


def _read_metrics(eval_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((eval_dir / METRICS_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise StegoError(
            f"{eval_dir / METRICS_FILE} is not valid JSON ({exc}); rerun stego eval"
        ) from exc
    if "cluster" not in data or "class_names" not in data:
        raise StegoError(f"{eval_dir / METRICS_FILE} was not written by `stego eval`")
    return data


def _palette(data: dict[str, Any]) -> np.ndarray:
    if data.get("palette"):
        return np.asarray(data["palette"], dtype=np.uint8)
    return default_palette(len(data["class_names"]))


def _write_examples(
    examples: Sequence[Example], palette: np.ndarray, assets: Path
) -> list[list[tuple[str, str]]]:
    """Per example: PNGs of image, label, cluster, linear, overlay -> [(caption, file name)]."""
    rows = []
    for i, e in enumerate(examples):
        panels = [
            ("image", e.image),
            ("label", colorize(e.label, palette)),
            ("cluster (matched)", colorize(e.cluster, palette)),
        ]
        if e.linear is not None:
            panels.append(("linear probe", colorize(e.linear, palette)))
        panels.append(("overlay (cluster)", overlay(e.image, e.cluster, palette)))
        row = []
        for caption, array in panels:
            name = f"ex{i:03d}_{caption.split()[0]}.png"
            save_png(array, assets / name)
            row.append((caption, name))
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.1f}"


def _bar(value: Any, kind: str) -> str:
    width = 0.0 if value is None else max(0.0, min(100.0, float(value)))
    return f'<span class="bar"><span class="{kind}" style="width:{width:.1f}%"></span></span>'


def _summary_table(data: dict[str, Any]) -> str:
    probes = [p for p in ("cluster", "linear") if p in data]
    head = "".join(f"<th>{p}</th>" for p in probes)
    rows = "".join(
        f"<tr><td>{label}</td>"
        + "".join(f"<td>{_fmt(data[p][key])}</td>" for p in probes)
        + "</tr>"
        for label, key in (("accuracy (%)", "accuracy"), ("mIoU (%)", "miou"))
    )
    return f"<table><tr><th>metric</th>{head}</tr>{rows}</table>"


def _class_table(data: dict[str, Any], palette: np.ndarray) -> str:
    probes = [p for p in ("cluster", "linear") if p in data]
    head = "".join(f"<th>IoU {p}</th><th></th>" for p in probes)
    rows = []
    for k, name in enumerate(data["class_names"]):
        r, g, b = (int(c) for c in palette[k]) if k < len(palette) else (0, 0, 0)
        cells = "".join(
            f"<td>{_fmt(data[p]['iou'].get(name))}</td><td>{_bar(data[p]['iou'].get(name), p)}</td>"
            for p in probes
        )
        swatch = f'<span class="swatch" style="background:rgb({r},{g},{b})"></span>'
        rows.append(f"<tr><td>{swatch}{html.escape(name)}</td>{cells}</tr>")
    return f"<table><tr><th>class</th>{head}</tr>{''.join(rows)}</table>"


def _meta_table(data: dict[str, Any]) -> str:
    keys = ("dataset", "split", "n_images", "checkpoint", "crf", "flip", "rule", "extra_clusters")
    rows = "".join(
        f"<tr><th>{k}</th><td>{html.escape(str(data.get(k)))}</td></tr>" for k in keys if k in data
    )
    settings = data.get("eval_settings") or {}
    rows += "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in settings.items()
    )
    return f'<table class="meta">{rows}</table>'


def _gallery(rows: list[list[tuple[str, str]]], assets_name: str, names: list[str]) -> str:
    if not rows:
        return "<p>No examples were saved by this evaluation.</p>"
    blocks = []
    for i, row in enumerate(rows):
        title = html.escape(names[i]) if i < len(names) and names[i] else f"example {i}"
        figures = "".join(
            f'<figure><img src="{assets_name}/{html.escape(f)}" alt="{html.escape(c)}">'
            f"<figcaption>{html.escape(c)}</figcaption></figure>"
            for c, f in row
        )
        blocks.append(f'<div class="name">{title}</div><div class="example">{figures}</div>')
    return f'<div class="gallery" id="gallery">{"".join(blocks)}</div>'


def _render(data: dict[str, Any], palette: np.ndarray, assets_name: str, gallery: str) -> str:
    config = html.escape(json.dumps(data.get("config"), indent=2, default=str))
    title = html.escape(f"STEGO evaluation: {data.get('dataset', '')} / {data.get('split', '')}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{_CSS}</style></head><body>
<h1>{title}</h1>
{_meta_table(data)}
<h2>Scores</h2>
{_summary_table(data)}
<p>Cluster probe: clusters matched to classes by the Hungarian algorithm over the whole split;
linear probe: identity assignment. IoU and accuracy in percent.</p>
<h2>Per-class IoU</h2>
{_class_table(data, palette)}
<p><img src="{assets_name}/iou.png" alt="per-class IoU bars" style="max-width:700px"></p>
<h2>Confusion matrix (cluster probe)</h2>
<p><img src="{assets_name}/confusion.png" alt="confusion matrix" style="max-width:900px"></p>
<h2>Examples</h2>
{gallery}
<h2>Training configuration</h2>
<details><summary>show</summary><pre>{config}</pre></details>
</body></html>
"""


def write_report(run_or_eval_dir: str | Path, out_html: str | Path | None = None) -> Path:
    """Write the HTML report of an evaluation (or of a run's newest evaluation); returns its path.

    Args:
        run_or_eval_dir: a folder with ``metrics.json`` (``stego eval --out``), or a run folder
            holding such an evaluation folder.
        out_html: the page to write; default ``<eval dir>/report.html``. Its PNGs go to the
            sibling folder ``<stem>_assets/``.
    """
    eval_dir = find_eval_dir(run_or_eval_dir)
    data = _read_metrics(eval_dir)
    out = Path(out_html) if out_html is not None else eval_dir / "report.html"
    assets = out.parent / f"{out.stem}_assets"
    assets.mkdir(parents=True, exist_ok=True)
    palette = _palette(data)
    names = data["class_names"]
    cluster = data["cluster"]
    confusion = np.asarray(cluster["confusion"], dtype=np.int64)
    confusion_figure(
        confusion,
        names,
        assets / "confusion.png",
        assignment=np.asarray(cluster["assignment"], dtype=np.int64),
    )
    iou_bars({p: data[p]["iou"] for p in ("cluster", "linear") if p in data}, assets / "iou.png")
    stored = eval_dir / EXAMPLES_FILE
    examples = load_examples(stored) if stored.is_file() else []
    rows = _write_examples(examples, palette, assets)
    gallery = _gallery(rows, assets.name, [e.name for e in examples])
    page = _render(data, palette, assets.name, gallery)
    with atomic_write(out, "w") as handle:
        handle.write(page)
    return out
