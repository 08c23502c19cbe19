"""Shared fixtures of the reliability suite: tiny bad files, a tiny model, subprocess helpers.

Everything is generated in ``tmp_path`` (a few KB) and uses the random ``tiny-vit`` backbone;
the real offline backbone is never loaded. Helpers are fixtures that return functions, because
this folder has no ``__init__.py`` to import a helper module from.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
N_CLUSTERS = 4


# ----------------------------------------------------------------------------- images


def rgb_array(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A 60-byte PNG whose header claims ``side`` x ``side`` RGB pixels (no pixel data)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b""))
    return path


def write_bad_image(kind: str, path: Path) -> Path:
    """Write one bad image of ``kind`` at ``path`` (suffix chosen by the caller)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("truncated_jpeg", "truncated_png"):
        buffer = io.BytesIO()
        Image.fromarray(rgb_array(64, 64, 3)).save(
            buffer, format="JPEG" if kind == "truncated_jpeg" else "PNG"
        )
        data = buffer.getvalue()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "bomb":
        bomb_png(path)
    else:  # pragma: no cover - test bug
        raise ValueError(kind)
    return path


BAD_KINDS = {
    "truncated_jpeg": "cut_jpeg.jpg",
    "truncated_png": "cut_png.png",
    "zero_bytes": "empty.jpg",
    "text": "notes.jpg",
    "bomb": "bomb.png",
}


def write_mode_image(kind: str, path: Path, rgb: np.ndarray) -> Path:
    """``rgb`` stored in an unusual mode; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(rgb)
    if kind == "grey":
        image.convert("L").save(path)
    elif kind == "palette":
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path)
    elif kind == "rgba":
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 77, np.uint8)]), "RGBA").save(path)
    elif kind == "cmyk_jpeg":
        image.convert("CMYK").save(path, format="JPEG", quality=95)
    elif kind == "png16":
        grey = rgb[..., 0].astype(np.uint16) * 257  # 8-bit value v -> 16-bit v * 257
        Image.fromarray(grey).save(path)
    else:  # pragma: no cover
        raise ValueError(kind)
    return path


def exif_rotated_jpeg(path: Path, rgb: np.ndarray, orientation: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, format="JPEG", quality=100, subsampling=0, exif=exif.tobytes())
    return path


def write_folder(root: Path, n: int, size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    """``n`` random RGB PNGs img_000.png ... under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rgb_array(*size, seed=seed + i)).save(root / f"img_{i:03d}.png")
    return root


# ----------------------------------------------------------------------------- model


def tiny_segmenter(n_classes: int | None = None):
    from test_prediction import tiny_segmenter as build

    return build(n_classes, n_clusters=N_CLUSTERS)


@pytest.fixture(scope="session")
def segmenter():
    return tiny_segmenter()


# ----------------------------------------------------------------------------- subprocesses


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def spawn(args: list[str], cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd or REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def run_py(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``python *args`` to completion (raises on timeout); returns the completed process."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kill_when(
    proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 60, poll: float = 0.01
) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` is true. Returns False when the process ended
    on its own first (the test then cannot claim it interrupted anything)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return True
        time.sleep(poll)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    raise AssertionError("the child never reached the point where it should be killed")


def tree_bytes(root: Path, pattern: str = "**/*") -> dict[str, bytes]:
    """Relative path -> content of every file under ``root`` matching ``pattern``."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.glob(pattern))
        if p.is_file()
    }


def stray_temps(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if ".tmp-" in p.name)


class Evil:
    """Unpickling this runs ``pathlib.Path(marker).touch()``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class EvilSystem:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def helpers():
    """Namespace of the helper functions above (no __init__.py here to import them)."""
    import types

    return types.SimpleNamespace(
        rgb_array=rgb_array,
        bomb_png=bomb_png,
        write_bad_image=write_bad_image,
        write_mode_image=write_mode_image,
        exif_rotated_jpeg=exif_rotated_jpeg,
        write_folder=write_folder,
        tiny_segmenter=tiny_segmenter,
        spawn=spawn,
        run_py=run_py,
        kill_when=kill_when,
        tree_bytes=tree_bytes,
        stray_temps=stray_temps,
        Evil=Evil,
        EvilSystem=EvilSystem,
        BAD_KINDS=BAD_KINDS,
        N_CLUSTERS=N_CLUSTERS,
        REPO=REPO,
    )
