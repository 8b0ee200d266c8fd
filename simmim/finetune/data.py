"""Fine-tuning data: a labelled ImageFolder tree -> (image, label) batches with the official augmentation."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import List, Optional, Tuple

import albumentations as A
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from simmim.builtin_data import DEFAULT_DIGITS_ROOT, prepare_digits
from simmim.errors import DataFolderError, check_loader, require
from simmim.finetune.augment import classification_transform
from simmim.images import list_images, read_sample_image
from simmim.loaders import IMAGENET_MEAN, IMAGENET_STD, collate_readable, make_loader, skip_empty_validation
from simmim.seeding import SampleKey, SeedState, sample_generators, sample_seed

DIGIT_CLASSES = [str(d) for d in range(10)]  # the built-in digits' class folders, written by prepare_data


def class_folders(root: Path) -> List[str]:
    """The sorted class-folder names of an ImageFolder tree `root/<class>/...`."""
    if not root.is_dir():
        raise DataFolderError(f"--data.root: image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataFolderError(f"--data.root: no class folders under {root}: expected <root>/<class_name>/<images>")
    return classes


def class_names(root: Optional[str]) -> List[str]:
    """The classes a `ClassificationDataModule(root=root)` will have, from the folder names alone (no image is
    listed or read): `root/train/<class>` when `root` has train/ and val/, else `root/<class>`; the digits for None."""
    if root is None:
        return DIGIT_CLASSES
    root = Path(root)
    return class_folders(root / "train" if (root / "train").is_dir() and (root / "val").is_dir() else root)


def image_folder(root: Path) -> Tuple[List[Path], List[int], List[str]]:
    """ImageFolder layout `root/<class>/**/<image>`: files, labels, sorted class names."""
    classes = class_folders(root)
    files, labels = [], []
    for idx, name in enumerate(classes):
        class_files = list_images(root / name)
        files += class_files
        labels += [idx] * len(class_files)
    return files, labels, classes


class LabelledImageDataset(Dataset):
    """(image, label, index, indices of the unreadable files passed over). A key is a `SeededSampler` key
    `(index, seed)`, whose seed draws the augmentation, or a plain index (evaluation). An unreadable file is warned
    about by name; with `refill` (training) the next readable file and its label replace it, otherwise the sample
    is `(None, (i,))`, which `collate_readable` drops."""

    def __init__(self, files: List[Path], labels: List[int], transform: A.Compose, refill: bool = False) -> None:
        self.files, self.labels, self.transform, self.refill = files, labels, transform, refill

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: SampleKey):
        i, seed = sample_seed(key)
        img, j, bad = read_sample_image(self.files, i, self.refill)
        if img is None:
            return None, bad  # dropped by the collate, its file counted
        augment_rng, py_rng, _ = sample_generators(seed)
        self.transform.set_random_state(augment_rng, py_rng)
        x = torch.from_numpy(self.transform(image=img)["image"]).permute(2, 0, 1)  # (3, H, W)
        return x, self.labels[j], j, bad


def stratified_pick(labels: List[int], num_classes: int, fraction: float, seed: int, at_least_one: bool) -> np.ndarray:
    """Boolean mask choosing `round(fraction * n_c)` random samples of each class c (a fixed draw for `seed`)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    picked = np.zeros(len(labels), dtype=bool)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        n = int(round(len(idx) * fraction))
        picked[rng.permutation(idx)[: max(1, n) if at_least_one else n]] = True
    return picked


