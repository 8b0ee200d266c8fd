"""A callback for tests that run the command line in a subprocess: it appends one JSON line per training batch
(rank, epoch, batch index, a fingerprint of every sample's pixels and mask, the loss, the bytes of optimizer state
the rank holds, the gradient norm before and after clipping) to a file, flushed at once so
that a killed run leaves its record, and can kill its own process with SIGKILL at a given step."""

import hashlib
import json
import os
import signal
from typing import Optional

import pytorch_lightning as pl

from simmim.data.watch import DataWaitTimer
from simmim.distributed import optimizer_state_bytes


def fingerprint(tensor) -> str:
    return hashlib.sha1(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()[:12]


def grad_norm(module) -> float:
    """The global L2 norm of the module's gradients; FSDP2 shards are summed over ranks (collective then)."""
    import torch
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    total = sum((g.to_local() if isinstance(g, DTensor) else g).float().pow(2).sum() for g in grads)
    total = torch.as_tensor(total, dtype=torch.float64)
    if any(isinstance(g, DTensor) for g in grads):
        torch.distributed.all_reduce(total)
    return float(total.sqrt())


class BatchLog(pl.Callback):
    def __init__(self, path: str, kill_at_step: Optional[int] = None) -> None:
        self.path, self.kill_at_step, self.grad_norm = path, kill_at_step, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grad_norm = grad_norm(pl_module)  # before clipping (Lightning clips after this hook)

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
            "grad_norm": self.grad_norm,
            "clipped_grad_norm": grad_norm(pl_module),  # the gradients the optimizer stepped with
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


class QuietDataWaitTimer(DataWaitTimer):
    """A user's subclass of a callback every run has: it stands in for it (the run adds no second timer)."""
