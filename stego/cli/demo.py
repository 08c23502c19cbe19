"""``stego demo``: run ``stego segment`` on a few public-domain sample photos, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

# Photographs shipped inside scikit-image whose licences allow this use: NASA (public domain)
# for astronaut and rocket; CC0 for coffee and chelsea (see skimage/data/README).
SAMPLES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="try STEGO on a few sample photos (offline, a few minutes on a laptop CPU)",
        description="Copy a few public-domain sample photos from scikit-image and run "
        "`stego segment` on them; prints where the results are.",
    )
    parser.add_argument("--out", default="stego-demo", help="output folder (default: stego-demo)")
    parser.add_argument("--clusters", "-k", type=int, default=4, help="kinds of things to find")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument(
        "--backbone",
        default=None,
        help="backbone (default: as stego segment chooses; tiny-vit for a smoke test)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--verbose", action="store_true", help="also show what the libraries print (Lightning)"
    )
    parser.set_defaults(func=run)


def sample_images(target: Path) -> Path:
    """Copy the sample photos into ``target/images`` (once) and return that folder."""
    import importlib.util
    import shutil

    from stego.errors import StegoError

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise StegoError("the demo photos come from scikit-image: pip install scikit-image")
    source = Path(list(spec.submodule_search_locations)[0]) / "data"
    images = target / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in SAMPLES:
        if not (images / name).is_file():
            shutil.copyfile(source / name, images / name)
    return images


def run(args: argparse.Namespace) -> int:
    from stego.segment import segment_folder

    out = Path(args.out)
    images = sample_images(out)
    summary = segment_folder(
        images,
        out / "results",
        clusters=args.clusters,
        backbone=args.backbone,
        steps=args.steps,
        progress=not args.quiet,
        verbose=args.verbose,
    )
    print(f"demo done in {summary['total_seconds']:.0f} s. Look at:")
    print(f"  {summary['outputs']['contact_sheet']}   (images and their segments)")
    print(f"  {summary['outputs']['overlays']}/")
    print(f"  {out / 'results' / 'summary.json'}")
    print(f"See, name and merge the clusters in your browser: stego view {out / 'results'}")
    return 0
