"""What a pixel is in a run, and any image file read into it.

A run's `PixelFormat` is its channel count and the type its pixels are carried in: `uint8`, `uint16` or `float32`.
Images are read at their own precision and never squeezed: an 8-bit file enters a 16-bit run exactly (x 257, the
same fraction of the range) and a float run as a fraction of its range, but a 16-bit or float file in an 8-bit run,
or a file with another number of channels, is refused by name with the option that fixes it (`PixelFormatError`,
an unreadable image: warned about, passed over and counted as any other).

Readers, chosen by the file's first bytes (so a shard's sample reads as its file did):
- TIFF and GeoTIFF (multi-band, tiled, compressed; `tifffile`): the first image series, its bands as channels;
- `.npy` arrays, (H, W) or (H, W, C), read without pickles;
- everything else through OpenCV (JPEG, PNG with 8 or 16 bits, WebP, BMP), whose colour images are BGR(A).

8-bit RGB (`RGB8`, what nearly every JPEG and PNG is) takes the path it always took: `to_uint8_rgb` after OpenCV
(grayscale repeated, alpha composited over white).
"""

from __future__ import annotations

import functools
import importlib.util
import io
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from simmim.data.images import UnreadableImageError, to_uint8_rgb

DEPTHS = {"uint8": 255.0, "uint16": 65535.0, "float32": 1.0}  # the carried type and the value of its full range
MAX_CHANNELS = 256
MAX_DECODED_BYTES = 1 << 31  # one decoded image (a compressed file may claim any size)
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
NPY_MAGIC = b"\x93NUMPY"


class PixelFormatError(UnreadableImageError):
    """An image whose channels or bit depth the run's `PixelFormat` cannot carry without loss."""


@dataclass(frozen=True)
class PixelFormat:
    """A run's pixels: `channels` per pixel, carried as `depth` ("uint8", "uint16" or "float32")."""

    channels: int = 3
    depth: str = "uint8"

    def __post_init__(self) -> None:
        if not (isinstance(self.channels, int) and 1 <= self.channels <= MAX_CHANNELS):
            raise ValueError(f"channels must be an integer in [1, {MAX_CHANNELS}], got {self.channels!r}")
        if self.depth not in DEPTHS:
            raise ValueError(f"depth must be one of {', '.join(DEPTHS)}, got {self.depth!r}")

    @property
    def full_range(self) -> float:
        """The value of a full-scale pixel: what normalisation divides by before taking the mean and std."""
        return DEPTHS[self.depth]

    def describe(self) -> str:
        return f"{self.channels} channel(s), {self.depth}"


RGB8 = PixelFormat(3, "uint8")


def read_array(data: np.ndarray, name: object) -> Tuple[np.ndarray, bool]:
    """An encoded file's bytes (uint8 array) -> (its pixels as (H, W, C), whether they are in OpenCV's BGR order)."""
    head = data[:8].tobytes()
    try:
        img = _read_npy(data) if head.startswith(NPY_MAGIC) else _read_tiff(data) if head[:4] in TIFF_MAGIC else None
        bgr = img is None
        if img is None:  # OpenCV's formats, and TIFFs of up to 4 samples per pixel, as they always read
            img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
            if img is None or img.size == 0:
                raise ValueError("corrupt or not an image file")
            bgr = True
    except UnreadableImageError:
        raise
    except Exception as e:  # the readers' own errors: a damaged or crafted file
        raise UnreadableImageError(f"cannot decode {name} as an image ({type(e).__name__}: {e})") from None
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or min(img.shape[:2]) < 1 or not 1 <= img.shape[2] <= MAX_CHANNELS:
        raise UnreadableImageError(f"cannot decode {name}: its pixels have the shape {img.shape}, not (H, W, C)")
    if img.shape[1] == img.shape[2] != img.shape[0]:  # (C, H, W) of a square tile, as rasterio reads bands
        raise UnreadableImageError(
            f"cannot decode {name}: its pixels {img.shape} look band-first, (C, H, W); an image is (H, W, C), bands "
            "last: save it as np.moveaxis(a, 0, -1)"
        )
    if img.dtype.kind not in "ui" + "f" or img.dtype in (np.int32, np.uint32, np.int64, np.uint64):
        raise UnreadableImageError(
            f"cannot decode {name}: its pixels are {img.dtype}; images are carried as uint8, uint16 or float32 "
            "(int8, int16, float16 and float64 convert to float32): save it as one of those"
        )
    if img.dtype.kind == "f" and not (np.isfinite(img.min()) and np.isfinite(img.max())):  # NaN propagates; no copy
        raise UnreadableImageError(f"cannot decode {name}: it holds NaN or infinite pixels")
    return img, bgr


