"""`stego view`: the results reader, the server's answers, saving names, and the page in Chromium.

The RESULTS folder is a real `stego segment` output (tiny random ViT, conftest.segment_results).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stego.errors import StegoError
from stego.results import open_results
from stego.view.server import ViewServer, make_server

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running(results: Path, port: int = 0) -> Iterator[ViewServer]:
    server = make_server(results, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def request(server: ViewServer, path: str, body: object = None, *, host: str | None = None,
            kind: str = "application/json") -> tuple[int, bytes]:  # fmt: skip
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    headers = {"Host": host or f"127.0.0.1:{server.server_address[1]}"}
    if body is not None:
        headers["Content-Type"] = kind
        connection.request("POST", path, json.dumps(body), headers)
    else:
        connection.request("GET", path, headers=headers)
    answer = connection.getresponse()
    return answer.status, answer.read()


def label(results: Path, rel: Path) -> np.ndarray:
    folder = results / ("clusters" if (results / "clusters").is_dir() else "labels")
    return np.asarray(Image.open(folder / rel)).astype(np.int64)


# ----------------------------------------------------------------------------- the reader


def test_unnamed_results_read_as_one_class_per_cluster(segment_results: Path) -> None:
    results = open_results(segment_results)
    assert not results.named and results.n_clusters == 3
    assert results.classes.names == ["cluster 0", "cluster 1", "cluster 2"]
    assert len(results.rels) == 6 and all(results.source(i) for i in range(6))
    assert results.image_name(results.rels.index(Path("nested/img1.png"))) == "nested/img1.jpg"
    for i, rel in enumerate(results.rels):
        np.testing.assert_array_equal(results.class_ids(i), label(segment_results, rel))


def test_results_refuses_folders_that_are_not_segment_outputs(copy_results: Path,
                                                               tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(StegoError, match="does not exist"):
        open_results(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StegoError, match="no summary.json"):
        open_results(tmp_path / "empty")
    (tmp_path / "empty" / "summary.json").write_text("{not json")
    with pytest.raises(StegoError, match="not a `stego segment` output.*summary.json"):
        open_results(tmp_path / "empty")
    (tmp_path / "empty" / "summary.json").write_text(json.dumps({"settings": {"clusters": 3}}))
    with pytest.raises(StegoError, match="model is missing"):
        open_results(tmp_path / "empty")
    # a missing label map, then an extra one
    moved = tmp_path / "img2.png"
    shutil.move(copy_results / "labels" / "img2.png", moved)
    with pytest.raises(StegoError, match=r"holds 5 label maps but 6 images.*img2.png.*rerun"):
        open_results(copy_results)
    shutil.move(moved, copy_results / "labels" / "img2.png")
    shutil.copy(copy_results / "labels" / "img2.png", copy_results / "labels" / "stray.png")
    with pytest.raises(StegoError, match=r"holds 7 label maps but only 6.*stray.png"):
        open_results(copy_results)
    (copy_results / "labels" / "stray.png").unlink()
    # a label map with an id outside the clusters
    Image.fromarray(np.full((48, 64), 7, np.uint8)).save(copy_results / "labels" / "img0.png")
    with pytest.raises(StegoError, match="largest id 7"):
        open_results(copy_results).cluster_ids(0)


def test_pixel_counts_are_cached_and_recounted_when_a_map_changes(copy_results: Path,
                                                                  monkeypatch) -> None:  # fmt: skip
    from stego.results import Results, cluster_counts

    first = cluster_counts(open_results(copy_results))
    want = [np.bincount(label(copy_results, r).ravel(), minlength=3) for r in
            open_results(copy_results).rels]  # fmt: skip
    np.testing.assert_array_equal(first.pixels, np.stack(want))
    changed = copy_results / "labels" / open_results(copy_results).rels[2]
    Image.fromarray(np.full((48, 64), 2, np.uint8)).save(changed)
    read: list[int] = []
    real = Results.cluster_ids
    monkeypatch.setattr(Results, "cluster_ids", lambda self, i: read.append(i) or real(self, i))
    again = cluster_counts(open_results(copy_results))
    assert read == [2]  # only the changed map is read again
    assert again.pixels[2].tolist() == [0, 0, 48 * 64]
    np.testing.assert_array_equal(np.delete(again.pixels, 2, 0), np.delete(first.pixels, 2, 0))


# ----------------------------------------------------------------------------- the server


def test_server_answers_state_pages_and_pictures(segment_results: Path) -> None:
    with running(segment_results) as server:
        status, body = request(server, "/api/state")
        state = json.loads(body)
        results = server.results
        counts = np.stack([np.bincount(label(segment_results, r).ravel(), minlength=3)
                           for r in results.rels])  # fmt: skip
        shares = counts.sum(0) / counts.sum()
        assert [c["share"] for c in state["clusters"]] == pytest.approx(shares.tolist())
        assert [c["images"] for c in state["clusters"]] == (counts > 0).sum(0).tolist()
        assert state["classes"]["names"] == ["cluster 0", "cluster 1", "cluster 2"]

        page = json.loads(request(server, "/api/images?offset=4&limit=4")[1])
        assert page["total"] == 6 and [i["index"] for i in page["items"]] == [4, 5]
        # the filter keeps exactly the images that hold the cluster
        rare = int(np.argmin((counts > 0).sum(0)))
        only = json.loads(request(server, f"/api/images?cluster={rare}")[1])
        assert [i["index"] for i in only["items"]] == np.flatnonzero(counts[:, rare]).tolist()

        status, thumb = request(server, "/thumb/1.jpg")
        status_ids, ids = request(server, "/thumb-ids/1.png")
        assert status == status_ids == 200
        small = np.asarray(Image.open(io.BytesIO(ids)))
        assert Image.open(io.BytesIO(thumb)).size == small.shape[::-1]
        # nearest resampling: the thumbnail's ids are ids of the label map, all of them
        assert set(np.unique(small)) == set(np.unique(label(segment_results, results.rels[1])))
        assert request(server, "/ids/1.png")[1] == (results.cluster_path(1)).read_bytes()
        crops = state["clusters"][0]["crops"]
        assert crops and request(server, f"/crop/0/{crops[0]}.jpg")[0] == 200
        assert request(server, "/thumb/6.jpg")[0] == 404  # one past the last image
        assert request(server, "/crop/9/0.jpg")[0] == 404
        assert request(server, "/../summary.json")[0] == 404
        assert request(server, "/api/state", host="attacker.example:80")[0] == 403
        page_html = request(server, "/")[1].decode()
        assert "http://" not in page_html and "https://" not in page_html  # nothing from outside
    # the second server reuses the cached pictures
    assert (segment_results / "work" / "view" / "thumbs" / "1.jpg").is_file()


def test_port_in_use_is_a_clear_error(segment_results: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StegoError, match=f"port {port} .* in use.*--port"):
            make_server(segment_results, port)


# ----------------------------------------------------------------------------- saving names
# These go through stego.naming.name_results (issue 24), the call of `stego name --names`.


def test_save_merges_two_clusters_and_rejects_bad_names(copy_results: Path) -> None:
    with running(copy_results) as server:
        before = list((copy_results / "model").iterdir())
        for bad, message in (({"names": {"0": "a\nb"}}, "one line"),
                             ({"names": {"0": "  "}}, "not empty"),
                             ({"names": {"5": "x"}}, "does not exist"),
                             ({"names": []}, "needs")):  # fmt: skip
            status, body = request(server, "/api/save", bad)
            assert status == 400 and message in json.loads(body)["error"]
        assert request(server, "/api/save", {"names": {"0": "x"}}, kind="text/plain")[0] == 415
        assert list((copy_results / "model").iterdir()) == before  # nothing written

        odd = '<b onmouseover="x()">tree & "sky"</b>'
        status, body = request(server, "/api/save", {"names": {"0": odd, "1": odd, "2": "road"}})
        assert status == 200, body
        state = json.loads(body)
    saved = json.loads((copy_results / "model" / "classes.json").read_text())
    assert saved["names"] == state["classes"]["names"] == [odd, "road"]
    assert saved["mapping"] == [0, 0, 1]
    results = open_results(copy_results)
    for i, rel in enumerate(results.rels):  # class ids follow the new map
        np.testing.assert_array_equal(
            results.class_ids(i), np.array([0, 0, 1])[label(copy_results, rel)]
        )


def test_two_saves_at_once_one_is_refused(copy_results: Path, monkeypatch) -> None:
    import stego.naming

    started, release = threading.Event(), threading.Event()
    real = stego.naming.name_results

    def slow(*args, **kwargs):
        started.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(stego.naming, "name_results", slow)
    with running(copy_results) as server:
        answers: list[int] = []
        first = threading.Thread(
            target=lambda: answers.append(
                request(server, "/api/save", {"names": {"0": "first", "1": "x", "2": "y"}})[0]
            )
        )
        first.start()
        assert started.wait(30)
        status, body = request(server, "/api/save", {"names": {"0": "second"}})
        release.set()
        first.join(30)
    assert status == 409 and "another save" in json.loads(body)["error"]
    assert answers == [200]
    saved = json.loads((copy_results / "model" / "classes.json").read_text())
    assert saved["names"] == ["first", "x", "y"]


# ----------------------------------------------------------------------------- in a browser

LOADED = """new Promise((resolve) => {
  const check = () => {
    const images = [...document.images];
    const canvases = [...document.querySelectorAll('#grid canvas.overlay')];
    if (document.body.dataset.ready === 'true' && images.every((i) => i.complete)
        && canvases.length && canvases.every((c) => c.ids)) {
      resolve({
        images: images.map((i) => [i.getAttribute('src'), i.naturalWidth, i.naturalHeight]),
        tiles: [...document.querySelectorAll('#grid figcaption')].map((f) => f.textContent),
        // share of overlay pixels painted in the colour of their cluster
        painted: canvases.map((c) => {
          const ids = c.ids.data;
          const shown = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          const colours = clusterColours();
          let same = 0;
          for (let p = 0; p < ids.length; p += 4) {
            const want = colours[ids[p]];
            same += shown[p] === want[0] && shown[p + 1] === want[1] && shown[p + 2] === want[2];
          }
          return same / (ids.length / 4);
        }),
      });
    } else setTimeout(check, 50);
  };
  check();
})"""

AFTER_SAVE = """new Promise((resolve) => {
  const check = () => {
    const status = document.getElementById('status').textContent;
    if (!status.startsWith('sav') || status === 'saving…') return setTimeout(check, 50);
    resolve({
      status,
      legend: [...document.querySelectorAll('#legend .name')].map((n) => n.textContent),
      injected: document.querySelectorAll('#legend b, #clusters b, #legend img').length,
      pwned: window.pwned === 1,
      inputs: [...document.querySelectorAll('input.name')].map((i) => i.value),
    });
  };
  check();
})"""


LARGE_SHOWN = """new Promise((resolve) => {
  const check = () => {
    const photo = document.querySelector('#large img.photo');
    const ready = photo && photo.complete && photo.naturalWidth && document.querySelector(
      '#large canvas').ids;
    ready ? resolve(true) : setTimeout(check, 50);
  };
  check();
})"""


def _click(browser, x: float, y: float, kind: str = "mousePressed") -> None:
    for event in (kind, "mouseReleased") if kind == "mousePressed" else (kind,):
        params = {"type": event, "x": x, "y": y, "button": "left", "clickCount": 1}
        browser.call("Input.dispatchMouseEvent", params)


def _centre(browser, selector: str) -> tuple[float, float]:
    box = browser.evaluate(
        f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
        ".getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()"
    )
    return box[0] + box[2] / 2, box[1] + box[3] / 2


def _type_name(browser, cluster: int, text: str) -> None:
    """Select a cluster's name field, type over it, leave the field (as a person does)."""
    _click(browser, *_centre(browser, f'input.name[data-cluster="{cluster}"]'))
    browser.evaluate("document.activeElement.select()")
    browser.call("Input.insertText", {"text": text})
    browser.evaluate("document.activeElement.blur()")


