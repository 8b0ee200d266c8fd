"""The natural-image benchmark's crops: held-out crops share no pixel with training crops, and the folder has the
layout the stages read (16 classes in train/ and val/)."""

import cv2
import numpy as np
import pytest

from simmim.data import builtin as builtin_data
from simmim.data.builtin import PHOTOS, crop_boxes, prepare_photos
from simmim.data.folders import labelled_split


def _overlap(a, b) -> bool:
    (_, t1, l1, s1), (_, t2, l2, s2) = a, b
    return t1 < t2 + s2 and t2 < t1 + s1 and l1 < l2 + s2 and l2 < l1 + s1


def test_held_out_crops_share_no_pixel_with_training_crops():
    for shape in ((384, 512), (384, 384), (576, 384), (384, 441)):
        for index in range(4):
            boxes = list(crop_boxes(shape, 4, index, 6, 6, np.random.default_rng(index)))
            train = [b for b in boxes if b[0] == "train"]
            val = [b for b in boxes if b[0] == "val"]
            assert len(train) == 12 * 6 and len(val) == 4 * 6
            assert all(0 <= t and 0 <= left and t + s <= shape[0] and left + s <= shape[1] for _, t, left, s in boxes)
            assert not any(_overlap(v, t) for v in val for t in train), (shape, index)
            held_rows = {t * 4 // shape[0] for _, t, _, _ in val}
            assert held_rows == {0, 1, 2, 3}  # one held-out tile in every row


def test_written_crops_come_from_their_own_split(tmp_path, monkeypatch):
    """Photographs whose every tile is one flat colour (the tile's number): each written crop is flat, and its colour
    says which tile it came from: held-out tiles for val/, the others for train/."""

    def tiles(package, name):  # 384 x 512: resized by 1, tiles of 96 x 128
        return np.repeat(np.repeat(np.arange(16, dtype=np.uint8).reshape(4, 4) * 15, 96, 0), 128, 1)[..., None].repeat(
            3, 2
        )

    monkeypatch.setattr(builtin_data, "_photo", tiles)
    root = prepare_photos(tmp_path / "tiles", train_crops_per_tile=2, val_crops_per_tile=2)
    for index, label in enumerate(sorted(PHOTOS)):
        held_out = {row * 4 + (row * 2 + index) % 4 for row in range(4)}
        for split, expected in (("val", held_out), ("train", set(range(16)) - held_out)):
            crops = [cv2.imread(str(f)) for f in sorted((root / split / label).iterdir())]
            assert all(c.min() == c.max() for c in crops)  # from one tile
            assert {int(c[0, 0, 0]) // 15 for c in crops} == expected, (label, split)


def test_prepared_folder_reads_as_labelled_train_and_val(tmp_path):
    root = prepare_photos(tmp_path / "photos", train_crops_per_tile=1, val_crops_per_tile=1)
    tf, tl, vf, vl, classes = labelled_split(str(root), 0.2)
    assert classes == sorted(PHOTOS) and len(classes) == 16
    assert len(tf) == 16 * 12 and len(vf) == 16 * 4
    assert sorted(set(tl)) == sorted(set(vl)) == list(range(16))
    image = cv2.imread(str(vf[0]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert prepare_photos(root, train_crops_per_tile=1, val_crops_per_tile=1) == root  # found, not written again
    with pytest.raises(FileExistsError, match="other settings"):
        prepare_photos(root)  # the defaults would be other crops: refused, not mixed up
