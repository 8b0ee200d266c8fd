"""Stop a run whose training data is mostly unreadable, counting over every rank."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from simmim.errors import require


class BadImageLimit(pl.Callback):
    """Counts the unreadable files the training loader passed over (the last field of every batch, see
    `simmim.loaders.collate_readable`) and stops the run once more than `max_fraction` of the images seen were bad
    (one bad image is always tolerated). Under DDP the counts are summed over the ranks first, so every rank sees
    the same totals and all stop at the same step (a rank stopping alone would leave the others waiting).

    Args:
        max_fraction: The tolerated fraction of unreadable images.
    """

    def __init__(self, max_fraction: float = 0.01) -> None:
        require(0.0 <= max_fraction <= 1.0, "--data.max_bad_fraction", max_fraction, "must be in [0, 1]")
        self.max_fraction, self.seen, self.bad = max_fraction, 0, 0

    def update(self, good: int, skipped: int, trainer: pl.Trainer | None = None) -> None:
        """Add one batch: `good` decoded images, `skipped` unreadable files. `trainer`: sum over its ranks."""
        if trainer is not None and trainer.world_size > 1:
            counts = torch.tensor([good, skipped], dtype=torch.long, device=trainer.strategy.root_device)
            good, skipped = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        self.seen += good + skipped
        self.bad += skipped
        if self.bad > max(1.0, self.max_fraction * self.seen):
            raise RuntimeError(
                f"{self.bad} of {self.seen} images could not be decoded, more than max_bad_fraction="
                f"{self.max_fraction}; the warnings name their paths: fix or remove them, or raise "
                "--data.max_bad_fraction"
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.update(len(batch[0]), int(batch[-1]), trainer)
