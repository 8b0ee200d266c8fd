"""The fine-tuning augmentation: the official pipeline against timm's as the official SwinV2 code builds it, the
evaluation resize against PIL, Pillow 13's posterize, and the draws per sample whatever the worker."""

import random

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import AugmentOp

from simmim.data.loaders import IMAGENET_MEAN, IMAGENET_STD, WorkerLoader
from simmim.finetune.augment import classification_transform
from simmim.finetune.data import LabelledImageDataset
from simmim.seeding import seeded_globals


def _photo(h=150, w=200, seed=0):
    """A smooth image with some texture (RandAugment's ops all change it visibly)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _official_swinv2_train_transform(img_size):
    """What the official SwinV2 code's build_transform makes for training from its fine-tuning config (DATA:
    INTERPOLATION bicubic; AUG: COLOR_JITTER 0.4, AUTO_AUGMENT rand-m9-mstd0.5-inc1, REPROB 0.25, REMODE pixel,
    RECOUNT 1)."""
    return create_transform(
        input_size=img_size, is_training=True, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
        re_prob=0.25, re_mode="pixel", re_count=1, interpolation="bicubic",
    )  # fmt: skip


def test_official_training_pipeline_equals_the_official_codes_timm_pipeline_draw_for_draw():
    ours = classification_transform("official", 64, True, IMAGENET_MEAN, IMAGENET_STD, 0.25)
    reference = _official_swinv2_train_transform(64)
    image = _photo()
    outputs = []
    for seed in range(40):
        with seeded_globals(seed):
            x = ours(image)
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        try:
            expected = reference(Image.fromarray(image))
        except ValueError:  # timm's posterize at 0 bits under Pillow 13; ours makes it black (tested below)
            continue
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        torch.testing.assert_close(x, expected, rtol=0, atol=0)
        outputs.append(x)
    assert len(outputs) >= 35 and len({o.sum().item() for o in outputs}) == len(outputs)  # every seed differs


def test_official_pipeline_has_randaugment_pixel_erasing_and_no_color_jitter():
    tfm = classification_transform("official", 64, True, IMAGENET_MEAN, IMAGENET_STD, 0.25).transform
    names = [type(t).__name__ for t in tfm.transforms]
    assert "ColorJitter" not in names and "RandAugment" in names
    erasing = tfm.transforms[-1]
    assert type(erasing).__name__ == "RandomErasing" and erasing.mode == "pixel" and erasing.probability == 0.25
    assert str(tfm.transforms[0].interpolation) == "InterpolationMode.BICUBIC"


def test_posterize_to_zero_bits_makes_the_image_black_instead_of_failing():
    """RandAugment's increasing posterize keeps 4 - magnitude * 4 / 10 bits: 0 at magnitude 10, which a drawn
    magnitude (9 +- 0.5) reaches; Pillow 13 refuses 0 bits, so timm's op raises mid-epoch."""
    tfm = classification_transform("official", 64, True, IMAGENET_MEAN, IMAGENET_STD, 0.25).transform
    ra = next(t for t in tfm.transforms if type(t).__name__ == "RandAugment")
    ours = next(op for op in ra.ops if op.name == "PosterizeIncreasing")
    ours.magnitude, ours.magnitude_std, ours.prob = 10, 0, 1.0
    black = np.asarray(ours(Image.fromarray(_photo())))
    assert black.shape == (150, 200, 3) and black.max() == 0
    timms = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    try:
        np.testing.assert_array_equal(np.asarray(timms(Image.fromarray(_photo()))), black)  # Pillow < 13
    except ValueError:
        pass  # Pillow 13 and later


def test_evaluation_resizes_by_256_over_224_bicubic_then_center_crops():
    image = _photo(150, 200)
    x = classification_transform("official", 112, False, (0.0,) * 3, (1.0,) * 3)(image)
    short = int(256 / 224 * 112)  # 128
    resized = Image.fromarray(image).resize((int(short * 200 / 150), short), Image.BICUBIC)  # 170 x 128
    left, top = round((170 - 112) / 2), round((128 - 112) / 2)
    expected = np.asarray(resized.crop((left, top, left + 112, top + 112)), dtype=np.float32) / 255
    torch.testing.assert_close(x, torch.from_numpy(expected).permute(2, 0, 1), rtol=0, atol=1e-6)


def test_digits_recipe_keeps_the_size_and_draws_per_seed():
    image = _photo(64, 64)
    train = classification_transform("digits", 64, True, IMAGENET_MEAN, IMAGENET_STD)
    evaluation = classification_transform("digits", 64, False, IMAGENET_MEAN, IMAGENET_STD)
    with seeded_globals(1):
        a = train(image)
    with seeded_globals(1):
        b = train(image)
    with seeded_globals(2):
        c = train(image)
    assert a.shape == (3, 64, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(evaluation(image), evaluation(image))


def test_seeded_globals_give_the_run_its_own_generators_back():
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    with seeded_globals(123):
        torch.rand(10), np.random.rand(10), random.random()
    got = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_a_samples_augmentation_is_the_same_in_any_worker(tmp_path):
    """Keys (index, seed) as the seeded sampler makes them: the crops, RandAugment ops and erasing a sample gets
    depend on its seed only, not on which worker reads it or on what that worker read before."""
    import cv2

    files = []
    for i in range(6):
        files.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(files[-1]), _photo(seed=i))
    tfm = classification_transform("official", 48, True, IMAGENET_MEAN, IMAGENET_STD, 0.25)
    ds = LabelledImageDataset(files, list(range(6)), tfm, refill=True)
    keys = [(i % 6, 1000 + i) for i in range(12)]
    direct = [ds[k][0] for k in keys]
    loader = WorkerLoader(ds, batch_size=3, num_workers=2, sampler=keys, collate_fn=lambda b: [s[0] for s in b])
    by_workers = [x for batch in loader for x in batch]
    assert all(torch.equal(a, b) for a, b in zip(direct, by_workers)) and len(by_workers) == 12
    assert not torch.equal(direct[0], direct[6])  # the same image under another seed
