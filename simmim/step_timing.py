"""How long each training step waited for its data, logged so that a user sees when the loader is the bottleneck."""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytorch_lightning as pl


class TimedIterator:
    """Wraps a data loader's iterator and adds the time each `next()` takes (waiting for a worker's batch, or
    loading and collating it without workers) to `owner.data_wait_s`. Everything else is the wrapped iterator's."""

    def __init__(self, iterator: Iterator, owner: Any) -> None:
        self._iterator, self._owner = iterator, owner

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._iterator)
        finally:
            self._owner.data_wait_s += time.perf_counter() - start

    def __len__(self) -> int:
        return len(self._iterator)

    def __getattr__(self, name: str):
        if name in ("_iterator", "_owner"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._iterator, name)

    def __getstate__(self) -> dict:
        """Pickled (a copy of Lightning's loop) without the loader's iterator, which cannot be pickled: as Lightning
        itself drops such iterators."""
        return {"_iterator": None, "_owner": None}


class DataWaitTimer(pl.Callback):
    """Logs `train/data_wait_ms` every training step: how long the training loader's `next()` blocked since the
    previous step (the first step's includes the workers' start). Near zero: the loader keeps up; a large share of
    the step time (compare `train/throughput_img_s`): add `--data.num_workers`. Checkpointing, validation and
    logging between steps are not counted, nor the copy to the device. Needs a training loader that counts its waits
    (`data_wait_s`, as `simmim.seeding.ResumableLoader` does); logged from each rank's own clock (rank 0's is
    shown)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        loader = trainer.train_dataloader
        if hasattr(loader, "data_wait_s"):
            pl_module.log("train/data_wait_ms", loader.data_wait_s * 1e3)
            loader.data_wait_s = 0.0
