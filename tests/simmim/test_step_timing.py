"""`train/data_wait_ms` measures the wait for data and not the step."""

import time

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from simmim.step_timing import DataWaitTimer


class _Delayed(Dataset):
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        time.sleep(self.delay_s)
        return torch.ones(4)


class _Tiny(pl.LightningModule):
    def __init__(self, step_s: float) -> None:
        super().__init__()
        self.layer, self.step_s = torch.nn.Linear(4, 1), step_s

    def training_step(self, batch, batch_idx):
        time.sleep(self.step_s)
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Waits(pl.Callback):
    def __init__(self) -> None:
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["train/data_wait_ms"]))


def _waits(delay_s: float, step_s: float):
    waits = _Waits()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[DataWaitTimer(), waits],
    )
    trainer.fit(_Tiny(step_s), DataLoader(_Delayed(delay_s), batch_size=2))
    assert len(waits.values) == 4
    return waits.values


def test_slow_data_is_measured_and_a_slow_step_is_not():
    slow_data = _waits(delay_s=0.04, step_s=0.0)  # 80 ms of loading per batch
    slow_step = _waits(delay_s=0.0, step_s=0.08)  # 80 ms of training per batch
    assert min(slow_data) >= 80, slow_data
    assert max(slow_step) < 40, slow_step
