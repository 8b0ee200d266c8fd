"""What the trainer learns about its data while it trains, as two callbacks: `BadImageLimit` stops a run whose
training files are mostly unreadable (counting over every rank), `DataWaitTimer` logs how long each step waited for
its batch, so that a user sees when the loader is the bottleneck."""

from __future__ import annotations

from typing import Iterable, List, Optional, Set

import pytorch_lightning as pl
import torch

from simmim.errors import DataError, require


class BadImageLimit(pl.Callback):
    """Stops a run once more than `max_fraction` (`--bad_images.max_fraction`) of its training files turned out
    unreadable (one bad file is always
    tolerated). Counted are distinct files (a file passed over in every epoch, or by two neighbours' refills, counts
    once), judged against the number of files in the training set, so a dataset under the limit never stops,
    however early its bad files come. Under DDP the ranks share what they found: every rank sees the same set and
    all stop at the same step (a rank stopping alone would leave the others waiting).

    Args:
        max_fraction: The tolerated fraction of unreadable training files.
    """

    def __init__(self, max_fraction: float = 0.01) -> None:
        require(0.0 <= max_fraction <= 1.0, "--bad_images.max_fraction", max_fraction, "must be in [0, 1]")
        self.max_fraction = max_fraction
        self.bad: Set[int] = set()  # indices of the unreadable training files found so far, on every rank

    def update(self, unreadable: Iterable[int], num_files: int, trainer: Optional[pl.Trainer] = None) -> None:
        """Add one batch's unreadable file indices; `num_files`: the training set's size. `trainer`: share the new
        indices with its other ranks (one all-reduce per batch; a gather only when some rank found a new file)."""
        new = sorted(set(int(i) for i in unreadable) - self.bad)
        if trainer is not None and trainer.world_size > 1:
            found = torch.tensor(len(new), device=trainer.strategy.root_device)
            if trainer.strategy.reduce(found, reduce_op="sum").item() > 0:
                shards: List = [None] * trainer.world_size
                torch.distributed.all_gather_object(shards, new)
                new = [i for shard in shards for i in shard]
        self.bad.update(new)
        if len(self.bad) > max(1.0, self.max_fraction * num_files):
            raise DataError(
                f"{len(self.bad)} of the {num_files} training images could not be decoded, more than the tolerated "
                f"fraction {self.max_fraction} (--bad_images.max_fraction); the warnings name their paths: fix or "
                "remove them, or raise the limit"
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.update(batch[-1], len(trainer.train_dataloader.dataset), trainer)


class DataWaitTimer(pl.Callback):
    """Logs `train/data_wait_ms` every training step: how long the training loader's `next()` blocked since the
    previous step (the first step's includes the workers' start). Near zero: the loader keeps up; a large share of
    the step time (compare `train/throughput_img_s`): add `--data.num_workers`. Checkpointing, validation and
    logging between steps are not counted, nor the copy to the device. Needs a training loader that counts its waits
    (`data_wait_s`, as `simmim.data.loaders.ResumableLoader` does); logged from each rank's own clock (rank 0's is
    shown)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        loader = trainer.train_dataloader
        if hasattr(loader, "data_wait_s"):
            pl_module.log("train/data_wait_ms", loader.data_wait_s * 1e3)
            loader.data_wait_s = 0.0
