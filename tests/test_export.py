"""`stego export`: every format read back by its own reader and compared pixel for pixel with the
class ids of a real `stego segment` output (conftest.segment_results), unnamed and named."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stego.cli import main
from stego.errors import StegoError
from stego.export import export_results
from stego.export.label_studio import brush_rle
from stego.naming import name_results
from stego.results import open_results

ODD = 'tree <b>&</b> "sky"/..'  # a name with characters that files, XML and JSON must escape


@pytest.fixture()
def named_results(copy_results: Path) -> Path:
    """The results with clusters 0 and 1 merged under an odd name."""
    name_results(copy_results, names={0: ODD, 1: ODD, 2: "road"}, progress=False)
    return copy_results


def _class_ids(results: Path) -> dict[str, np.ndarray]:
    """image name -> (H, W) class ids, computed here from the files: classes.json's mapping
    applied to the cluster id PNGs."""
    folder = results / ("clusters" if (results / "clusters").is_dir() else "labels")
    classes = results / "model" / "classes.json"
    mapping = np.array(json.loads(classes.read_text())["mapping"]) if classes.is_file() else None
    opened = open_results(results)
    out = {}
    for i, rel in enumerate(opened.rels):
        ids = np.asarray(Image.open(folder / rel)).astype(np.int64)
        out[opened.image_name(i)] = ids if mapping is None else mapping[ids]
    return out


@pytest.mark.parametrize("named", [False, True])
def test_coco_reads_back_pixel_for_pixel(copy_results: Path, tmp_path: Path, named: bool) -> None:
    from pycocotools.coco import COCO

    if named:
        name_results(copy_results, names={0: ODD, 1: ODD, 2: "road"}, progress=False)
    out = tmp_path / "coco.json"
    assert export_results(copy_results, "coco", out, progress=False) == [out]
    coco = COCO(str(out))
    names = open_results(copy_results).classes.names
    assert [coco.cats[k]["name"] for k in sorted(coco.cats)] == names
    want = _class_ids(copy_results)
    assert sorted(img["file_name"] for img in coco.imgs.values()) == sorted(want)
    for image in coco.imgs.values():
        ids = want[image["file_name"]]
        assert (image["height"], image["width"]) == ids.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert sorted(a["category_id"] - 1 for a in anns) == np.unique(ids).tolist()
        for ann in anns:  # one RLE per class, exactly that class's pixels
            np.testing.assert_array_equal(coco.annToMask(ann), ids == ann["category_id"] - 1)
            assert ann["area"] == (ids == ann["category_id"] - 1).sum()


def test_masks_partition_each_image(named_results: Path, tmp_path: Path) -> None:
    out = tmp_path / "masks"
    (out / "classes.csv").parent.mkdir()
    (out / "classes.csv").write_text("from an earlier export\n")
    (out / "stale").mkdir()  # an earlier export's leftovers are replaced, not merged
    export_results(named_results, "masks", out, progress=False)
    rows = list(csv.DictReader((out / "classes.csv").open()))
    assert [r["name"] for r in rows] == [ODD, "road"]
    assert not (out / "stale").exists()
    assert not list(tmp_path.glob(".masks.*"))  # no temporary folder left
    for image, ids in _class_ids(named_results).items():
        folder = out / Path(image).with_suffix("")
        files = {p.name: np.asarray(Image.open(p)) for p in folder.iterdir()}
        assert sorted(files) == sorted(rows[k]["file"] for k in np.unique(ids))
        for k, row in enumerate(rows):
            if row["file"] in files:
                assert set(np.unique(files[row["file"]])) <= {0, 255}
                np.testing.assert_array_equal(files[row["file"]] == 255, ids == k)
    assert "/" not in rows[0]["file"] and rows[0]["file"].endswith(".png")


def test_masks_refuse_to_replace_another_folder(segment_results: Path, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(StegoError, match="not a masks export"):
        export_results(segment_results, "masks", tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"


def test_areas_are_pixel_shares(named_results: Path, tmp_path: Path) -> None:
    out = tmp_path / "areas.csv"
    written = export_results(named_results, "areas", out, progress=False)
    assert written == [out, tmp_path / "areas-summary.csv"]
    rows = list(csv.DictReader(out.open()))
    want = _class_ids(named_results)
    assert sorted(r["image"] for r in rows) == sorted(want)
    for row in rows:
        ids = want[row["image"]]
        assert (int(row["height"]), int(row["width"])) == ids.shape
        for k, name in enumerate([ODD, "road"]):
            assert float(row[name]) == pytest.approx((ids == k).mean(), abs=1e-6)
    summary = list(csv.DictReader(written[1].open()))
    everything = np.concatenate([ids.ravel() for ids in want.values()])
    assert [s["class"] for s in summary] == [ODD, "road"]
    for k, s in enumerate(summary):
        assert float(s["pixel_share"]) == pytest.approx((everything == k).mean(), abs=1e-6)
        assert int(s["images"]) == sum(int((ids == k).any()) for ids in want.values())


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (300, 301)])
def test_brush_rle_decodes_with_label_studio(shape: tuple[int, int], ls_decode) -> None:
    decode = ls_decode
    rng = np.random.default_rng(1)
    masks = [rng.random(shape) > 0.5, np.ones(shape, bool), np.zeros(shape, bool)]
    if shape == (300, 301):  # runs longer than the widest run field (65536 values)
        masks.append(np.zeros(shape, bool))
        masks[-1][120:200, 7:] = True
    for mask in masks:
        rgba = decode(brush_rle(mask)).reshape(*shape, 4)
        np.testing.assert_array_equal(rgba, np.repeat((mask * 255)[..., None], 4, -1))


def test_label_studio_tasks_and_config(named_results: Path, tmp_path: Path, ls_decode) -> None:
    decode = ls_decode
    out = tmp_path / "tasks.json"
    written = export_results(named_results, "label-studio", out, progress=False,
                             image_url="http://files.local/photos/")  # fmt: skip
    assert written == [out, tmp_path / "tasks-config.xml"]
    config = ET.parse(written[1]).getroot()
    brush = config.find("BrushLabels")
    assert [label.get("value") for label in brush.findall("Label")] == [ODD, "road"]
    image_tag = config.find("Image")
    tasks = json.loads(out.read_text())
    want = _class_ids(named_results)
    assert len(tasks) == len(want)
    for task in tasks:
        name = task["data"]["image"].removeprefix("http://files.local/photos/")
        ids = want[name]
        result = task["predictions"][0]["result"]
        assert sorted(r["value"]["brushlabels"][0] for r in result) == sorted(
            [ODD, "road"][k] for k in np.unique(ids)
        )
        for region in result:
            assert region["from_name"] == brush.get("name")
            assert region["to_name"] == brush.get("toName") == image_tag.get("name")
            assert (region["original_height"], region["original_width"]) == ids.shape
            k = [ODD, "road"].index(region["value"]["brushlabels"][0])
            mask = decode(region["value"]["rle"]).reshape(*ids.shape, 4)[..., 3]
            np.testing.assert_array_equal(mask == 255, ids == k)


def test_cli_export_and_its_errors(segment_results: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main(["export", str(segment_results), "--format", "areas",
                 "--out", str(tmp_path / "a.csv")]) == 0  # fmt: skip
    assert f"wrote {tmp_path / 'a.csv'}" in capsys.readouterr().out
    assert (
        main(["export", str(tmp_path), "--format", "coco", "--out", str(tmp_path / "c.json")]) == 2
    )
    assert "no summary.json" in capsys.readouterr().err
    inside = segment_results / "export.json"
    assert main(["export", str(segment_results), "--format", "coco", "--out", str(inside)]) == 2
    assert "inside the results" in capsys.readouterr().err and not inside.exists()
    with pytest.raises(SystemExit):
        main(["export", str(segment_results), "--format", "yolo", "--out", "x"])