def _bounded(shape: Tuple[int, ...], itemsize: int) -> None:
    if int(np.prod(shape, dtype=np.float64)) * itemsize > MAX_DECODED_BYTES:
        raise ValueError(f"its pixels {tuple(shape)} would take more than {MAX_DECODED_BYTES} bytes")


def _read_npy(data: np.ndarray) -> np.ndarray:
    stream = io.BytesIO(data.tobytes())
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(stream)  # the header alone, before any allocation
    if dtype.hasobject or dtype.kind not in "uif" or len(shape) not in (2, 3):
        raise ValueError(f"a .npy image is an (H, W) or (H, W, C) array of numbers, not {dtype} {shape}")
    _bounded(shape, dtype.itemsize)
    stream.seek(0)
    return np.load(stream, allow_pickle=False)


def _read_tiff(data: np.ndarray) -> Optional[np.ndarray]:
    """A multi-band TIFF's first image (photometric MINISBLACK with several samples: bands, such as RGB + NIR or 13
    Sentinel-2 bands) through tifffile; None for any other TIFF (gray, RGB, RGBA, palette, CMYK, ...), which OpenCV
    reads as it always did."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data.tobytes())) as tif:
        page = tif.pages[0]
        bands = page.photometric == tifffile.PHOTOMETRIC.MINISBLACK and page.samplesperpixel > 1
        if not bands and page.samplesperpixel <= 4:
            return None
        if not bands:
            raise ValueError(f"{page.samplesperpixel} samples of photometric {page.photometric.name}: not bands")
        if page.compression not in SAFE_TIFF_CODECS and not _imagecodecs():
            raise ValueError(
                f"its compression {page.compression.name} needs the imagecodecs package (pip install imagecodecs)"
            )
        _bounded(page.shape, np.dtype(page.dtype).itemsize)
        _bound_tiff_decompression()
        img = page.asarray(maxworkers=1)  # one thread: a data-loader worker is one of many
        axes = page.axes
    if sorted(axes) != ["S", "X", "Y"]:
        raise ValueError(f"its first image has the axes {axes}; a band image is (Y, X) and samples")
    return np.moveaxis(img, [axes.index("Y"), axes.index("X"), axes.index("S")], [0, 1, 2])


SAFE_TIFF_CODECS = (1, 8, 32946, 50013, 34925)  # none, deflate (three codes), lzma: decoded with a size bound here


@functools.lru_cache(maxsize=1)
def _imagecodecs() -> bool:
    """Whether imagecodecs is installed: tifffile then decodes every codec with it, into buffers of the image's size."""
    return importlib.util.find_spec("imagecodecs") is not None


@functools.lru_cache(maxsize=1)
def _bound_tiff_decompression() -> None:
    """tifffile without imagecodecs inflates deflate and lzma segments with no bound on the output (a small file
    could inflate to gigabytes): its decoders for them are replaced by ones that stop at the segment's size."""
    import lzma
    import zlib

    import tifffile

    if _imagecodecs():
        return

    def bounded(make: Callable[[], Any]) -> Callable[..., bytes]:
        def decompress(data: bytes, out: Any = None) -> bytes:
            limit = out if isinstance(out, int) else MAX_DECODED_BYTES
            inflater = make()
            result = inflater.decompress(data, limit + 1)
            if len(result) > limit:
                raise ValueError(f"a compressed segment inflates past its {limit} bytes")
            return result

        return decompress

    codecs = tifffile.TIFF.DECOMPRESSORS
    for code in (8, 32946, 50013):
        codecs._codecs[code] = bounded(zlib.decompressobj)
    codecs._codecs[34925] = bounded(lzma.LZMADecompressor)


def infer_format(img: np.ndarray, bgr: bool) -> PixelFormat:
    """The format that carries `img` (as `read_array` gives it) without loss. An OpenCV image's second or fourth
    channel is alpha (composited, not carried). 8-bit gray or colour is `RGB8`, as every 8-bit JPEG and PNG always
    read; 16-bit and float images keep their channel count (a 16-bit grayscale PNG is one channel)."""
    channels = img.shape[2] - (bgr and img.shape[2] in (2, 4) and img.dtype.kind == "u")
    if img.dtype == np.uint8:
        return RGB8 if channels in (1, 3) else PixelFormat(channels, "uint8")
    return PixelFormat(channels, "uint16" if img.dtype == np.uint16 else "float32")


