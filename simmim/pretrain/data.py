"""Pretraining data: a folder of images -> (uint8 image, mask) batches, masks made in the workers (the module
normalises the images on the training device)."""

from __future__ import annotations

import os
from functools import partial
from typing import List, Optional, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from simmim.data.builtin import DEFAULT_DIGITS_ROOT, prepare_digits
from simmim.data.images import (
    read_sample_image,
    require_images,
)
from simmim.data.index import FileIndex, agreed_index, open_index
from simmim.data.loaders import collate_readable, make_loader, skip_empty_validation
from simmim.data.pixel_source import PixelSource
from simmim.data.pixels import (
    PixelFormat,
)
from simmim.data.shards import is_shard_root
from simmim.errors import check_loader, require
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


class PretrainDataModule(PixelSource, SeedState, pl.LightningDataModule):
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
        self.init_pixels(channels, depth, mean, std, stats_images)

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
            train, val = agreed_index(trainer, self.shard_split, self.root)
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
        self.resolve_normalisation(trainer, self.train_files)

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
