"""A data module's pixels: the format of its images (`simmim.data.pixels.PixelFormat`), given or read from its
first decodable images, and the normalisation they are trained with, given or worked out from its training images
(`--model.mean auto`) on rank 0, cached beside the file index and sent to every rank. Both stages' data modules
take it as a mixin (`PixelSource`)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from simmim.data.images import UnreadableImageError, first_images, read_image_file
from simmim.data.loaders import IMAGENET_MEAN, IMAGENET_STD
from simmim.data.pixels import (
    DEPTHS,
    MAX_CHANNELS,
    RGB8,
    PixelFormat,
    channel_statistics,
    infer_format,
    read_array,
    statistics_sample,
)
from simmim.errors import DataFolderError, require
from swinv2.checkpoint import check_inputs
from swinv2.reading import MalformedRecordError

FORMAT_CANDIDATES = 100  # images tried, in order, for the pixel format
FORMAT_AGREEMENT = 16  # decodable images among them whose formats must agree
Normalisation = Optional[Union[List[float], str]]


class PixelSource:
    """The pixels of a data module with `root` (None: the built-in digits, 8-bit RGB), `index`, `index_cache` and
    `sharded`: `pixels` (the format), `channels` (what the model's `in_chans` is linked to), and after
    `resolve_normalisation`, `mean` and `std` (None for 8-bit RGB given none: the model's own, ImageNet's by
    default)."""

    root: Optional[str]
    index: Optional[str]
    index_cache: Optional[str]
    sharded: bool

    def init_pixels(
        self, channels: Optional[int], depth: Optional[str], mean: Normalisation, std: Normalisation, stats: int
    ) -> None:
        require(depth is None or depth in DEPTHS, "--data.depth", depth, f"must be one of {', '.join(DEPTHS)}")
        require(channels is None or 1 <= channels <= MAX_CHANNELS, "--data.channels", channels, "is out of range")
        require(stats > 0, "--data.stats_images", stats, "must be positive")
        self.pixels = self._pixel_format(channels, depth)
        self.channels = self.pixels.channels
        self.norm_args, self.stats_images = (mean, std), stats
        self.mean: Optional[Tuple[float, ...]] = None
        self.std: Optional[Tuple[float, ...]] = None

    def _pixel_format(self, channels: Optional[int], depth: Optional[str]) -> PixelFormat:
        """The given channels and depth, each taken from the first `FORMAT_AGREEMENT` decodable images where not
        given (`agreed_format`)."""
        if channels is not None and depth is not None:
            return PixelFormat(channels, depth)
        if self.root is None:
            return RGB8  # the built-in digits
        found: List[Tuple[PixelFormat, str, bool]] = []
        for data, name in itertools.islice(self._first_images(), FORMAT_CANDIDATES):
            try:
                img, bgr = read_array(data, name)
            except UnreadableImageError:
                continue  # warned about where training reads it
            fmt = infer_format(img, bgr)
            found.append((fmt, name, fmt == RGB8 and img.shape[2] <= 2))  # 8-bit gray (with or without alpha)
            if len(found) == FORMAT_AGREEMENT:
                break
        if not found:
            raise DataFolderError(
                f"--data.root {self.root}: none of its first {FORMAT_CANDIDATES} images decodes, so their channels "
                "and bit depth are unknown: fix them, or set --data.channels and --data.depth"
            )
        return agreed_format(self.root, found, channels, depth)

    def shard_split(self) -> Any:
        """The shard set at `root` (`simmim.data.shards.open_shard_split`), opened once per data module: the format's
        first images, the class names and `setup`'s split all read the set this rank opened."""
        if getattr(self, "_shard_split", None) is None:
            from simmim.data.shards import open_shard_split

            self._shard_split = open_shard_split(self.root)
        return self._shard_split

    def _first_images(self) -> Iterator[Tuple[np.ndarray, str]]:
        """(the encoded bytes, the name) of the first images, in order."""
        if self.sharded:
            train = self.shard_split().train
            shards = train.chunk_view(train.chunks)  # a view with a reader of its own, dropped after
            for i in range(len(shards)):
                key, _, data, chunk = shards.read(i)
                yield np.frombuffer(data, dtype=np.uint8), shards.name(key, chunk)
            return
        for path in first_images(self.root, self.index):
            try:
                yield read_image_file(path), str(path)
            except UnreadableImageError:
                continue

    def resolve_normalisation(self, trainer: Any, train_files: Sequence) -> None:
        """`mean` and `std` per channel: as given, or the training images' own ("auto", and the default for any
        format but 8-bit RGB, where ImageNet's are), worked out on rank 0 (or read back from the cache) and sent to
        every rank. The ranks must have read the same pixel format."""
        distributed = trainer is not None and trainer.world_size > 1
        if distributed:
            same = trainer.strategy.broadcast(self.pixels, src=0) == self.pixels
            if not trainer.strategy.reduce_boolean_decision(same, all=True):
                raise DataFolderError(
                    f"--data.root {self.root}: the ranks read different pixel formats from their first images (this "
                    f"rank: {self.pixels.describe()}): set --data.channels and --data.depth"
                )
        if self.pixels == RGB8 and self.norm_args == (None, None):
            self.mean = self.std = None
            return
        default = (IMAGENET_MEAN, IMAGENET_STD) if self.pixels == RGB8 else ("auto", "auto")
        given = [default[k] if v is None else v for k, v in enumerate(self.norm_args)]
        if "auto" in given:
            stats: Any = None
            if trainer is None or trainer.is_global_zero:
                try:
                    stats = self._statistics(train_files)
                except (ValueError, UnreadableImageError) as e:  # every rank stops with rank 0's reason
                    stats = str(e)
            stats = trainer.strategy.broadcast(stats, src=0) if distributed else stats
            if isinstance(stats, str):
                raise DataFolderError(f"--model.mean/--model.std auto: {stats}")
            given = [stats[k] if v == "auto" else v for k, v in enumerate(given)]
        for name, values in zip(("mean", "std"), given):
            require(
                not isinstance(values, str) and len(values) == self.pixels.channels,
                f"--model.{name}",
                values,
                f"must hold one value per channel ({self.pixels.channels}), or be auto",
            )
        self.mean, self.std = tuple(float(v) for v in given[0]), tuple(float(v) for v in given[1])

    def _sample_identity(self, files: Sequence) -> str:
        """What identifies the images the statistics read: a shard set's digest of its index (its content), or the
        path, size and modification time of every drawn file (a file rewritten in place, or another root with the
        same names, gives other statistics)."""
        digest = getattr(files, "digest", None)
        if digest is not None:
            return f"{getattr(files, 'root', '')}:{digest}"
        h = hashlib.sha256()
        for i in statistics_sample(len(files), self.stats_images):
            path = files[int(i)]
            try:
                st = os.stat(path)
                h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{path}\0missing\n".encode())
        return h.hexdigest()

    def _statistics(self, files: Sequence) -> Tuple[List[float], List[float]]:
        """`channel_statistics` of `files`, cached under the index cache by what identifies them."""
        from simmim.data.index import default_cache, read_json, write_json

        key = json.dumps([repr(files.fingerprint()), len(files), self._sample_identity(files), self.pixels.describe(),
                          self.stats_images])  # fmt: skip
        name = f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
        path = Path(self.index_cache or default_cache()) / "stats" / name
        record = read_json(path, 1 << 20)
        if isinstance(record, dict) and record.get("key") == key:
            try:  # the record a checkpoint would carry: one finite value per channel each, std positive
                values = {"depth": self.pixels.depth, "mean": record.get("mean"), "std": record.get("std")}
                checked = check_inputs(values, self.pixels.channels, path)
                return checked["mean"], checked["std"]
            except MalformedRecordError:
                pass  # unusable: worked out again
        mean, std = channel_statistics(files, self.pixels, self.stats_images)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"key": key, "mean": mean, "std": std})
        print(f"data statistics ({min(self.stats_images, len(files))} training images): mean {_shown(mean)}, std "
              f"{_shown(std)}; every value in {path}")  # fmt: skip
        return mean, std


