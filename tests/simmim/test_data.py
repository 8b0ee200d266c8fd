"""Robust decoding and the pretraining data module's handling of bad input."""

from functools import partial

import cv2
import numpy as np
import pytest
import torch

from simmim.data.images import UnreadableImageError, decode_image, list_images, to_uint8_rgb
from simmim.data.loaders import collate_readable
from simmim.finetune.augment import classification_transform
from simmim.finetune.data import LabelledImageDataset
from simmim.pretrain.augment import PretrainTransform
from simmim.pretrain.data import MaskedImageDataset, PretrainDataModule
from simmim.pretrain.masking import MaskGenerator


def _write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def test_grayscale_16bit_rgba_and_colour_all_become_uint8_rgb(tmp_path):
    gray = _write(tmp_path / "g.png", np.full((10, 12), 200, np.uint8))
    deep = _write(tmp_path / "d.png", np.full((10, 12), 65535 // 2, np.uint16))
    bgra = np.zeros((10, 12, 4), np.uint8)
    bgra[..., 2], bgra[..., 3] = 255, 0  # red but fully transparent: composited over white
    rgba = _write(tmp_path / "a.png", bgra)
    bgr = np.zeros((10, 12, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's BGR order
    colour = _write(tmp_path / "c.bmp", bgr)
    for p in (gray, deep, rgba, colour):
        img = decode_image(p)
        assert img.shape == (10, 12, 3) and img.dtype == np.uint8, p
    assert (decode_image(gray) == 200).all()
    assert (decode_image(deep) == 127).all()  # 16-bit is rescaled, not clipped to white
    assert (decode_image(rgba) == 255).all()
    assert decode_image(colour)[0, 0].tolist() == [0, 0, 255]  # RGB order


def test_8bit_fast_path_equals_the_float_path():
    """8-bit gray and BGR images skip the float round trip; the result is what the float path gives: the same
    values, RGB order, contiguous."""
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (7, 9), dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8_rgb(bgr), bgr[:, :, ::-1])
    np.testing.assert_array_equal(to_uint8_rgb(gray), np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(to_uint8_rgb(gray[:, :, None]), to_uint8_rgb(gray))
    # the float path (16-bit input, exactly representable) gives the same for the same picture
    np.testing.assert_array_equal(to_uint8_rgb(bgr.astype(np.uint16) * 257), to_uint8_rgb(bgr))
    assert to_uint8_rgb(bgr).flags.c_contiguous and to_uint8_rgb(bgr).dtype == np.uint8


def test_corrupt_file_raises_named_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(UnreadableImageError, match="bad.jpg"):
        decode_image(bad)


def test_missing_and_empty_folders_fail_at_start_up(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data.root .*nowhere: image folder not found"):
        PretrainDataModule(root=str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(FileNotFoundError, match="no images .* found under .*empty"):
        PretrainDataModule(root=str(tmp_path / "empty"))


def test_recursive_listing_with_class_folders(tmp_path):
    for i, ext in enumerate(["png", "jpg", "webp", "tif", "bmp"]):
        _write(tmp_path / f"class{i % 2}" / "deeper" / f"img{i}.{ext}", np.zeros((8, 8, 3), np.uint8))
    assert len(list_images(tmp_path)) == 5


def test_corrupt_file_among_good_ones_is_skipped_with_warning(tmp_path):
    files = [_write(tmp_path / f"{i}.png", np.full((40, 40, 3), 50 * i, np.uint8)) for i in range(3)]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    files.append(tmp_path / "broken.png")
    ds = MaskedImageDataset(files, PretrainTransform(32, True), MaskGenerator(32, 16, 4))
    with pytest.warns(UserWarning, match="broken.png"):
        x, mask, skipped = collate_readable([ds[i] for i in range(len(ds))], 2)
    assert x.shape == (3, 3, 32, 32) and mask.shape == (3, 8, 8) and skipped == (3,)  # broken.png's index


def test_training_replaces_an_unreadable_file_by_the_next_readable_one(tmp_path):
    files = [_write(tmp_path / f"{i}.png", np.full((40, 40, 3), 50 * i, np.uint8)) for i in range(3)]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    files.insert(1, tmp_path / "broken.png")
    ds = MaskedImageDataset(files, PretrainTransform(32, True), MaskGenerator(32, 16, 4), refill=True)
    with pytest.warns(UserWarning, match="broken.png"):
        x, mask, skipped = collate_readable([ds[1]], 2)  # batch size 1: still a full batch
    assert x.shape == (1, 3, 32, 32) and mask.shape == (1, 8, 8) and skipped == (1,)

    labelled = LabelledImageDataset(
        files, [0, 1, 2, 3], classification_transform("official", 32, False, (0.5,) * 3, (0.5,) * 3), refill=True
    )
    with pytest.warns(UserWarning, match="broken.png"):
        x, y, index, skipped = collate_readable([labelled[1], labelled[3]], 3)
    assert y.tolist() == [2, 3] and index.tolist() == [2, 3] and skipped == (1,)  # the replacement's own label

    all_bad = MaskedImageDataset(files[1:2], ds.transform, ds.mask_generator, refill=True)
    with pytest.warns(UserWarning), pytest.raises(UnreadableImageError, match="none of the 1 images"):
        all_bad[0]


def test_a_key_seed_draws_the_crop_and_mask_and_an_index_has_fixed_ones(tmp_path):
    rng = np.random.default_rng(0)
    files = [_write(tmp_path / f"{i}.png", rng.integers(0, 255, (48, 48, 3), np.uint8)) for i in range(2)]
    gen = MaskGenerator(32, 8, 4, 0.5)
    train = MaskedImageDataset(files, PretrainTransform(32, True), gen)
    draws = [train[(0, seed)] for seed in range(6)]
    assert len({d[1].numpy().tobytes() for d in draws}) > 1 and len({d[0].numpy().tobytes() for d in draws}) > 1
    again = train[(0, 3)]
    assert torch.equal(again[0], draws[3][0]) and torch.equal(again[1], draws[3][1])  # same key, same draw
    val = MaskedImageDataset(files, PretrainTransform(32, False), gen)
    assert torch.equal(val[1][1], val[1][1]) and not torch.equal(val[0][1], val[1][1])


def test_too_many_bad_images_stop_the_run_with_a_clear_message():
    from simmim.data.watch import BadImageLimit
    from simmim.errors import DataError

    counter = BadImageLimit(max_fraction=0.1)
    counter.update([5], num_files=80)  # one bad file is always tolerated
    counter.update([5, 5, 6, 7], num_files=80)  # 3 distinct of 80: under 10%, however early
    counter.update([6, 7, 5], num_files=80)  # the same files again (a later epoch, a neighbour's refill)
    assert counter.bad == {5, 6, 7}
    message = r"9 of the 80 training images could not be decoded, more than the tolerated fraction 0.1 \(--bad_images"
    with pytest.raises(DataError, match=message):
        counter.update(range(8, 14), num_files=80)


def test_a_dataset_under_the_limit_never_stops():
    """4 corrupt files in 204 (2%) under a limit of 5%, all met among the first images: no stop (the old running
    fraction stopped such a run after 68 images, at "4 of 68")."""
    from simmim.data.watch import BadImageLimit

    counter = BadImageLimit(max_fraction=0.05)
    for step in range(20):
        counter.update([0, 1, 2, 3] if step < 3 else [], num_files=204)
    assert len(counter.bad) == 4


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_builtin_digits_are_written_in_prepare_data_not_the_constructor(tmp_path, monkeypatch, stage):
    """Under DDP every rank builds the datamodule; only `prepare_data` (rank zero per node) may write files."""
    from simmim.finetune.data import ClassificationDataModule

    monkeypatch.chdir(tmp_path)
    dm = (
        PretrainDataModule(root=None, img_size=32, mask_patch_size=8)
        if stage == "pretrain"
        else ClassificationDataModule(root=None, img_size=32)
    )
    assert not (tmp_path / "data").exists()
    dm.prepare_data()
    dm.setup("fit")
    assert (tmp_path / "data/digits/prepared/.complete").exists() and len(dm.train_files) > 1000


def test_broken_and_looping_links_are_named(tmp_path):
    folder = tmp_path / "imgs"
    _write(folder / "good.png", np.zeros((8, 8, 3), np.uint8))
    (folder / "gone.png").symlink_to(tmp_path / "missing.png")
    (folder / "a.png").symlink_to(folder / "b.png")
    (folder / "b.png").symlink_to(folder / "a.png")
    (folder / "alias.png").symlink_to(folder / "good.png")  # a working link is an ordinary image
    with pytest.warns(UserWarning) as record:
        files = list_images(folder)
    assert [f.name for f in files] == ["alias.png", "good.png"]
    named = sorted(str(w.message).split(":")[0].rsplit("/", 1)[-1] for w in record)
    assert named == ["a.png", "b.png", "gone.png"]


class _ThreadsOfWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, key):
        return torch.tensor(cv2.getNumThreads()), ()


class _Trainer:
    """What `make_loader` reads of a trainer: the rank, the world and the device batches go to."""

    def __init__(self, device):
        self.world_size, self.global_rank = 1, 0
        self.strategy = type("Strategy", (), {"root_device": torch.device(device)})()


def test_loader_workers_run_opencv_on_one_thread_and_gpu_batches_are_pinned():
    from simmim.data.loaders import make_loader

    if cv2.getNumThreads() < 2:
        pytest.skip("OpenCV runs on one thread in this process already")
    loader = make_loader(_ThreadsOfWorker(), 2, num_workers=2, train=False, collate_fn=lambda b: [t for t, _ in b])
    assert [int(t) for batch in loader for t in batch] == [1, 1, 1, 1]
    assert not loader.pin_memory
    collate = partial(collate_readable, num_fields=1)
    for train in (True, False):
        assert make_loader(_ThreadsOfWorker(), 2, 0, train, collate, _Trainer("cuda")).pin_memory
        assert not make_loader(_ThreadsOfWorker(), 2, 0, train, collate, _Trainer("cpu")).pin_memory
