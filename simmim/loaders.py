"""What both stages' data loaders share: the normalisation constants, the collate that tolerates unreadable files,
and the loader settings."""

from __future__ import annotations

from typing import List, Tuple

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from simmim.seeding import ResumableLoader, make_train_sampler
from simmim.workers import WorkerLoader, worker_context

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


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int, train: bool, collate_fn, trainer=None
) -> DataLoader:
    """Training: a `ResumableLoader` over a `SeededSampler` for `trainer`'s rank (the seeded, resumable order;
    a last partial batch is dropped). Otherwise a plain in-order loader (Lightning shares it out under DDP).
    Batches are pinned when `trainer` trains on a GPU, so that Lightning's copies to it do not block."""
    kwargs = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        multiprocessing_context=worker_context(num_workers),
        pin_memory=trainer is not None and trainer.strategy.root_device.type == "cuda",
    )
    if not train:
        return WorkerLoader(dataset, shuffle=False, **kwargs)
    sampler = make_train_sampler(len(dataset), trainer)
    return ResumableLoader(dataset, sampler, trainer, drop_last=len(sampler) >= batch_size, **kwargs)


def skip_empty_validation(datamodule, message: str) -> None:
    """In a data module's `setup`: with no validation files, say `message` once and turn the trainer's validation
    loop off (rather than run it over an empty loader, with Lightning's notices about its zero length)."""
    trainer = getattr(datamodule, "trainer", None)
    if not datamodule.val_files and trainer is not None and trainer.limit_val_batches != 0:
        rank_zero_info(message)
        trainer.limit_val_batches = 0
