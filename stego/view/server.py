"""``stego view``: a local web page over a RESULTS folder (clusters, images, naming).

The server is the standard library's :class:`http.server.ThreadingHTTPServer`: the page needs a
handful of read-only routes and one POST, for one person, on 127.0.0.1. It adds no dependency
and nothing to configure, and its threads serve the pictures of a page in parallel. A web
framework would bring routing and templating the page does not use (the page is static HTML
and JavaScript that asks for JSON).

Routes (``<i>``: an image's index in :attr:`stego.results.Results.rels`, ``<c>``: a cluster):

- ``/``, ``/static/app.js``, ``/static/style.css``: the page, shipped in the package;
- ``/api/state``: clusters, class map, pixel shares; ``/api/images?offset=&limit=&cluster=``;
- ``/thumb/<i>.jpg``, ``/thumb-ids/<i>.png``, ``/image/<i>.jpg``, ``/ids/<i>.png``,
  ``/crop/<c>/<i>.jpg``: pictures (:mod:`stego.view.pictures`);
- ``POST /api/save`` ``{"names": {cluster: name}}``: :func:`stego.naming.name_results`, the
  library call of ``stego name --names``.

Only requests whose Host is this server's own address are answered (a web page elsewhere
cannot reach it through a DNS name that points to 127.0.0.1), and a save must be sent as JSON,
which a page of another origin cannot do without a CORS permission this server never gives.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import threading
import webbrowser
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from stego.errors import StegoError
from stego.results import Results, cache_dir, cluster_counts, open_results
from stego.view import pictures

__all__ = ["ViewServer", "make_server", "serve", "check_names"]

STATIC = Path(__file__).resolve().parent / "static"
PAGES = {
    "/": "index.html",
    "/static/app.js": "app.js",
    "/static/style.css": "style.css",
    "/favicon.ico": "icon.svg",
}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".json": "application/json",
         ".jpg": "image/jpeg", ".png": "image/png", ".svg": "image/svg+xml"}  # fmt: skip
POLICY = "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'"
MAX_NAME = 80  # characters in a class name
MAX_PAGE = 200  # images per /api/images answer
MAX_BODY = 1 << 20


class SharedLock:
    """Many holders at once (requests reading label maps) or one alone (a save, which moves
    them: the first naming turns ``labels/`` into class ids and keeps the cluster ids in
    ``clusters/``, so a picture made during the swap could read the wrong ids)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._readers, self._writing = 0, False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._writing and self._readers == 0)
            self._writing = True
        try:
            yield
        finally:
            with self._changed:
                self._writing = False
                self._changed.notify_all()