def _shown(values: Sequence[float], most: int = 16) -> str:
    """Per-channel values to 4 significant digits; of more than `most` channels, the first and the count."""
    text = [f"{v:.4g}" for v in values]
    return f"[{', '.join(text if len(text) <= most else text[: most // 2] + [f'... ({len(text)} channels)'])}]"


def agreed_format(
    root: Any, found: Sequence[Tuple[PixelFormat, str, bool]], channels: Optional[int], depth: Optional[str]
) -> PixelFormat:
    """The one format that carries the images `found` ((format, file name, whether it is an 8-bit gray file) each),
    `channels` and `depth` where given. Where not given, the images must agree on it: on their channel count, and on
    their depth, except that 8-bit and 16-bit images together make a 16-bit run (8-bit pixels enter it exactly,
    x 257), and that 8-bit gray files, which make an RGB run among 8-bit images, join one-channel images of another
    depth as one channel. Disagreeing images are named, two of them."""
    if any(fmt.depth != "uint8" for fmt, _, _ in found):
        found = [(PixelFormat(1, "uint8") if gray else fmt, name, gray) for fmt, name, gray in found]

    def first_of(key: str) -> dict:  # value -> the first file that has it, in the order found
        seen: dict = {}
        for fmt, name, _ in found:
            seen.setdefault(getattr(fmt, key), name)
        return seen

    def disagree(what: str, seen: dict, option: str) -> DataFolderError:
        (a, name_a), (b, name_b) = list(seen.items())[:2]
        return DataFolderError(
            f"--data.root {root}: its images disagree on their {what}: {name_a} has {a}, {name_b} has {b}; keep "
            f"images of one kind in one run, or set {option} and give --model.mean and --model.std values (a file "
            "the run cannot carry without loss is then passed over by name and counted as unreadable)"
        )

    if channels is None:
        by_channels = first_of("channels")
        if len(by_channels) > 1:
            raise disagree("channel counts", by_channels, "--data.channels")
        channels = found[0][0].channels
    if depth is None:
        by_depth = first_of("depth")
        if len(by_depth) > 1 and set(by_depth) != {"uint8", "uint16"}:
            raise disagree("pixel types", by_depth, "--data.depth")
        depth = "uint16" if set(by_depth) == {"uint8", "uint16"} else found[0][0].depth
    return PixelFormat(channels, depth)
