"""A callback for tests that run the command line in a subprocess: it appends one JSON line per training batch
(rank, epoch, batch index, a fingerprint of every sample's pixels and mask, the loss, the bytes of optimizer state
the rank holds) to a file, flushed at once so
that a killed run leaves its record, and can kill its own process with SIGKILL at a given step."""

import hashlib
import json
import os
import signal
from typing import Optional

import pytorch_lightning as pl

from simmim.sharding import optimizer_state_bytes


def fingerprint(tensor) -> str:
    return hashlib.sha1(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()[:12]


class BatchLog(pl.Callback):
    def __init__(self, path: str, kill_at_step: Optional[int] = None) -> None:
        self.path, self.kill_at_step = path, kill_at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.kill_at_step is not None and trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # as a pre-empted job dies: no hook, no final save

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        row = {
            "rank": trainer.global_rank,
            "epoch": trainer.current_epoch,
            "batch": batch_idx,
            "step": trainer.global_step,
            "images": [fingerprint(x) for x in batch[0]],
            "masks": [fingerprint(m) for m in batch[1]],
            "loss": float(outputs["loss"]),
            "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizers),  # this rank's share
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_log(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


class Stall(pl.Callback):
    """Rank `rank` sleeps `seconds` before the training batch of step `at_step`, leaving the others waiting in the
    next collective."""

    def __init__(self, rank: int = 1, at_step: int = 1, seconds: float = 60.0) -> None:
        self.rank, self.at_step, self.seconds = rank, at_step, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.at_step:
            import time

            time.sleep(self.seconds)
