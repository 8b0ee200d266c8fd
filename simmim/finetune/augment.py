"""Fine-tuning augmentation: the official SwinV2 fine-tuning pipeline (timm's `create_transform` with the official
settings, as the official code builds it) and a light one for the built-in 64 px digits."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

from simmim.data.crops import Normalise, ResizedCrop, resize
from simmim.data.pixels import RGB8, PixelFormat

RECIPES = ("official", "digits")

# The official recipe (SwinV2 fine-tuning configs): RandAugment, random erasing of 25% in pixel mode (per-pixel
# normal noise), bicubic; timm leaves ColorJitter 0.4 off while RandAugment is on.
OFFICIAL_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
OFFICIAL_INTERPOLATION = "bicubic"


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, also for 0 bits: keeping no bit makes the image black, as Pillow did before version 13
    (which refuses 0). RandAugment's increasing posterize asks for 0 bits whenever the drawn magnitude reaches 10."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _pillow_safe(transform: T.Compose) -> T.Compose:
    for t in transform.transforms:
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
    return transform


def official_transform(
    img_size: int, train: bool, mean: Sequence[float], std: Sequence[float], erase_prob: float = 0.25
) -> T.Compose:
    """PIL image -> normalised float (3, img_size, img_size). Train: RandomResizedCrop (scale 0.08-1, bicubic),
    flip, RandAugment rand-m9-mstd0.5-inc1, random erasing `erase_prob` in pixel mode. Eval: bicubic resize of the
    short side to img_size x 256/224, then a center crop. timm's global generators draw (see `seeded_globals`)."""
    if train:
        return _pillow_safe(
            create_transform(
                input_size=img_size,
                is_training=True,
                color_jitter=0.4,
                auto_augment=OFFICIAL_AUTO_AUGMENT,
                interpolation=OFFICIAL_INTERPOLATION,
                re_prob=erase_prob,
                re_mode="pixel",
                re_count=1,
                mean=tuple(mean),
                std=tuple(std),
            )  # fmt: skip
        )
    return T.Compose(
        [
            T.Resize(int(256 / 224 * img_size), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def digits_transform(img_size: int, train: bool, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """For the built-in digits (8x8 scans upscaled): a digit is neither mirrored nor cut off, so training draws only
    a small shift, rotation and scale of the whole image; evaluation resizes to img_size."""
    ops = [T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        ops.append(T.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1), fill=255))
    return T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])


def classification_transform(
    recipe: str,
    img_size: int,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    erase_prob: float = 0.25,
    fmt: Optional[PixelFormat] = None,
) -> Callable[[np.ndarray], torch.Tensor]:
    """uint8 RGB (H, W, 3) -> normalised float (3, img_size, img_size) by `recipe` ("official" or "digits"). Pixels
    of any other format `fmt` -> (C, img_size, img_size) by `GeometricTransform`, whatever the recipe."""
    if fmt is not None and fmt != RGB8:
        return GeometricTransform(img_size, train, mean, std, fmt.full_range, erase_prob)
    if recipe == "official":
        tfm = official_transform(img_size, train, mean, std, erase_prob)
    else:
        tfm = digits_transform(img_size, train, mean, std)
    return FromArray(tfm)


class FromArray:
    """Applies a PIL-image transform to a uint8 RGB array (picklable, for spawned and forkserver workers)."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.transform(Image.fromarray(image))


class GeometricTransform:
    """The official recipe's geometry without its colour operations, for pixels that are not 8-bit RGB (RandAugment
    and colour jitter are defined on 8-bit RGB): (H, W, C) uint8, uint16 or float32 -> normalised float (C, S, S).

    Training: RandomResizedCrop (area 0.08-1, ratio 3/4-4/3, torchvision's sampling), horizontal flip, bicubic
    resize, then random erasing with probability `erase_prob` in pixel mode (timm's, any channel count). Evaluation:
    the short side resized to S x 256/224 (bicubic), the centre crop. Integer pixels are taken as fractions of
    `full_range`, then `(x - mean) / std` per channel. It draws from the global generators, which the dataset seeds
    per sample (`simmim.seeding.seeded_globals`).
    """

    def __init__(
        self,
        img_size: int,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        full_range: float,
        erase_prob: float = 0.25,
    ) -> None:
        self.img_size, self.train = img_size, train
        self.normalise = Normalise(mean, std, full_range)
        self.crop = ResizedCrop(img_size, train, scale=(0.08, 1.0), interpolation=cv2.INTER_CUBIC)
        self.erase = RandomErasing(erase_prob, mode="pixel", device="cpu") if train and erase_prob > 0 else None

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self.train:
            rng = np.random.default_rng(np.random.randint(2**31))  # from the seeded global generator
            out = self.crop.geometry(image, rng)
        else:
            h, w = image.shape[:2]
            short = int(256 / 224 * self.img_size)
            scale = short / min(h, w)
            out = resize(image, (max(short, round(w * scale)), max(short, round(h * scale))), cv2.INTER_CUBIC)
            top, left = (out.shape[0] - self.img_size) // 2, (out.shape[1] - self.img_size) // 2
            out = out[top : top + self.img_size, left : left + self.img_size]
        x = self.normalise(out)
        return self.erase(x) if self.erase is not None else x