def to_format(img: np.ndarray, bgr: bool, fmt: PixelFormat, name: object) -> np.ndarray:
    """`read_array`'s pixels as `fmt`'s: (H, W, fmt.channels), contiguous, of `fmt.depth`; refused when that would
    lose what the file holds."""
    if fmt == RGB8 and img.dtype == np.uint8 and bgr:
        return to_uint8_rgb(img)  # the 8-bit RGB path, as it always was
    channels = img.shape[2]
    if img.dtype not in (np.uint8, np.uint16):  # float16/32/64, int8, int16: their values, as float32
        if fmt.depth != "float32":
            raise PixelFormatError(f"{name} holds {img.dtype} pixels, this run {fmt.depth}: set --data.depth float32")
        img = img.astype(np.float32)
    elif img.dtype == np.uint16 and fmt.depth == "uint8":
        raise PixelFormatError(f"{name} holds 16-bit pixels, this run 8-bit ones: set --data.depth uint16")
    if bgr and channels in (3, 4):
        img = img[:, :, [2, 1, 0, 3][:channels]]  # OpenCV's BGR(A) -> RGB(A)
    if bgr and channels in (2, 4) and img.dtype != np.float32:
        img = _composite_alpha(img)  # gray+alpha or RGBA: over white, as 8-bit RGB always was
    if fmt.channels == 3 and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)  # gray in a colour run
    if img.shape[2] != fmt.channels:
        raise PixelFormatError(
            f"{name} has {img.shape[2]} channel(s), this run {fmt.channels}: set --data.channels, or keep images of "
            "one kind in one run"
        )
    return np.ascontiguousarray(_to_depth(img, fmt.depth))


def _composite_alpha(img: np.ndarray) -> np.ndarray:
    full = float(np.iinfo(img.dtype).max)
    colour, alpha = img[:, :, :-1].astype(np.float32), img[:, :, -1:].astype(np.float32) / full
    return np.clip(colour * alpha + full * (1.0 - alpha) + 0.5, 0, full).astype(img.dtype)


def _to_depth(img: np.ndarray, depth: str) -> np.ndarray:
    if img.dtype == np.dtype(depth):
        return img
    if depth == "uint16":  # from uint8: the same fraction of the range, exactly
        return img.astype(np.uint16) * np.uint16(257)
    return img.astype(np.float32) / np.float32(np.iinfo(img.dtype).max)  # an integer file in a float run


def decode_pixels(data: np.ndarray, name: object, fmt: PixelFormat) -> np.ndarray:
    """An encoded image file's bytes (uint8 array) as `fmt`'s (H, W, C) pixels."""
    img, bgr = read_array(data, name)
    return to_format(img, bgr, fmt, name)


def statistics_sample(n: int, count: int) -> np.ndarray:
    """The positions of the images `channel_statistics` reads: `count` of `n` drawn with seed 0, sorted."""
    return np.sort(np.random.default_rng(0).choice(n, size=min(count, n), replace=False))


def channel_statistics(files: Sequence, fmt: PixelFormat, count: int = 1000) -> Tuple[List[float], List[float]]:
    """Per-channel mean and std over every pixel of up to `count` images of `files` (a fixed draw, seed 0), as
    fractions of the full range for integer pixels and in their own units for float ones: what `--model.mean auto`
    normalises with. An unreadable image is passed over, with the warning every reader gives; an image of another
    format (`PixelFormatError`) stops it: the files disagree, and the run would pass over every such image."""
    from simmim.data.images import read_sample_image

    picks = statistics_sample(len(files), count)
    total, squares, pixels = np.zeros(fmt.channels), np.zeros(fmt.channels), 0
    for i in picks:
        try:
            img, _, _ = read_sample_image(files, int(i), refill=False, fmt=fmt, raising=(PixelFormatError,))
        except PixelFormatError as e:
            raise PixelFormatError(
                f"an image drawn for the statistics does not fit the run's pixels ({e}); to train past such files "
                "(passed over by name and counted as unreadable), give --model.mean and --model.std values"
            ) from None
        if img is not None:
            x = img.reshape(-1, fmt.channels).astype(np.float64) / fmt.full_range
            total, squares, pixels = total + x.sum(0), squares + np.square(x).sum(0), pixels + len(x)
    if not pixels:
        raise UnreadableImageError(f"none of the {len(picks)} images drawn for the statistics could be read")
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - np.square(mean), 0.0))
    if (std < 1e-6).any():
        constant = [int(c) for c in np.flatnonzero(std < 1e-6)]
        raise ValueError(
            f"channel(s) {constant} hold one value over the {len(picks)} images drawn: no std to normalise by (give "
            "--model.std values)"
        )
    return [float(m) for m in mean], [float(s) for s in std]