class ViewServer(ThreadingHTTPServer):
    """The HTTP server with the RESULTS folder it shows."""

    daemon_threads = True

    def __init__(self, results: Results, port: int, *, progress: bool = False) -> None:
        self.results = results
        self.counts = cluster_counts(results, progress=progress)
        self.cache = cache_dir(results)
        self.save_lock = threading.Lock()  # a second save while one runs is refused
        self.files = SharedLock()
        try:
            super().__init__(("127.0.0.1", port), Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StegoError(
                    f"port {port} on 127.0.0.1 is in use (another stego view?): pass another "
                    "--port, or leave --port out to get a free one"
                ) from None
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    # ------------------------------------------------------------------ answers
    def state(self) -> dict[str, Any]:
        """What the page shows about the clusters and classes."""
        r, pixels = self.results, self.counts.pixels
        total = max(int(pixels.sum()), 1)
        class_pixels = self.counts.class_pixels(r.classes).sum(0)
        clusters = [
            {"id": c, "share": float(pixels[:, c].sum()) / total,
             "images": int((pixels[:, c] > 0).sum()),
             "crops": self.crops(c)}
            for c in range(r.n_clusters)
        ]  # fmt: skip
        return {
            "results": str(r.root),
            "n_images": len(r.rels),
            "named": r.named,
            "images_missing": sum(r.source(i) is None for i in range(len(r.rels))),
            "classes": {
                "names": r.classes.names,
                "colors": r.classes.colors,
                "mapping": r.classes.mapping,
                "share": [float(p) / total for p in class_pixels],
            },  # fmt: skip
            "clusters": clusters,
        }

    def images(self, offset: int, limit: int, cluster: int | None) -> dict[str, Any]:
        """One page of images, optionally only those that hold ``cluster``."""
        pixels, sizes = self.counts.pixels, self.counts.sizes
        chosen = np.arange(len(pixels)) if cluster is None else np.flatnonzero(pixels[:, cluster])
        page = chosen[offset : offset + min(limit, MAX_PAGE)]
        items = [{"index": int(i), "name": self.results.image_name(i),
                  "height": int(sizes[i, 0]), "width": int(sizes[i, 1])} for i in page]  # fmt: skip
        return {"total": len(chosen), "offset": offset, "items": items}

    def crops(self, cluster: int) -> list[int]:
        """The images whose crops show ``cluster`` in its row."""
        if not 0 <= cluster < self.results.n_clusters:
            return []
        return pictures.crop_images(self.counts, cluster)

    def save(self, raw: Any) -> dict[str, Any]:
        """Name the clusters through the naming library; one save at a time."""
        from stego.naming import name_results

        names = check_names(raw, self.results.n_clusters)
        if not self.save_lock.acquire(blocking=False):
            raise Busy("another save is running; wait for it to finish and save again")
        try:
            with self.files.alone():
                name_results(self.results.root, names=names, progress=False)
                self.results.reload_classes()
        finally:
            self.save_lock.release()
        return self.state()


class Busy(StegoError):
    """A save was asked while another one runs."""


def check_names(raw: Any, n_clusters: int) -> dict[int, str]:
    """``{"names": {cluster: name}}`` from the page -> {cluster id: name}, or StegoError."""
    names = raw.get("names") if isinstance(raw, dict) else None
    if not isinstance(names, dict) or not names:
        raise StegoError('a save needs {"names": {cluster id: name, ...}}')
    out: dict[int, str] = {}
    for key, name in names.items():
        if not str(key).isdigit() or not 0 <= int(key) < n_clusters:
            raise StegoError(
                f"cluster {key!r} does not exist: the clusters are 0 to {n_clusters - 1}"
            )
        if not isinstance(name, str) or not name.strip():
            raise StegoError(f"cluster {key} needs a name that is not empty")
        name = name.strip()
        if len(name) > MAX_NAME or re.search(r"[\x00-\x1f\x7f]", name):
            raise StegoError(
                f"the name of cluster {key} must be one line of at most {MAX_NAME} characters"
            )
        out[int(key)] = name
    return out


PICTURES = {
    "thumb": (re.compile(r"/thumb/(\d+)\.jpg"), pictures.thumbnail),
    "thumb-ids": (re.compile(r"/thumb-ids/(\d+)\.png"), pictures.id_thumbnail),
    "image": (re.compile(r"/image/(\d+)\.jpg"), pictures.large_image),
}
IDS = re.compile(r"/ids/(\d+)\.png")
CROP = re.compile(r"/crop/(\d+)/(\d+)\.jpg")


class Handler(BaseHTTPRequestHandler):
    server: ViewServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # one line per picture would bury the address the user needs

    def _send(self, status: int, body: bytes, kind: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=600" if cache else "no-store")
        self.send_header("Content-Security-Policy", POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, value: Any, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(value).encode(), TYPES[".json"])

    def _file(self, path: Path, cache: bool = True) -> None:
        self._send(HTTPStatus.OK, path.read_bytes(), TYPES[path.suffix], cache)

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _own_host(self) -> bool:
        port = self.server.server_address[1]
        return self.headers.get("Host") in (f"127.0.0.1:{port}", f"localhost:{port}")

    def do_GET(self) -> None:  # noqa: N802 - the base's name
        if not self._own_host():
            return self._error(HTTPStatus.FORBIDDEN, "unknown host")
        url = urlsplit(self.path)
        try:
            self._get(url.path, parse_qs(url.query))
        except StegoError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))

    def _get(self, path: str, query: dict[str, list[str]]) -> None:
        s = self.server
        if path in PAGES:
            return self._file(STATIC / PAGES[path], cache=False)
        if path == "/api/state":
            return self._json(s.state())
        if path == "/api/images":
            number = lambda key, default: int(query.get(key, [default])[0])  # noqa: E731
            cluster = query.get("cluster", [""])[0]
            return self._json(s.images(number("offset", 0), number("limit", 48),
                                       int(cluster) if cluster.isdigit() else None))  # fmt: skip
        with s.files.shared():  # not while a save moves the label maps
            found = self._picture(path)
            body = found.read_bytes() if found is not None else None
        if found is None or body is None:
            return self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        self._send(HTTPStatus.OK, body, TYPES[found.suffix], cache=True)

    def _picture(self, path: str) -> Path | None:
        """The picture file ``path`` asks for (made and cached if needed), or None."""
        s = self.server
        for pattern, make in PICTURES.values():
            if (match := pattern.fullmatch(path)) and self._image(int(match[1])):
                return make(s.results, int(match[1]), s.cache)
        if (match := IDS.fullmatch(path)) and self._image(int(match[1])):
            return s.results.cluster_path(int(match[1]))
        match = CROP.fullmatch(path)
        if match and int(match[2]) in s.crops(int(match[1])):
            return pictures.crop(s.results, int(match[1]), int(match[2]), s.cache)
        return None

    def _image(self, index: int) -> bool:
        return 0 <= index < len(self.server.results.rels)

    def do_POST(self) -> None:  # noqa: N802 - the base's name
        if not self._own_host() or self.path != "/api/save":
            return self._error(HTTPStatus.FORBIDDEN, "only POST /api/save from the page")
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the names as JSON")
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            return self._error(HTTPStatus.BAD_REQUEST, "the names are missing or too long")
        try:
            raw = json.loads(self.rfile.read(length))
            self._json(self.server.save(raw))
        except Busy as exc:
            self._error(HTTPStatus.CONFLICT, str(exc))
        except (StegoError, ValueError) as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))


def make_server(results: str | Path, port: int = 0, *, progress: bool = False) -> ViewServer:
    """A server for ``results`` on 127.0.0.1 (``port`` 0: a free one), not yet serving."""
    return ViewServer(open_results(results), port, progress=progress)


def serve(results: str | Path, port: int = 0, *, open_browser: bool = False) -> None:
    """Serve the page until Ctrl-C, printing its address."""
    server = make_server(results, port, progress=True)
    print(f"stego view: {server.url} (Ctrl-C to stop)", flush=True)
    if open_browser:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
