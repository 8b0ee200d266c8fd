"""Fine-tuning data: a labelled ImageFolder tree -> (image, label) batches with the official augmentation."""

from __future__ import annotations

import os
from functools import partial
from typing import List, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader

from simmim.data.builtin import DEFAULT_DIGITS_ROOT, prepare_digits
from simmim.data.folders import LabelledImageDataset, NoLabels, class_names, labelled_folders, labelled_split
from simmim.data.images import require_images
from simmim.data.index import FileIndex, agreed_index, open_index
from simmim.data.loaders import IMAGENET_MEAN, IMAGENET_STD, collate_readable, make_loader, skip_empty_validation
from simmim.data.pixel_source import Normalisation, PixelSource
from simmim.data.pixels import RGB8
from simmim.data.shards import is_shard_root
from simmim.errors import DataFolderError, check_loader, require
from simmim.finetune.augment import RECIPES, classification_transform
from simmim.seeding import SeedState


class ClassificationDataModule(PixelSource, SeedState, pl.LightningDataModule):
    """A labelled image folder: `root/train/<class>/...` and `root/val/<class>/...`, or `root/<class>/...`
    split by `val_fraction` (stratified, fixed).

    Args:
        root: Folder as above. None: the built-in digits (labels 0-9), split by `val_fraction`.
        img_size: Training crop / evaluation size.
        batch_size, num_workers: DataLoader settings.
        val_fraction: Held-out fraction when there is no `val/` folder, or with `index`.
        label_fraction: Keep only this fraction of the training labels (per class), for low-label studies.
        predict_root: Folder of images to classify with `predict` (default: the validation images).
        augment: "official" (the official SwinV2 fine-tuning pipeline: timm's RandAugment rand-m9-mstd0.5-inc1,
            bicubic, random erasing in pixel mode; evaluation resizes by 256/224 and center-crops) or "digits" (a
            small shift, rotation and scale, no flip; evaluation resizes: for the built-in digits).
        erase_prob: Random erasing probability (official: 0.25; the official pipeline only).
        mean, std: The normalisation the loaders apply (the command line takes them from `--model.mean`, `--model.std`,
            and those from the pretrained file's record when not given): values per channel, "auto" (worked out
            from the training images, `simmim.data.pixel_source`), or None: ImageNet's for 8-bit RGB, else "auto".
        channels, depth, stats_images: The pixel format and the statistics' sample, as in pretraining
            (`simmim.data.pixels`); images that are not 8-bit RGB take `GeometricTransform`, whatever `augment`.
        index: A labelled file list to read instead of walking `root`: one `path<TAB>class` per line, relative to
            `root`, split by `val_fraction` (stratified).
        index_cache: Where file indexes are kept (default: `$XDG_CACHE_HOME/simmim/index`, `~/.cache/simmim/index`).
        reindex: Walk the folders again even when their cached indexes look current.

    The folders are read through their file indexes (`simmim.data.index`), as in pretraining: walked once by rank 0
    of each node in `prepare_data`, memory-mapped by every rank and worker, reused while the folders are unchanged.
    """

    def __init__(
        self,
        root: Optional[str] = None,
        img_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 4,
        val_fraction: float = 0.1,
        label_fraction: float = 1.0,
        predict_root: Optional[str] = None,
        augment: str = "official",
        erase_prob: float = 0.25,
        mean: Normalisation = None,
        std: Normalisation = None,
        index: Optional[str] = None,
        index_cache: Optional[str] = None,
        reindex: bool = False,
        channels: Optional[int] = None,
        depth: Optional[str] = None,
        stats_images: int = 1000,
    ) -> None:
        super().__init__()
        check_loader(batch_size, num_workers, val_fraction)
        require(0.0 < label_fraction <= 1.0, "--data.label_fraction", label_fraction, "must be in (0, 1]")
        require(0.0 <= erase_prob <= 1.0, "--data.erase_prob", erase_prob, "must be in [0, 1] (official: 0.25)")
        require(img_size > 0, "--data.img_size", img_size, "must be positive")
        require(augment in RECIPES, "--data.augment", augment, f"must be one of {', '.join(RECIPES)}")
        self.root, self.img_size, self.batch_size, self.num_workers = root, img_size, batch_size, num_workers
        self.val_fraction, self.label_fraction, self.predict_root = val_fraction, label_fraction, predict_root
        self.augment, self.erase_prob = augment, erase_prob
        require(index is None or root is not None, "--data.index", index, "needs --data.root, the folder it lists")
        self.index, self.index_cache, self.reindex = index, index_cache, reindex
        self.sharded = is_shard_root(root)
        # A user's folder without class folders fails at start-up, from the folder names alone (the images are
        # listed by prepare_data, the digits written there); a list is read into its index here, on every rank.
        self.classes: Optional[List[str]] = (
            class_names(root, index=index, index_cache=index_cache, shards_of=lambda _: self.shard_split())
            if root is not None
            else None
        )
        if predict_root is not None:
            require_images(predict_root)
        self.init_pixels(channels, depth, mean, std, stats_images)
        if self.pixels != RGB8:
            rank_zero_info(
                f"--data.augment {augment} works on 8-bit RGB (the official recipe's RandAugment and colour jitter); "
                f"these images ({self.pixels.describe()}) take the geometric augmentation instead: random resized "
                "crop, flip, random erasing"
            )

    @property
    def _source(self) -> str:
        return f"--data.index {self.index}" if self.index is not None else f"--data.root {self.root}"

    def _index(self, folder, fresh: bool, listed: bool = False) -> FileIndex:
        """`folder`'s index, or with `listed` the `--data.index` list's (rebuilt when the list changes)."""
        return open_index(folder, self.index if listed else None, self.index_cache, self.reindex and fresh, fresh)

    def prepare_data(self) -> None:
        """The built-in digits on first use; every folder's index, walked or found current in the cache (the split
        is drawn in `setup`)."""
        if self.root is None:
            prepare_digits()
        if self.sharded:
            return  # shards have no index to build
        for folder in labelled_folders(self.root, self.index):
            self._index(folder, True, self.index is not None)
        if self.predict_root is not None:
            self._index(self.predict_root, fresh=True)

    def setup(self, stage: Optional[str] = None) -> None:
        """The split, from the indexes `prepare_data` left (a Trainer calls it first; without it, the cached
        index is used as it is, or the folder walked if there is none), the same on every rank (`agreed_index`)."""
        trainer = getattr(self, "trainer", None)

        def index_of(folder, listed: bool = False) -> FileIndex:
            return agreed_index(trainer, lambda: self._index(folder, False, listed), folder)

        split = labelled_split(
            self.root,
            self.val_fraction,
            self.label_fraction,
            index_of=lambda f: index_of(f, self.index is not None),
            listed=self.index,
            shards_of=lambda root: agreed_index(trainer, self.shard_split, root),  # root: self.root
        )
        same = self.classes is None or split.classes == self.classes
        if trainer is not None and trainer.world_size > 1:  # every rank stops, or none
            same = trainer.strategy.reduce_boolean_decision(same, all=True)
        if not same:
            raise DataFolderError(
                f"{self._source}: its classes changed while the run started (on this rank or another): start again "
                "once it is complete"
            )
        self.train_files, self.train_labels, self.classes = split.train_files, split.train_labels, split.classes
        self.val_files, self.val_labels = split.val_files, split.val_labels
        if self.predict_root is not None:
            self.predict_files = index_of(self.predict_root)
        skip_empty_validation(self, "no validation images (--data.val_fraction 0 and no val/ folder): no val/acc1")
        self.resolve_normalisation(trainer, self.train_files)
        if self.mean is None:  # 8-bit RGB, none given: the loaders normalise with ImageNet's, as the module does
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    @property
    def num_classes(self) -> Optional[int]:
        """The number of class folders (None before `setup` for the built-in digits)."""
        return None if self.classes is None else len(self.classes)

    def _loader(self, files, labels, train: bool) -> DataLoader:
        tfm = classification_transform(
            self.augment, self.img_size, train, self.mean, self.std, self.erase_prob, self.pixels
        )
        return make_loader(
            LabelledImageDataset(files, labels, tfm, refill=train, fmt=self.pixels),
            self.batch_size,
            self.num_workers,
            train,
            partial(collate_readable, num_fields=3),
            self.trainer,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_files, self.train_labels, train=True)

    def val_dataloader(self):
        if not self.val_files:  # under a trainer `setup` has turned validation off
            return []
        return self._loader(self.val_files, self.val_labels, train=False)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_root is None:
            self.predict_files = self.val_files
            return self._loader(self.val_files, self.val_labels, train=False)
        return self._loader(self.predict_files, NoLabels(len(self.predict_files)), train=False)

    def describe(self) -> str:
        return (
            f"{self.num_classes} classes, {len(self.train_files)} train / {len(self.val_files)} val images "
            f"from {os.fspath(self.root or DEFAULT_DIGITS_ROOT)}"
        )
