"""How long each training step waited for its data, logged so that a user sees when the loader is the bottleneck."""

from __future__ import annotations

import time
from typing import Optional

import pytorch_lightning as pl


class DataWaitTimer(pl.Callback):
    """Logs `train/data_wait_ms` every training step: the wall time from the end of one training batch to the start
    of the next, which is the wait for the loader (its workers, or the main process without workers) plus the copy to
    the device and the device-side normalisation. The epoch's first batch counts from the start of the epoch, worker
    start-up included. Near zero: the loader keeps up; a large share of the step time: add `--data.num_workers`.

    On a GPU the host runs ahead of the device, so a wait shorter than the device's queued work costs nothing: compare
    the wait with the step time (`train/throughput_img_s`). Logged from each rank's own clock (rank 0's is shown).
    """

    def __init__(self) -> None:
        self._since: Optional[float] = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self._since is not None:
            pl_module.log("train/data_wait_ms", (time.perf_counter() - self._since) * 1e3)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self._since = time.perf_counter()
