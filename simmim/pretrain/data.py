"""Pretraining data: a folder of images -> (uint8 image, mask) batches, masks made in the workers (the module
normalises the images on the training device)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from functools import partial
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from simmim.data.builtin import DEFAULT_DIGITS_ROOT, prepare_digits
from simmim.data.images import (
    UnreadableImageError,
    first_images,
    read_image_file,
    read_sample_image,
    require_images,
)
from simmim.data.index import FileIndex, agreed_index, open_index
from simmim.data.loaders import collate_readable, make_loader, skip_empty_validation
from simmim.data.pixels import (
    DEPTHS,
    MAX_CHANNELS,
    RGB8,
    PixelFormat,
    channel_statistics,
    infer_format,
    read_array,
)
from simmim.data.shards import is_shard_root, open_shard_split
from simmim.errors import DataFolderError, check_loader, require
from simmim.pretrain.augment import PretrainTransform
from simmim.pretrain.masking import MaskGenerator
from simmim.seeding import SampleKey, SeedState, sample_generators, sample_seed


class MaskedImageDataset(Dataset):
    """Images with SimMIM masks: (image (C, H, W), mask, indices of the unreadable files passed over); the image is
    of the run's pixel format `fmt` (uint8 RGB, or any channel count as uint8, uint16 or normalised float32).

    A key is a `simmim.seeding.SeededSampler` key `(index, seed)` (training: the seed draws the crop, the flip and
    the mask) or a plain index (evaluation: a mask of its own per index, the same in every epoch and run).

    An unreadable file is warned about by name; with `refill` the next readable file replaces it, otherwise the
    sample is `(None, (i,))`, dropped by `collate_readable`, and the batch is smaller (`read_sample_image`).

    Args:
        files: Image paths.
        transform: The augmentation (`PretrainTransform`): image and generator -> (C, H, W) tensor.
        mask_generator: Makes one mask per sample.
        refill: Replace unreadable files by the next readable one (training).
        fmt: The run's `PixelFormat`; None: 8-bit RGB, 16-bit and float files rescaled (the evaluation tools').
    """

    def __init__(
        self,
        files: List,
        transform: PretrainTransform,
        mask_generator: MaskGenerator,
        refill: bool = False,
        fmt: Optional[PixelFormat] = None,
    ) -> None:
        self.files = files
        self.transform = transform
        self.mask_generator = mask_generator
        self.refill = refill
        self.fmt = fmt

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: SampleKey) -> Tuple:
        i, seed = sample_seed(key)
        img, _, bad = read_sample_image(self.files, i, self.refill, self.fmt)
        if img is None:
            return None, bad  # dropped by the collate, its file counted
        augment_rng, _, mask_rng = sample_generators(seed)
        return self.transform(img, augment_rng), torch.from_numpy(self.mask_generator(mask_rng)), bad


FORMAT_CANDIDATES = 100  # images tried, in order, for the pixel format


def _statistics_shape(mean: Any, std: Any, channels: int) -> bool:
    """Whether a cached record holds `channels` finite numbers each (std positive)."""
    ok = [isinstance(v, list) and len(v) == channels and all(isinstance(x, float) and math.isfinite(x) for x in v)
          for v in (mean, std)]  # fmt: skip
    return all(ok) and all(x > 0 for x in std)


class PretrainDataModule(SeedState, pl.LightningDataModule):
    """A folder of images (recursive; ImageFolder class folders allowed, labels unused), split into train/val.

    The folder is read through its file index (`simmim.data.index`): listed once, by rank 0 of each node in
    `prepare_data`, into files every rank and worker memory-maps, and reused from the cache while the tree is
    unchanged.

    Args:
        root: Image folder. None: the built-in digits, prepared under `data/digits/prepared` on first use.
        img_size: Square crop size.
        mask_patch_size: SimMIM mask unit in pixels (official: 32).
        model_patch_size: The encoder's patch size (linked from the model).
        mask_ratio: Fraction of mask patches masked (official: 0.6).
        batch_size: Per-device batch size.
        num_workers: DataLoader workers.
        val_fraction: Held-out fraction of the files (a fixed split).
        index: A file list to read instead of walking `root` (one path per line, relative to `root`).
        index_cache: Where indexes are kept (default: `$XDG_CACHE_HOME/simmim/index`, `~/.cache/simmim/index`).
        reindex: Walk the folder (or read the list) again even when the cached index looks current.
        channels: Channels per image; None: those of the first image (8-bit gray or colour: 3, RGB).
        depth: The pixels' type, "uint8", "uint16" or "float32"; None: the first image's (`simmim.data.pixels`).
            A file this type cannot hold without loss, or with other channels, is refused by name and passed over.
        mean, std: The normalisation (linked from `--model.mean`, `--model.std`): values per channel, as fractions
            of the full range for integer pixels; "auto": worked out from `stats_images` training images on rank
            0, kept in the index cache; None: ImageNet's for 8-bit RGB, "auto" for any other format.
        stats_images: How many training images "auto" reads.

    `root` may also be a shard set (`python -m simmim.shard`; a folder or an `s3://`-style URL,
    `simmim.data.shards`): read sample by sample in the order of `simmim.seeding.ShardSampler`, with whole chunks
    held out for validation (or its val/ set, when the converter wrote train/ and val/ sets).
    """

    def __init__(
        self,
        root: Optional[str] = None,
        img_size: int = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
        batch_size: int = 128,
        num_workers: int = 4,
        val_fraction: float = 0.05,
        index: Optional[str] = None,
        index_cache: Optional[str] = None,
        reindex: bool = False,
        channels: Optional[int] = None,
        depth: Optional[str] = None,
        mean: Optional[Union[List[float], str]] = None,
        std: Optional[Union[List[float], str]] = None,
        stats_images: int = 1000,
    ) -> None:
        super().__init__()
        check_loader(batch_size, num_workers, val_fraction)
        require(index is None or root is not None, "--data.index", index, "needs --data.root, the folder it lists")
        self.sharded = is_shard_root(root)
        require(index is None or not self.sharded, "--data.index", index, "lists files of a folder, not of shards")
        require(0.0 < mask_ratio < 1.0, "--data.mask_ratio", mask_ratio, "must be in (0, 1) (official: 0.6)")
        require(
            mask_patch_size % model_patch_size == 0,
            "--data.mask_patch_size",
            mask_patch_size,
            f"must be a multiple of the encoder's patch size {model_patch_size} (--model.patch_size)",
        )
        require(
            img_size > 0 and img_size % mask_patch_size == 0,
            "--data.img_size",
            img_size,
            f"must be a positive multiple of --data.mask_patch_size {mask_patch_size} "
            f"(e.g. {max(1, round(img_size / mask_patch_size)) * mask_patch_size})",
        )
        self.root, self.img_size, self.batch_size = root, img_size, batch_size
        self.num_workers, self.val_fraction = num_workers, val_fraction
        self.mask_generator = MaskGenerator(img_size, mask_patch_size, model_patch_size, mask_ratio)
        self.index, self.index_cache, self.reindex = index, index_cache, reindex
        if root is not None and index is None and not self.sharded:  # shards are opened in `setup`
            require_images(root)  # a missing or empty folder fails at start-up, on every rank
        elif index is not None:
            require(os.path.isdir(root), "--data.root", root, "is not a folder: the paths of --data.index are in it")
            require(os.path.isfile(index), "--data.index", index, "is not a file: give a list of paths, one a line")
        require(stats_images > 0, "--data.stats_images", stats_images, "must be positive")
        self.pixels = self._pixel_format(channels, depth)
        self.channels = self.pixels.channels  # the model's input channels (linked)
        self.norm_args, self.stats_images = (mean, std), stats_images
        self.mean: Optional[Tuple[float, ...]] = None  # resolved in `setup`
        self.std: Optional[Tuple[float, ...]] = None

    def _pixel_format(self, channels: Optional[int], depth: Optional[str]) -> PixelFormat:
        """The given channels and depth, each taken from the first image where not given."""
        require(depth is None or depth in DEPTHS, "--data.depth", depth, f"must be one of {', '.join(DEPTHS)}")
        require(channels is None or 1 <= channels <= MAX_CHANNELS, "--data.channels", channels, "is out of range")
        if channels is not None and depth is not None:
            return PixelFormat(channels, depth)
        found = RGB8 if self.root is None else None  # the built-in digits
        for data, name in itertools.islice(self._first_images(), FORMAT_CANDIDATES) if found is None else ():
            try:
                found = infer_format(*read_array(data, name))
                break
            except UnreadableImageError:
                continue  # warned about where training reads it
        if found is None:
            raise DataFolderError(
                f"--data.root {self.root}: none of its first {FORMAT_CANDIDATES} images decodes, so their channels "
                "and bit depth are unknown: fix them, or set --data.channels and --data.depth"
            )
        return PixelFormat(channels or found.channels, depth or found.depth)

    def _first_images(self) -> Iterator[Tuple[np.ndarray, str]]:
        """(the encoded bytes, the name) of the first images, in order, for their format."""
        if self.sharded:
            shards = open_shard_split(self.root).train
            for i in range(len(shards)):
                key, _, data, chunk = shards.read(i)
                yield np.frombuffer(data, dtype=np.uint8), shards.name(key, chunk)
        for path in () if self.sharded else first_images(self.root, self.index):
            try:
                yield read_image_file(path), str(path)
            except UnreadableImageError:
                continue

    @property
    def labels(self) -> Optional[str]:
        """Class folders labelling these images, for the pretraining monitors: the built-in digits label
        themselves; a folder of your own has none here (`--model.knn_root` names them)."""
        return str(DEFAULT_DIGITS_ROOT) if self.root is None else None

    def prepare_data(self) -> None:
        if self.root is None:
            prepare_digits()
        if not self.sharded:
            self.file_index(self.reindex, fresh=True)

    def file_index(self, reindex: bool = False, fresh: bool = False) -> FileIndex:
        """The index of the images: built, or read back from the cache (`fresh`: only while the tree is unchanged;
        without it, the build `prepare_data` left, so that a tree changing during start-up cannot give two ranks
        two indexes)."""
        root = self.root if self.root is not None else DEFAULT_DIGITS_ROOT
        return open_index(root, self.index, self.index_cache, reindex, fresh)

    def setup(self, stage: Optional[str] = None) -> None:
        trainer = getattr(self, "trainer", None)
        if self.sharded:  # one set is split in whole chunks; train/ and val/ sets are used as they are
            train, val = agreed_index(trainer, lambda: open_shard_split(self.root), self.root)
            self.train_files, self.val_files = train.val_split(self.val_fraction) if val is None else (train, val)
            skip_empty_validation(self, "no validation chunks (--data.val_fraction too small for the shards' chunks)")
        else:
            files = agreed_index(trainer, self.file_index, self.root)  # prepare_data built it
            order = np.random.default_rng(0).permutation(len(files))  # fixed split, independent of the run seed
            n_val = int(round(len(files) * self.val_fraction))
            self.val_files = files.subset(np.sort(order[:n_val]))
            self.train_files = files.subset(np.sort(order[n_val:]))
            skip_empty_validation(
                self, "no validation images (--data.val_fraction 0): no val/loss, no reconstruction grid"
            )
        self.mean, self.std = self._normalisation(trainer)

    def _normalisation(self, trainer: Any) -> Tuple[Optional[Tuple[float, ...]], Optional[Tuple[float, ...]]]:
        """(mean, std) per channel: as given, or the training images' own ("auto", and the default for any format
        but 8-bit RGB): worked out on rank 0 (or read back from the cache, beside the index) and sent to every rank.
        8-bit RGB without values: (None, None), the module's own (ImageNet's by default)."""
        if self.pixels == RGB8 and self.norm_args == (None, None):
            return None, None
        given = [("auto" if v is None else v) for v in self.norm_args]
        if "auto" in given:
            stats = self._statistics() if trainer is None or trainer.is_global_zero else None
            if trainer is not None and trainer.world_size > 1:
                stats = trainer.strategy.broadcast(stats, src=0)
            given = [stats[k] if v == "auto" else v for k, v in enumerate(given)]
        for name, values in zip(("mean", "std"), given):
            require(
                not isinstance(values, str) and len(values) == self.pixels.channels,
                f"--model.{name}",
                values,
                f"must hold one value per channel ({self.pixels.channels}), or be auto",
            )
        return tuple(float(v) for v in given[0]), tuple(float(v) for v in given[1])

    def _statistics(self) -> Tuple[List[float], List[float]]:
        """`channel_statistics` of the training images, cached under the index cache by what identifies them."""
        from simmim.data.index import default_cache

        key = json.dumps([repr(self.train_files.fingerprint()), len(self.train_files), self.pixels.describe(),
                          self.stats_images])  # fmt: skip
        path = (
            Path(self.index_cache or default_cache())
            / "stats"
            / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
        )
        try:
            record = json.loads(path.read_text()) if path.is_file() and path.stat().st_size < 1 << 20 else None
            if record["key"] == key and _statistics_shape(record["mean"], record["std"], self.pixels.channels):
                return record["mean"], record["std"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or unusable: worked out again
        mean, std = channel_statistics(self.train_files, self.pixels, self.stats_images)
        print(
            f"data statistics ({min(self.stats_images, len(self.train_files))} training images): mean {mean}, std {std}"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "mean": mean, "std": std}))
        os.replace(tmp, path)
        return mean, std

    def _loader(self, files: List, train: bool) -> DataLoader:
        ds = MaskedImageDataset(
            files,
            PretrainTransform(self.img_size, train, normalize=None if self.mean is None else (self.mean, self.std)),
            self.mask_generator,
            refill=train,
            fmt=self.pixels,
        )
        collate = partial(collate_readable, num_fields=2)
        return make_loader(ds, self.batch_size, self.num_workers, train, collate, self.trainer)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_files, train=True)

    def val_dataloader(self):
        if not self.val_files:  # under a trainer `setup` has turned validation off
            return []
        return self._loader(self.val_files, train=False)