class ClassificationDataModule(SeedState, pl.LightningDataModule):
    """A labelled image folder: `root/train/<class>/...` and `root/val/<class>/...`, or `root/<class>/...`
    split by `val_fraction` (stratified, fixed).

    Args:
        root: Folder as above. None: the built-in digits (labels 0-9), split by `val_fraction`.
        img_size: Training crop / evaluation size.
        batch_size, num_workers: DataLoader settings.
        val_fraction: Held-out fraction when there is no `val/` folder.
        label_fraction: Keep only this fraction of the training labels (per class), for low-label studies.
        predict_root: Folder of images to classify with `predict` (default: the validation images).
        erase_prob: Random erasing probability (official: 0.25).
        max_bad_fraction: Stop training once more than this fraction of the training files could not be decoded.
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
        erase_prob: float = 0.25,
        mean: Tuple[float, float, float] = IMAGENET_MEAN,
        std: Tuple[float, float, float] = IMAGENET_STD,
        max_bad_fraction: float = 0.01,
    ) -> None:
        super().__init__()
        check_loader(batch_size, num_workers, val_fraction, max_bad_fraction)
        require(0.0 < label_fraction <= 1.0, "--data.label_fraction", label_fraction, "must be in (0, 1]")
        require(0.0 <= erase_prob <= 1.0, "--data.erase_prob", erase_prob, "must be in [0, 1] (official: 0.25)")
        require(img_size > 0, "--data.img_size", img_size, "must be positive")
        self.root, self.img_size, self.batch_size, self.num_workers = root, img_size, batch_size, num_workers
        self.val_fraction, self.label_fraction, self.predict_root = val_fraction, label_fraction, predict_root
        self.erase_prob, self.mean, self.std = erase_prob, tuple(mean), tuple(std)
        self.max_bad_fraction = max_bad_fraction
        self.classes: Optional[List[str]] = None
        if root is not None:
            self._scan()  # a user's folder fails at start-up, not mid-run; the digits are written in prepare_data

    def prepare_data(self) -> None:
        if self.root is None:
            prepare_digits(DEFAULT_DIGITS_ROOT)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.classes is None:
            self._scan()
        skip_empty_validation(self, "no validation images (--data.val_fraction 0 and no val/ folder): no val/acc1")

    def _scan(self) -> None:
        root = Path(self.root) if self.root is not None else DEFAULT_DIGITS_ROOT
        if (root / "train").is_dir() and (root / "val").is_dir():
            tf, tl, self.classes = image_folder(root / "train")
            vf, vl, val_classes = image_folder(root / "val")
            if val_classes != self.classes:
                only_train = sorted(set(self.classes) - set(val_classes))
                only_val = sorted(set(val_classes) - set(self.classes))
                raise DataFolderError(
                    f"--data.root: class folders differ between {root / 'train'} and {root / 'val'}: "
                    f"only in train {only_train}, only in val {only_val}. Both splits need the same class folders."
                )
        else:
            files, labels, self.classes = image_folder(root)
            is_val = stratified_pick(labels, len(self.classes), self.val_fraction, seed=0, at_least_one=False)
            tf = [f for f, v in zip(files, is_val) if not v]
            tl = [lab for lab, v in zip(labels, is_val) if not v]
            vf = [f for f, v in zip(files, is_val) if v]
            vl = [lab for lab, v in zip(labels, is_val) if v]
        if self.label_fraction < 1.0:
            keep = stratified_pick(tl, len(self.classes), self.label_fraction, seed=1, at_least_one=True)
            tf = [f for f, k in zip(tf, keep) if k]
            tl = [lab for lab, k in zip(tl, keep) if k]
        self.train_files, self.train_labels, self.val_files, self.val_labels = tf, tl, vf, vl

    @property
    def num_classes(self) -> Optional[int]:
        """The number of class folders (None before `setup` for the built-in digits)."""
        return None if self.classes is None else len(self.classes)

    def _loader(self, files, labels, train: bool) -> DataLoader:
        tfm = classification_transform(self.img_size, train, self.mean, self.std, self.erase_prob)
        return make_loader(
            LabelledImageDataset(files, labels, tfm, refill=train),
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
        self.predict_files = list_images(self.predict_root)
        return self._loader(self.predict_files, [-1] * len(self.predict_files), train=False)

    def describe(self) -> str:
        return (
            f"{self.num_classes} classes, {len(self.train_files)} train / {len(self.val_files)} val images "
            f"from {os.fspath(self.root or DEFAULT_DIGITS_ROOT)}"
        )
