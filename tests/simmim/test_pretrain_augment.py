"""The pretraining augmentation against albumentations' and torchvision's own operations, and the normalisation on
the device against albumentations' Normalize."""

from types import SimpleNamespace

import albumentations as A
import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from simmim.data.crops import Normalise, planes
from simmim.data.images import normalize_images
from simmim.pretrain.augment import PretrainTransform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _Recorder:
    """A generator stand-in that passes draws through and records them, to read back the crop and flip."""

    def __init__(self, seed):
        self.rng, self.flips = np.random.default_rng(seed), []

    def uniform(self, *a):
        return self.rng.uniform(*a)

    def integers(self, *a):
        return self.rng.integers(*a)

    def random(self):
        self.flips.append(self.rng.random() < 0.5)
        return 0.0 if self.flips[-1] else 1.0


@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (61, 47)])
def test_output_equals_albumentations_crop_resize_flip_of_the_same_box(shape):
    img = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    tf = PretrainTransform(96, True)
    for seed in range(6):
        top, left, h, w = tf.crop_box(*shape, np.random.default_rng(seed))
        rec = _Recorder(seed)
        x = tf(img, rec)
        assert x.shape == (3, 96, 96) and x.dtype == torch.uint8 and x.is_contiguous()
        ref = A.Compose(
            [
                A.Crop(x_min=left, y_min=top, x_max=left + w, y_max=top + h),
                A.Resize(96, 96),  # OpenCV INTER_LINEAR
                A.HorizontalFlip(p=1.0 if rec.flips[0] else 0.0),
            ]
        )(image=img)["image"]
        np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), ref)


def test_evaluation_resizes_the_whole_image_and_the_device_normalises_as_albumentations():
    img = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    x = PretrainTransform(32, False)(img, np.random.default_rng(0))
    ref = A.Compose([A.Resize(32, 32), A.Normalize(mean=MEAN, std=STD, max_pixel_value=255.0)])(image=img)["image"]
    normalised = normalize_images(x[None], MEAN, STD)[0]
    assert normalised.dtype == torch.float32
    np.testing.assert_allclose(normalised.permute(1, 2, 0).numpy(), ref, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_training_batches_arrive_pinned_and_normalise_on_the_gpu(tmp_path):
    import cv2

    from simmim.data.loaders import collate_readable, make_loader
    from simmim.pretrain.data import MaskedImageDataset
    from simmim.pretrain.masking import MaskGenerator

    files = []
    for i in range(4):
        files.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(files[-1]), np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8))

    class CudaTrainer:  # what make_loader reads of a trainer that trains on the GPU
        world_size, global_rank = 1, 0
        strategy = SimpleNamespace(root_device=torch.device("cuda"))

    ds = MaskedImageDataset(files, PretrainTransform(32, True), MaskGenerator(32, 16, 4), refill=True)
    trainer = CudaTrainer()
    loader = make_loader(ds, 2, 1, True, lambda b: collate_readable(b, 2), trainer)
    x, mask, _ = next(iter(loader))
    assert x.dtype == torch.uint8 and x.is_pinned()
    y = normalize_images(x.to("cuda", non_blocking=True), MEAN, STD)
    torch.testing.assert_close(y.cpu(), normalize_images(x, MEAN, STD))


def test_crop_boxes_cover_the_scale_and_ratio_ranges_and_flip_half_the_time():
    tf = PretrainTransform(192, True)
    rng = np.random.default_rng(0)
    boxes = np.array([tf.crop_box(400, 400, rng) for _ in range(4000)])  # square: every ratio can fit
    top, left, h, w = boxes.T
    area, aspect = h * w / 400**2, w / h
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 400).all() and (left + w <= 400).all()
    assert area.min() > 0.66 and area.max() <= 1.0 and area.min() < 0.68 and area.max() > 0.97
    assert aspect.min() > 0.74 and aspect.max() < 1.34 and aspect.min() < 0.77 and aspect.max() > 1.3
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, :20] = 255  # left half white: a flip moves it right
    whole = PretrainTransform(40, True, scale=(1, 1), ratio=(1, 1))
    flips = [whole(img, np.random.default_rng(s)) for s in range(400)]
    rate = np.mean([bool(f[0, 0, 0] < f[0, 0, -1]) for f in flips])  # dark on the left: flipped
    assert 0.42 < rate < 0.58


@pytest.mark.parametrize("shape", [(10, 200), (300, 12)])
def test_the_fallback_is_torchvisions_centre_crop(shape):
    """An image too elongated for any crop in the ratio range: every try fails, and the box is torchvision's
    deterministic fallback."""
    tf = PretrainTransform(16, True, scale=(0.67, 1.0))
    ours = tf.crop_box(*shape, np.random.default_rng(0))
    torch.manual_seed(0)
    ref = RandomResizedCrop.get_params(torch.zeros(3, *shape), scale=[0.67, 1.0], ratio=[3 / 4, 4 / 3])
    assert ours == tuple(ref), (ours, ref)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("channels", [1, 3, 4, 13, 128, 129, 256])
def test_planes_are_numpys_transposing_copy_for_every_type_and_channel_count(dtype, channels):
    img = np.random.default_rng(channels).integers(0, 200, (7, 9, channels)).astype(dtype)
    out = planes(img)
    assert out.dtype == img.dtype and out.flags.c_contiguous
    np.testing.assert_array_equal(out, img.transpose(2, 0, 1))


@pytest.mark.parametrize("dtype, full, channels", [(np.uint8, 255, 3), (np.uint16, 65535, 13), (np.float32, 1, 200)])
def test_normalise_is_the_per_channel_formula_bit_for_bit_on_a_cropped_view(dtype, full, channels):
    image = np.random.default_rng(channels).integers(0, 200, (37, 41, channels)).astype(dtype)
    view = image[2:30, 3:33]  # a centre crop, as the evaluation transforms hand it on
    mean, std = np.linspace(0.1, 0.5, channels), np.linspace(0.2, 0.3, channels)
    x = view.astype(np.float32) / np.float32(full) if full != 1 else view.astype(np.float32)
    expected = (x - mean.astype(np.float32)) / std.astype(np.float32)  # over the last axis, (H, W, C)
    out = Normalise(mean, std, full)(view)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, torch.from_numpy(np.ascontiguousarray(expected.transpose(2, 0, 1))))
