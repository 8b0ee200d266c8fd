"""Labelled image folders, shared by fine-tuning and the evaluation tools: class folders, a fixed stratified split,
and the dataset of (image, label) samples with a seeded transform."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from simmim.data.builtin import DEFAULT_DIGITS_ROOT
from simmim.data.images import read_sample_image
from simmim.data.index import FileIndex, Labels, folder_index, index_from_list
from simmim.data.shards import ShardSet, ShardSplit, is_shard_root, labelled_shards
from simmim.errors import DataFolderError
from simmim.seeding import SampleKey, sample_seed, seeded_globals

DIGIT_CLASSES = [str(d) for d in range(10)]  # the built-in digits' class folders, written by prepare_data


def class_folders(root: Path, option: str = "--data.root") -> List[str]:
    """The sorted class-folder names of an ImageFolder tree `root/<class>/...` (errors name `option`). A class
    folder behind a symbolic link is passed over with a warning, as the file index passes it over (it could lead
    anywhere)."""
    if not root.is_dir():
        raise DataFolderError(f"{option}: image folder not found: {root}")
    classes = []
    for d in sorted(root.iterdir()):
        if d.is_symlink() and d.is_dir():
            warnings.warn(
                f"{option}: skipping the class folder {d}: a symbolic link, which is not followed", stacklevel=2
            )
        elif d.is_dir():
            classes.append(d.name)
    if not classes:
        raise DataFolderError(f"{option}: no class folders under {root}: expected <root>/<class_name>/<images>")
    return classes


def _split_folders(root: Path) -> bool:
    """Whether `root` has train/ and val/ folders (each then holds the class folders)."""
    return (root / "train").is_dir() and (root / "val").is_dir()


def _same_classes(root: Path, train: List[str], val: List[str], option: str) -> None:
    if val != train:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise DataFolderError(
            f"{option}: class folders differ between {root / 'train'} and {root / 'val'}: "
            f"only in train {only_train}, only in val {only_val}. Both splits need the same class folders."
        )


def class_names(
    root: Optional[str],
    option: str = "--data.root",
    index: Optional[str] = None,
    index_cache: Optional[str] = None,
    shards_of: Optional[Callable[[str], ShardSplit]] = None,
) -> List[str]:
    """The classes a `ClassificationDataModule(root=root, index=index)` will have, from the folder names alone (no
    image is listed or read): `root/train/<class>` when `root` has train/ and val/ (whose class folders must be the
    same), else `root/<class>`; the digits for None. With a labelled file list `index`, the classes it names; for
    shards (opened by `shards_of(root)`, default `open_shard_split`), those their record names."""
    if index is not None:
        if root is None:
            raise DataFolderError(f"--data.index {index} needs --data.root, the folder its paths are relative to")
        return listed_classes(index_from_list(root, index, index_cache), index)
    if root is None:
        return DIGIT_CLASSES
    if is_shard_root(root):
        return labelled_shards(root, 0.0, option=option, shards_of=shards_of)[2]
    root = Path(root)
    if not _split_folders(root):
        return class_folders(root, option)
    train = class_folders(root / "train", option)
    _same_classes(root, train, class_folders(root / "val", option), option)
    return train


def _labelled(index: FileIndex, folder: Path, option: str) -> FileIndex:
    """The files of `index` that are in a class folder (a file directly in `folder` has no class and is left out).
    The class folders are those `class_folders` finds (a linked one is warned about and left out, as the walk leaves
    it out); one without images is refused, as a listing of it was."""
    classes = class_folders(folder, option)
    if classes != index.classes:
        raise DataFolderError(
            f"{option}: the class folders under {folder} changed while the run started (its index has "
            f"{len(index.classes)}, the folder {len(classes)}): start again once the folder is complete"
        )
    labels = index.label_array()
    counts = np.bincount(labels[labels >= 0], minlength=len(classes))
    empty = [name for name, n in zip(classes, counts) if n == 0]
    if empty:
        raise DataFolderError(
            f"{option}: no images in the class folder(s) {', '.join(repr(e) for e in empty[:5])} under {folder}: "
            "each folder under the root is a class; remove the empty ones or move them out"
        )
    return index if bool(np.all(labels >= 0)) else index.subset(np.flatnonzero(labels >= 0))


def labelled_folders(root: Optional[str], listed: Optional[str] = None) -> List[Path]:
    """The folders whose indexes `labelled_split(root, ..., listed=listed)` reads: `root/train` and `root/val`, or
    `root` (with a list: `root`, where its paths are; None: the built-in digits)."""
    root = Path(root) if root is not None else DEFAULT_DIGITS_ROOT
    return [root / "train", root / "val"] if listed is None and _split_folders(root) else [root]


def listed_classes(index: FileIndex, list_file: str) -> List[str]:
    """The classes of a labelled file list's index; a list without them is refused (fine-tuning needs them)."""
    if not index.classes:
        raise DataFolderError(
            f"--data.index {list_file}: the list names no classes; fine-tuning needs a class on every line "
            "(`path<TAB>class`)"
        )
    return index.classes


