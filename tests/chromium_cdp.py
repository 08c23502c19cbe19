"""A headless Chromium driven over the DevTools protocol, to check that a page really renders.

Chromium started with ``--remote-debugging-pipe`` reads protocol commands (JSON, each ended by
a NUL byte) from its file descriptor 3 and writes replies and events to descriptor 4, so no port
and no extra package is needed. Only what the report tests use is implemented: open a page,
collect console errors, uncaught exceptions and failed loads, evaluate a script, take a
screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome")
# Quiet, offline, reproducible: no sandbox (CI runs as root), no GPU, no background traffic.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--remote-debugging-pipe"]  # fmt: skip


def find_chromium() -> str | None:
    return next((shutil.which(n) for n in NAMES if shutil.which(n)), None)


class Browser:
    """``with Browser(exe, (1200, 2000)) as b: b.open(url); b.evaluate(js); b.screenshot()``."""

    def __init__(self, exe: str, size: tuple[int, int] = (1200, 2000), timeout: float = 60.0):
        self.exe, self.size, self.timeout = exe, size, timeout
        self.errors: list[str] = []  # console errors, exceptions, failed loads since open()
        self._next_id, self._buffer = 0, b""

    def __enter__(self) -> Browser:
        self._profile = tempfile.TemporaryDirectory(prefix="stego-chromium-")
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def wire() -> None:  # in the child: the protocol's descriptors 3 (in) and 4 (out)
            ends = os.dup(to_child), os.dup(from_child)  # neither is 3 or 4 unless those were free
            for fd, end in zip((3, 4), ends, strict=True):
                os.dup2(end, fd)
                os.set_inheritable(fd, True)  # dup2 onto itself keeps it non-inheritable

        width, height = self.size
        self._proc = subprocess.Popen(
            [self.exe, *FLAGS, f"--user-data-dir={self._profile.name}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, close_fds=False,  # only 3 and 4 are inheritable (wire)
        )  # fmt: skip
        os.close(to_child)
        os.close(from_child)
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._send("Browser.close", {}, None)
            self._proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - already gone, or hung: killed below
            self._proc.kill()
            self._proc.wait()
        os.close(self._write)
        os.close(self._read)
        self._profile.cleanup()

    # ------------------------------------------------------------------ protocol
    def _send(self, method: str, params: dict[str, Any], session: str | None) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError(f"no answer from {self.exe} within {self.timeout:.0f} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"{self.exe} exited (code {self._proc.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        data = json.loads(message)
        self._note(data)
        return data

    def _note(self, event: dict[str, Any]) -> None:
        """Keep what a page should never produce: console errors, exceptions, failed loads."""
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.errors.append(f"console.{params['type']}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(f"exception: {details.get('exception', {}).get('description')}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.errors.append(f"{entry['source']}: {entry['text']} {entry.get('url', '')}")

    def _call(self, method: str, params: dict[str, Any] | None = None,
              session: str | None = None) -> dict[str, Any]:  # fmt: skip
        wanted = self._send(method, params or {}, session)
        deadline = time.monotonic() + self.timeout
        while True:
            data = self._receive(deadline)
            if data.get("id") == wanted:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A protocol command sent to the page; returns its result."""
        return self._call(method, params, self._session)

    # ------------------------------------------------------------------ page
    def open(self, url: str) -> None:
        """Load ``url`` and wait for its load event (every image fetched and decoded or failed)."""
        self.errors = []
        self.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + self.timeout
        while self._receive(deadline).get("method") != "Page.loadEventFired":
            pass

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """A PNG of the viewport (or of the whole page) written to ``path``."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        data = self.call("Page.captureScreenshot", params)["data"]
        path.write_bytes(base64.b64decode(data))
        return path