@contextlib.contextmanager
def stego_view(results: Path) -> Iterator[str]:
    """`stego view RESULTS` as a person starts it; yields the address it prints."""
    process = subprocess.Popen([sys.executable, "-m", "stego.cli", "view", str(results)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=REPO)  # fmt: skip
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert "http://127.0.0.1:" in line, line + process.stdout.read()  # type: ignore[union-attr]
        yield line.split()[2]
    finally:
        process.terminate()
        process.wait(30)


def test_page_in_chromium_names_clusters(copy_results: Path, tmp_path: Path,
                                         chromium: str) -> None:  # fmt: skip
    from chromium_cdp import Browser

    odd = '<img src=x onerror="window.pwned=1">'
    with stego_view(copy_results) as url, Browser(chromium, size=(1200, 1400)) as browser:
        browser.open(url)
        shown = browser.evaluate(LOADED)
        assert browser.errors == []  # no console error, exception or failed load
        # every picture decoded: 6 thumbnails + 6 id maps + the crops of 3 clusters
        assert len(shown["images"]) >= 12 + 3
        assert all(w > 0 and h > 0 for _, w, h in shown["images"]), shown["images"]
        assert sorted(shown["tiles"]) == sorted(open_results(copy_results).image_name(i)
                                                for i in range(6))  # fmt: skip
        assert min(shown["painted"]) == 1.0  # each overlay pixel in its cluster's colour

        # hover in the large view shows the cluster under the cursor
        _click(browser, *_centre(browser, "#grid figure"))
        browser.evaluate(LARGE_SHOWN)
        left, top, width, height = browser.evaluate(
            "(() => { const r = document.querySelector('#large .stack').getBoundingClientRect();"
            " return [r.x, r.y, r.width, r.height]; })()")  # fmt: skip
        first = label(copy_results, open_results(copy_results).rels[0])
        for fx, fy in ((0.1, 0.9), (0.9, 0.9), (0.5, 0.1)):
            _click(browser, left + fx * width, top + fy * height, "mouseMoved")
            want = first[int(fy * first.shape[0]), int(fx * first.shape[1])]
            assert browser.evaluate("document.getElementById('hover').textContent") == (
                f"cluster {want}: cluster {want}"
            )
        browser.evaluate("document.getElementById('close').click()")

        # rename two clusters to one odd name, save: classes.json and the legend follow
        _type_name(browser, 0, odd)
        _type_name(browser, 1, odd)
        browser.evaluate("document.getElementById('save').click()")
        after = browser.evaluate(AFTER_SAVE)
        shot = browser.screenshot(tmp_path / "view.png")
        browser.open(url)  # reloaded: the saved names come back
        reloaded = browser.evaluate(LOADED)
        legend = browser.evaluate("[...document.querySelectorAll('#legend .name')]"
                                  ".map((n) => n.textContent)")  # fmt: skip
        assert browser.errors == []

    saved = json.loads((copy_results / "model" / "classes.json").read_text())
    assert after["status"] == "saved to model/classes.json", after
    assert saved["names"] == [odd, "cluster 2"] and saved["mapping"] == [0, 0, 1]
    assert after["legend"] == legend == saved["names"]
    assert after["inputs"] == [odd, odd, "cluster 2"]
    assert after["injected"] == 0 and not after["pwned"]  # shown as text, never run
    assert min(reloaded["painted"]) == 1.0
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 50  # table, crops, grid drawn


def test_cli_view_refuses_bad_input(segment_results: Path, tmp_path: Path, capsys) -> None:
    from stego.cli import main

    assert main(["view", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["view", str(segment_results), "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
