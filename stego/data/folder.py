"""A folder of the user's own images, optionally with a parallel folder of label PNGs.

Images are found recursively (any format Pillow reads: jpg, png, bmp, tif, webp, gif, ...),
hidden files and folders skipped, in sorted relative-path order so indices are stable across
runs and machines. Labels, when given, live at the same relative path under ``label_dir`` with
a ``.png`` suffix and hold ids ``0..n_classes-1`` (``ignore_value``, default 255, = unlabelled).

With ``skip_bad=True`` every file is decoded once when the dataset is built; unreadable images
or labels are logged as warnings, left out, and listed in :attr:`FolderDataset.skipped`.
Without it, a bad file raises :class:`StegoError` naming it when it is read.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stego.data.datasets import Sample, SegmentationDataset, Transform
from stego.data.label_maps import LabelMap, identity_map
from stego.errors import StegoError

__all__ = ["FolderDataset", "IMAGE_EXTENSIONS", "list_images"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm",
     ".pnm", ".tga", ".jfif", ".jp2", ".j2k", ".dib", ".ico", ".sgi", ".im", ".pcx"}
)  # fmt: skip
"""File suffixes (lower case) taken as images."""


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive), skipping hidden entries; sorted by relative path."""
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(rel)
    return [root / rel for rel in sorted(found, key=lambda r: r.as_posix())]


class FolderDataset(SegmentationDataset):
    """Images under ``root`` (recursive) with optional labels under ``label_dir``.

    Args:
        root: image folder.
        label_dir: folder of single-channel PNG labels at the same relative paths, or ``None``.
        n_classes: number of classes in the labels (required with ``label_dir``).
        ignore_value: raw label value meaning "unlabelled" (mapped to IGNORE).
        transform: paired transform, see :class:`SegmentationDataset`.
        skip_bad: decode every file now; leave out and log bad ones instead of raising later.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        label_dir: str | Path | None = None,
        n_classes: int | None = None,
        ignore_value: int | None = 255,
        transform: Transform | None = None,
        skip_bad: bool = False,
    ) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise StegoError(f"image folder {root} does not exist; pass a folder of images.")
        label_map: LabelMap | None = None
        labels: Path | None = None
        if label_dir is not None:
            labels = Path(label_dir).expanduser()
            if not labels.is_dir():
                raise StegoError(
                    f"label folder {labels} does not exist; pass the folder of label PNGs."
                )
            if n_classes is None:
                raise StegoError(f"labels in {labels} need n_classes (the number of class ids).")
            label_map = identity_map(n_classes, ignore_value)
        images = list_images(root)
        if not images:
            raise StegoError(
                f"no images found under {root} "
                f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS)[:6])}, ...)."
            )
        samples = [
            Sample(
                p, None if labels is None else (labels / p.relative_to(root)).with_suffix(".png")
            )
            for p in images
        ]
        super().__init__(samples, label_map=label_map, transform=transform, name=f"folder:{root}")
        self.root = root
        self.label_dir = labels
        self.n_classes = n_classes
        self.skipped: list[tuple[Path, str]] = []
        """(file, reason) of every image left out by ``skip_bad``."""
        if skip_bad:
            self._drop_bad()
        elif labels is not None:
            missing = [
                s.label for s in self.samples if s.label is not None and not s.label.is_file()
            ]
            if missing:
                raise StegoError(
                    f"{len(missing)} images under {root} have no label in {labels}, "
                    f"e.g. {missing[0]}; "
                    "add the labels or use skip_bad=True to leave those images out."
                )

    def _drop_bad(self) -> None:
        kept: list[Sample] = []
        for index, sample in enumerate(self.samples):
            try:
                self.check(index)
            except StegoError as exc:
                log.warning("skipping %s: %s", sample.image, exc)
                self.skipped.append((sample.image, str(exc)))
                continue
            kept.append(sample)
        self.samples = kept
        if not kept:
            raise StegoError(f"every image under {self.root} was unreadable; see the warnings.")

    def check(self, index: int) -> None:
        """Read sample ``index`` fully (image, label, size, values); raise StegoError if bad."""
        self.load(index)
