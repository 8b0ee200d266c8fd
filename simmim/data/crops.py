"""A random resized crop and flip written directly on OpenCV, for images of any channel count and pixel type
(`simmim.data.pixels`): the geometry of both stages' augmentations, drawn from a per-sample generator."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

Box = Tuple[int, int, int, int]  # top, left, height, width


OPENCV_CHANNELS = 128  # the most channels OpenCV's Python functions take in one image (CV_CN_MAX)


def by_channels(fn: Callable[[np.ndarray], np.ndarray], img: np.ndarray, most: int = OPENCV_CHANNELS) -> np.ndarray:
    """`fn` (an OpenCV function of one image) of an (H, W, C) image of any channel count (or an (H, W) gray one): at
    most `most` channels at a time when there are more. Returns (h, w, C), the channel axis kept."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] > most:
        parts = [np.ascontiguousarray(img[:, :, c : c + most]) for c in range(0, img.shape[2], most)]
        return np.concatenate([by_channels(fn, part, most) for part in parts], axis=2)
    out = fn(img)
    return out[:, :, None] if out.ndim == 2 else out


def resize(img: np.ndarray, size: Tuple[int, int], interpolation: int) -> np.ndarray:
    """OpenCV's resize of an (H, W, C) image to `size` (width, height), any channel count (its area interpolation
    takes at most 4 channels at a time). Returns (h, w, C), the channel axis kept."""
    most = 4 if interpolation == cv2.INTER_AREA else OPENCV_CHANNELS
    return by_channels(lambda part: cv2.resize(part, size, interpolation=interpolation), img, most)


def planes(img: np.ndarray) -> np.ndarray:
    """An (H, W, C) image as a contiguous (C, H, W) array, the layout a batch is stacked in: OpenCV's split into the
    planes of one array, the same values as NumPy's transposing copy in about a quarter of its time."""
    out = np.empty((img.shape[2], *img.shape[:2]), img.dtype)
    dst = list(out)
    if img.shape[2] > OPENCV_CHANNELS or any(a is not b for a, b in zip(cv2.split(img, dst), dst)):
        out[...] = img.transpose(2, 0, 1)  # NumPy's copy: more channels than OpenCV takes, or it wrote elsewhere
    return out


class Normalise:
    """(H, W, C) pixels -> float32 (C, H, W) tensor, `(x / full_range - mean) / std` per channel (`full_range`:
    255 for 8-bit, 65535 for 16-bit, 1 for float pixels): the normalisation of every transform that hands floats
    on (integer training batches are normalised on the device, `simmim.data.images.normalize_images`)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], full_range: float = 1.0) -> None:
        self.full_range = np.float32(full_range)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        # in (C, H, W) order from the start: per-channel constants over whole planes, several times faster than over
        # the last axis of (H, W, C), the same values
        x = planes(pixels).astype(np.float32, copy=False)  # float pixels: no second copy, and no division by 1
        return torch.from_numpy(((x / self.full_range if self.full_range != 1 else x) - self.mean) / self.std)


class ResizedCrop:
    """RandomResizedCrop (by default area 0.67-1 of the image, aspect ratio 3/4-4/3: the official SimMIM-SwinV2
    pretraining's; torchvision's sampling with its centre-crop fallback), horizontal flip with probability 0.5, up to
    normalisation (`simmim.data.images.normalize_images`). Evaluation: the whole image resized. Resizing is OpenCV's
    bilinear (`INTER_LINEAR`) unless told.

    Called with an (H, W, C) image of a run's `simmim.data.pixels.PixelFormat` (uint8 RGB for most runs; any channel
    count, uint16 or float32) and the sample's generator; returns a contiguous (C, S, S) tensor of the same type, the
    layout a batch is stacked in (a permuted view would make the collate gather it element by element). Integer
    pixels are normalised on the training device; float pixels, already floats, are normalised here with
    `normalize` (mean, std per channel).

    Args:
        img_size: Output side S.
        train: Random crop and flip (else a plain resize).
        scale: Crop area range, as fractions of the image.
        ratio: Crop aspect-ratio range (width / height).
        normalize: (mean, std) per channel, applied to float pixels.
        interpolation: OpenCV's resize interpolation (bilinear, as the official SimMIM pipeline).
    """

    def __init__(
        self,
        img_size: int,
        train: bool,
        scale: Tuple[float, float] = (0.67, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        normalize: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
        interpolation: int = cv2.INTER_LINEAR,
    ) -> None:
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]: {scale}, {ratio}")
        self.img_size, self.train, self.scale, self.ratio = img_size, train, scale, ratio
        self.interpolation = interpolation
        self.normalize = Normalise(*normalize) if normalize is not None else None

    def crop_box(self, height: int, width: int, rng: np.random.Generator) -> Box:
        """torchvision's `RandomResizedCrop.get_params`: up to 10 tries of a random area and log-uniform aspect
        ratio that fit, else the centre crop of the image clamped to the ratio range."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        out = self.geometry(img, rng)
        if out.dtype == np.float32:
            if self.normalize is None:
                raise ValueError("float pixels need the normalisation (mean, std) to be given to the transform")
            return self.normalize(out)
        return torch.from_numpy(planes(out))

    def geometry(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The crop, resize and flip of `img` (H, W, C): (S, S, C) of the same type."""
        height, width = img.shape[:2]
        top, left, h, w = self.crop_box(height, width, rng) if self.train else (0, 0, height, width)
        size = (self.img_size, self.img_size)
        out = resize(img[top : top + h, left : left + w], size, self.interpolation)
        if self.train and rng.random() < 0.5:
            out = by_channels(lambda part: cv2.flip(part, 1), out)
        return out
