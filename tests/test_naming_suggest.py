"""Which images to label first (stego.naming.suggest), from cluster pixel counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from stego.naming.suggest import id_histograms, images_to_label

# (images, clusters) pixel counts: image 0 holds one big cluster, image 1 four clusters evenly,
# image 2 the two clusters image 1 lacks, image 3 a copy of image 1 at another size
COUNTS = np.array(
    [
        [1000, 0, 0, 0, 0, 0],
        [250, 250, 250, 250, 0, 0],
        [0, 0, 0, 0, 500, 500],
        [50, 50, 50, 50, 0, 0],
    ]
)


def test_the_most_evenly_covered_image_comes_first_then_what_it_lacks() -> None:
    picks = images_to_label(COUNTS, 3)
    assert picks[0] in (1, 3)  # same shares: either copy first
    assert picks[1] == 2  # adds the two clusters the first lacks; the other copy adds nothing
    assert len(set(picks)) == 3


def test_labelled_images_are_left_out_and_the_list_ends_with_the_images() -> None:
    picks = images_to_label(COUNTS, 10, skip=[1, 3])
    assert sorted(picks) == [0, 2] and picks[0] == 2
    assert images_to_label(COUNTS, 2, skip=[0, 1, 2, 3]) == []


def test_an_empty_map_does_not_break_the_ranking() -> None:
    counts = np.vstack([COUNTS, np.zeros(6, dtype=np.int64)])  # e.g. an image of void only
    assert images_to_label(counts, 1) in ([1], [3])


def test_histograms_count_the_ids_of_each_map(tmp_path: Path) -> None:
    first = np.array([[0, 0, 2], [2, 2, 1]], np.uint8)
    second = np.full((2, 3), 1, np.uint8)
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path, ids in zip(paths, (first, second), strict=True):
        Image.fromarray(ids).save(path)
    assert id_histograms(paths, 3).tolist() == [[2, 1, 3], [0, 6, 0]]
