"""Robust image decoding and image-folder listing shared by both stages.

Every image becomes uint8 H x W x 3 RGB: grayscale is replicated, 16-bit and float images are rescaled, alpha is
composited over white, CMYK is converted by the decoder. Unreadable files raise `UnreadableImageError` naming the
path, so callers can skip and count them. `normalize_images` turns a batch of them into the floats a model takes.
"""

from __future__ import annotations

import functools
import itertools
import os
import stat
import warnings
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from simmim.errors import DataFolderError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".npy")


class UnreadableImageError(ValueError):
    """A file that cannot be decoded as an image."""


def folder_not_found(root: str | os.PathLike) -> DataFolderError:
    """The error for a `--data.root` that is not a folder."""
    return DataFolderError(f"--data.root {root}: image folder not found (set it to a folder of images)")


def no_images(root: str | os.PathLike) -> DataFolderError:
    """The error for a `--data.root` with no image below it."""
    return DataFolderError(f"--data.root: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")


def list_images(root: str | os.PathLike) -> List[Path]:
    """All image files below `root`, recursively, sorted, as a Python list: the plain listing that the file index
    (`simmim.data.index`, which every command reads through) is measured and tested against. A symbolic link that
    leads nowhere (a missing target, a loop) is skipped with a warning naming it. Raises a clear error for a missing
    or empty folder."""
    root = Path(root)
    if not root.is_dir():
        raise folder_not_found(root)
    candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    files = [p for p in candidates if p.is_file()]
    for link in (p for p in candidates if p.is_symlink() and not p.is_file()):
        warnings.warn(f"skipping {link}: a symbolic link whose target is missing or loops back", stacklevel=2)
    if not files:
        raise no_images(root)
    return files


def require_images(root: str | os.PathLike) -> None:
    """Raises the errors of `list_images` for a missing folder or one without images, walking only until the first
    image (a start-up check on every rank; the full listing is the file index's, `simmim.data.index`)."""
    root = Path(root)
    if not root.is_dir():
        raise folder_not_found(root)
    for _, _, names in os.walk(root):
        if any(os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS for n in names):
            return
    raise no_images(root)


def first_images(root: str | os.PathLike, index: Optional[str | os.PathLike] = None) -> Iterator[Path]:
    """The images under `root` in sorted order (walking only as far as they are taken), or the paths of the file
    list `index` (relative to `root`): where a run's pixel format is read from."""
    if index is not None:  # its first lines, each bounded; a path that leaves the root is passed over
        with open(index, encoding="utf-8", errors="replace") as f:
            for line in itertools.islice(iter(lambda: f.readline(4096), ""), 10000):
                rel = line.rstrip("\r\n").split("\t")[0]
                if rel and not os.path.isabs(rel) and ".." not in Path(rel).parts:
                    yield Path(root) / rel
        return
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        yield from (Path(folder) / n for n in sorted(names) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)


_UINT8_TO_RGB = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB}


