"""Labelled image folders, shared by fine-tuning and the evaluation tools: class folders, a fixed stratified split,
and the dataset of (image, label) samples with a seeded transform."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from simmim.data.builtin import DEFAULT_DIGITS_ROOT
from simmim.data.images import list_images, read_sample_image
from simmim.errors import DataFolderError
from simmim.seeding import SampleKey, sample_seed, seeded_globals

DIGIT_CLASSES = [str(d) for d in range(10)]  # the built-in digits' class folders, written by prepare_data


def class_folders(root: Path, option: str = "--data.root") -> List[str]:
    """The sorted class-folder names of an ImageFolder tree `root/<class>/...` (errors name `option`)."""
    if not root.is_dir():
        raise DataFolderError(f"{option}: image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataFolderError(f"{option}: no class folders under {root}: expected <root>/<class_name>/<images>")
    return classes


def class_names(root: Optional[str]) -> List[str]:
    """The classes a `ClassificationDataModule(root=root)` will have, from the folder names alone (no image is
    listed or read): `root/train/<class>` when `root` has train/ and val/, else `root/<class>`; the digits for None."""
    if root is None:
        return DIGIT_CLASSES
    root = Path(root)
    return class_folders(root / "train" if (root / "train").is_dir() and (root / "val").is_dir() else root)


def image_folder(root: Path, option: str = "--data.root") -> Tuple[List[Path], List[int], List[str]]:
    """ImageFolder layout `root/<class>/**/<image>`: files, labels, sorted class names."""
    classes = class_folders(root, option)
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

    def __init__(
        self,
        files: List[Path],
        labels: List[int],
        transform: Callable[[np.ndarray], torch.Tensor],
        refill: bool = False,
    ) -> None:
        self.files, self.labels, self.transform, self.refill = files, labels, transform, refill

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: SampleKey):
        i, seed = sample_seed(key)
        img, j, bad = read_sample_image(self.files, i, self.refill)
        if img is None:
            return None, bad  # dropped by the collate, its file counted
        with seeded_globals(seed):  # timm's and torchvision's transforms draw from the global generators
            x = self.transform(img)  # normalised float (3, H, W)
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


class LabelledSplit(NamedTuple):
    """A labelled folder's fixed split: files and class indices of both sides, and the class names."""

    train_files: List[Path]
    train_labels: List[int]
    val_files: List[Path]
    val_labels: List[int]
    classes: List[str]


def labelled_split(
    root: Optional[str], val_fraction: float, label_fraction: float = 1.0, option: str = "--data.root"
) -> LabelledSplit:
    """The `LabelledSplit` of `root`: `root/train/<class>` and
    `root/val/<class>` when both exist, else `root/<class>` split by `val_fraction` (stratified, the same draw every
    time); None: the built-in digits. `label_fraction` < 1 keeps that fraction of each class's training labels.
    Errors name `option`, the setting that gave `root`."""
    root = Path(root) if root is not None else DEFAULT_DIGITS_ROOT
    if (root / "train").is_dir() and (root / "val").is_dir():
        tf, tl, classes = image_folder(root / "train", option)
        vf, vl, val_classes = image_folder(root / "val", option)
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            raise DataFolderError(
                f"{option}: class folders differ between {root / 'train'} and {root / 'val'}: "
                f"only in train {only_train}, only in val {only_val}. Both splits need the same class folders."
            )
    else:
        files, labels, classes = image_folder(root, option)
        is_val = stratified_pick(labels, len(classes), val_fraction, seed=0, at_least_one=False)
        tf = [f for f, v in zip(files, is_val) if not v]
        tl = [lab for lab, v in zip(labels, is_val) if not v]
        vf = [f for f, v in zip(files, is_val) if v]
        vl = [lab for lab, v in zip(labels, is_val) if v]
    if label_fraction < 1.0:
        keep = stratified_pick(tl, len(classes), label_fraction, seed=1, at_least_one=True)
        tf = [f for f, k in zip(tf, keep) if k]
        tl = [lab for lab, k in zip(tl, keep) if k]
    return LabelledSplit(tf, tl, vf, vl, classes)