class NoLabels(Sequence[int]):
    """`n` samples without a class (-1 each), without a list of them: `predict` on a folder of any size."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [-1] * len(range(*i.indices(self.n)))
        if not -self.n <= i < self.n:
            raise IndexError(f"sample {i} of {self.n}")
        return -1


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
        fmt: Optional[Any] = None,
    ) -> None:
        self.files, self.labels, self.transform, self.refill, self.fmt = files, labels, transform, refill, fmt

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: SampleKey):
        i, seed = sample_seed(key)
        img, j, bad = read_sample_image(self.files, i, self.refill, self.fmt)
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
    """A labelled folder's fixed split: the files of both sides (file-index views, or shard-set views) with their
    classes (`Labels` views of the same), and the class names."""

    train_files: FileIndex | ShardSet
    train_labels: Labels
    val_files: FileIndex | ShardSet
    val_labels: Labels
    classes: List[str]


def labelled_split(
    root: Optional[str],
    val_fraction: float,
    label_fraction: float = 1.0,
    option: str = "--data.root",
    index_of: Optional[Callable[[Path], FileIndex]] = None,
    listed: Optional[str] = None,
    shards_of: Optional[Callable[[str], ShardSplit]] = None,
) -> LabelledSplit:
    """The `LabelledSplit` of `root`: `root/train/<class>` and `root/val/<class>` when both exist, else
    `root/<class>` split by `val_fraction` (stratified, the same draw every time); None: the built-in digits.
    `label_fraction` < 1 keeps that fraction of each class's training labels. The folders are read through their
    file indexes (`index_of(folder)`; default: `folder_index`, the cached index while the folder is unchanged).
    With `listed` (a labelled file list, `--data.index`), `index_of(root)` is the list's index, split as
    `root/<class>` would be. Shards (`simmim.data.shards.labelled_shards`, opened by `shards_of(root)`) are split
    in whole chunks. Errors name `option`, the setting that gave `root`."""
    if root is not None and is_shard_root(root):
        train, val, classes = labelled_shards(root, val_fraction, label_fraction, option, shards_of)
        return LabelledSplit(train, Labels(train), val, Labels(val), classes)
    index_of = index_of or folder_index
    folders = labelled_folders(root, listed)
    if len(folders) == 2:
        train, val = (_labelled(index_of(folder), folder, option) for folder in folders)
        classes = train.classes
        _same_classes(folders[0].parent, classes, val.classes, option)
    else:
        (folder,) = folders
        whole = index_of(folder) if listed is not None else _labelled(index_of(folder), folder, option)
        classes = listed_classes(whole, listed) if listed is not None else whole.classes
        is_val = stratified_pick(whole.label_array(), len(classes), val_fraction, seed=0, at_least_one=False)
        train, val = whole.subset(np.flatnonzero(~is_val)), whole.subset(np.flatnonzero(is_val))
    if label_fraction < 1.0:
        keep = stratified_pick(train.label_array(), len(classes), label_fraction, seed=1, at_least_one=True)
        train = train.subset(np.flatnonzero(keep))
    return LabelledSplit(train, Labels(train), val, Labels(val), classes)
