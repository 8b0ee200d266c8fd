"""What both stages' data loaders share: the normalisation constants, the collate that tolerates unreadable files,
and the loader settings."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def collate_readable(batch: List, num_fields: int) -> Tuple:
    """Stack the decoded samples field by field (tensors stacked, numbers made one tensor). Every sample ends with
    the indices of the unreadable files it passed over; a sample whose own file was unreadable is `(None, (i,))` and
    is dropped. The batch's last element is all those indices (a tuple of ints). A batch with nothing readable gives
    `num_fields` empty tensors."""
    good = [b for b in batch if b[0] is not None]
    unreadable = tuple(j for b in batch for j in b[-1])
    if not good:
        return (*(torch.empty(0) for _ in range(num_fields)), unreadable)
    fields = zip(*(g[:-1] for g in good))
    return (*(torch.stack(f) if isinstance(f[0], torch.Tensor) else torch.tensor(f) for f in fields), unreadable)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, train: bool, collate_fn) -> DataLoader:
    """Shuffled, last-partial-batch-dropping loader for training; plain in-order loader otherwise."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) >= batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
    )