def to_uint8_rgb(img: np.ndarray) -> np.ndarray:
    """Decoder output (H, W), (H, W, 1|2|3|4) in BGR(A) order, uint8/uint16/float -> uint8 (H, W, 3) RGB.

    8-bit gray and colour images (nearly every JPEG and PNG) take one OpenCV colour conversion; the rest go through
    float32: rescaling, compositing alpha over white, rounding back to uint8."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.dtype == np.uint8 and img.shape[2] in _UINT8_TO_RGB:
        return cv2.cvtColor(img, _UINT8_TO_RGB[img.shape[2]])
    if img.dtype == np.uint16:
        img = img.astype(np.float32) / 65535.0
    elif img.dtype != np.uint8:
        img = img.astype(np.float32)
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    else:
        img = img.astype(np.float32) / 255.0
    channels = img.shape[2]
    if channels in (2, 4):  # gray+alpha or BGRA: composite over white
        alpha = img[:, :, -1:]
        img = img[:, :, :-1] * alpha + (1.0 - alpha)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    rgb = img[:, :, ::-1]  # BGR -> RGB
    return np.ascontiguousarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8))


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Read any supported image file as uint8 (H, W, 3) RGB. Only a regular file is read (a FIFO or a device named
    by a file list would block or never end)."""
    return decode_bytes(read_image_file(path), path)


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """The bytes of an image file (uint8 array), undecoded. Only a regular file is read."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UnreadableImageError(f"cannot read {path}: not a regular file")
        return np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise UnreadableImageError(f"cannot read {path}: {e}") from e


def decode_bytes(data: np.ndarray, name: str | os.PathLike, fmt: Optional[Any] = None) -> np.ndarray:
    """An encoded image file's bytes (uint8 array) as uint8 (H, W, 3) RGB; `name` says where they came from. With a
    run's `simmim.data.pixels.PixelFormat` `fmt`: as that format's pixels, at their own precision, any reader."""
    if fmt is not None:
        from simmim.data.pixels import decode_pixels

        return decode_pixels(data, name, fmt)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None or img.size == 0:
        raise UnreadableImageError(f"cannot decode {name} as an image (corrupt or not an image file)")
    return to_uint8_rgb(img)


def decode_item(item: Any, fmt: Optional[Any] = None) -> np.ndarray:
    """An image given by its path, or by an item that decodes itself (a shard set's `ShardItem`); `fmt` as in
    `decode_bytes`."""
    decode = getattr(item, "decode", None)
    return decode(fmt) if decode is not None else decode_bytes(read_image_file(item), item, fmt)


def decode_sample(files: Sequence, i: int, fmt: Optional[Any] = None) -> np.ndarray:
    """Image `i` of `files`: a sequence of paths or items (`decode_item`), or a set that decodes its own samples (a
    `ShardSet`); `fmt` as in `decode_bytes`."""
    decode = getattr(files, "decode", None)
    return decode(i, fmt) if decode is not None else decode_item(files[i], fmt)


def read_sample_image(
    files: Sequence, i: int, refill: bool, fmt: Optional[Any] = None, raising: Tuple[type, ...] = ()
) -> Tuple[Optional[np.ndarray], int, Tuple[int, ...]]:
    """Decode image `i` of `files` (`decode_sample`) for a dataset sample; an unreadable file is warned about by
    name (errors of the types `raising` are raised instead).

    Without `refill` (validation, prediction) the sample is then dropped: (None, i, (i,)). With `refill` (training)
    the next readable file in the list takes its place, so a batch never shrinks or empties, even at batch size 1.

    Returns:
        (image or None, index of the decoded file, indices of the unreadable files passed over).

    Raises:
        UnreadableImageError: with `refill`, when no file in the list decodes.
    """
    n = len(files)
    passed: List[int] = []
    for step in range(n if refill else 1):
        j = (i + step) % n
        try:
            return decode_sample(files, j, fmt), j, tuple(passed)
        except UnreadableImageError as e:
            if isinstance(e, raising):
                raise
            warnings.warn(f"skipping unreadable image: {e}", stacklevel=3)
            passed.append(j)
    if not refill:
        return None, i, (i,)
    raise UnreadableImageError(f"none of the {n} images could be decoded; the warnings name them")


FULL_RANGE = {torch.uint8: 255.0, torch.uint16: 65535.0}  # integer pixels: the value of full scale


@functools.lru_cache(maxsize=16)
def _channel_constants(mean: Tuple[float, ...], std: Tuple[float, ...], device: torch.device, full: float = 255.0):
    """full x mean and full x std as (1, C, 1, 1) float32 tensors on `device`, made once per device: building them
    per batch would be a host-to-device copy, which makes the host wait for the GPU's queued work."""
    mean_full = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * full
    std_full = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * full
    return mean_full.to(device), std_full.to(device)


def normalize_images(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 or uint16 images (B, C, H, W), on any device -> `(x / full - mean) / std` per channel in float32 on that
    device (full: 255 or 65535), then cast to `dtype` (the weights' dtype under a "-true" precision)."""
    if x.dtype not in FULL_RANGE:
        raise TypeError(f"normalize_images takes uint8 or uint16 images, got {x.dtype}")
    if x.shape[1] != len(mean):
        raise ValueError(f"images with {x.shape[1]} channel(s), a normalisation of {len(mean)}")
    mean_full, std_full = _channel_constants(tuple(mean), tuple(std), x.device, FULL_RANGE[x.dtype])
    out = x.to(torch.float32).sub_(mean_full).div_(std_full)  # in place: far cheaper on CPU than new tensors
    return out if dtype == torch.float32 else out.to(dtype)
