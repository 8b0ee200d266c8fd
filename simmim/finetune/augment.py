"""Fine-tuning augmentation: the training pipeline of the official SwinV2 fine-tuning recipe, and evaluation."""

from __future__ import annotations

from typing import Sequence

import albumentations as A


def rand_augment(magnitude: int = 9, num_ops: int = 2) -> A.BaseCompose:
    """RandAugment-style policy ("rand-m9-mstd0.5" in timm): `num_ops` ops drawn per image from the RandAugment
    op set, at magnitude `magnitude` of 10 (geometric ops scaled as in timm's `_LEVEL_DENOM = 10`)."""
    m = magnitude / 10.0
    ops = [
        A.Affine(rotate=(-30 * m, 30 * m), p=1.0),
        A.Affine(shear={"x": (-0.3 * m * 57.3, 0.3 * m * 57.3)}, p=1.0),
        A.Affine(shear={"y": (-0.3 * m * 57.3, 0.3 * m * 57.3)}, p=1.0),
        A.Affine(translate_percent={"x": (-0.45 * m, 0.45 * m)}, p=1.0),
        A.Affine(translate_percent={"y": (-0.45 * m, 0.45 * m)}, p=1.0),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
        A.Posterize(num_bits=(max(1, int(8 - 4 * m)), 8), p=1.0),
        A.Solarize(threshold_range=(1.0 - m, 1.0), p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.9 * m, contrast_limit=0.0, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.9 * m, p=1.0),
        A.ColorJitter(brightness=0, contrast=0, saturation=0.9 * m, hue=0, p=1.0),
        A.Sharpen(alpha=(0.1, 0.9 * m), p=1.0),
    ]
    return A.SomeOf(ops, n=num_ops, replace=False, p=1.0)


def classification_transform(
    img_size: int, train: bool, mean: Sequence[float], std: Sequence[float], erase_prob: float = 0.25
) -> A.Compose:
    """Train: RandomResizedCrop, flip, RandAugment m9, color jitter 0.4, random erasing 0.25 (official fine-tuning
    recipe). Eval: resize the short side to size x 256/224, then center crop."""
    if train:
        ops = [
            A.RandomResizedCrop(size=(img_size, img_size), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
            A.HorizontalFlip(p=0.5),
            rand_augment(9, 2),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0, p=1.0),
            A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
            A.Erasing(p=erase_prob, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), fill="random"),
        ]
    else:
        resize = int(round(img_size * 256 / 224))
        ops = [
            A.SmallestMaxSize(max_size=resize),
            A.CenterCrop(img_size, img_size),
            A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
        ]
    return A.Compose(ops)
