"""Fine-tuning callbacks: the predictions file."""

from __future__ import annotations

import csv
import os
from typing import List, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from simmim.checkpointing.exports import run_dir


class PredictionCSV(pl.Callback):
    """`predict` writes `<run>/predictions.csv`: path, predicted class name, its probability; one row per file in
    file order. Under DDP the ranks' rows are gathered first. A file that could not be decoded keeps its row with
    empty `pred` and `prob` (its warning names it)."""

    def __init__(self) -> None:
        self.rows: List = []
        self.path: Optional[str] = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.rows += list(zip(outputs["index"].tolist(), outputs["pred"].tolist(), outputs["prob"].tolist()))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path = os.path.join(run_dir(trainer), "predictions.csv")  # collective: before the rank-zero check
        rows = self.rows
        if trainer.world_size > 1:
            shards: List = [None] * trainer.world_size
            torch.distributed.all_gather_object(shards, rows)  # shards differ in length: objects, not tensors
            rows = [row for shard in shards for row in shard]
        if not trainer.is_global_zero:
            return
        found = {i: (pred, prob) for i, pred, prob in rows}  # a distributed sampler may repeat a sample
        dm = trainer.datamodule
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "pred", "prob"])
            for i, path in enumerate(dm.predict_files):
                pred, prob = found.get(i, (None, None))
                w.writerow(
                    [os.fspath(path), "" if pred is None else dm.classes[pred], "" if prob is None else f"{prob:.4f}"]
                )
        if len(found) < len(dm.predict_files):
            rank_zero_info(
                f"{len(dm.predict_files) - len(found)} unreadable file(s) have empty predictions in {self.path}"
            )
