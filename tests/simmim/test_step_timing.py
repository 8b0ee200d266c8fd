"""`train/data_wait_ms` measures the wait for the training loader: not the step, not what runs between steps."""

import time

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from simmim.data.loaders import collate_readable, make_loader
from simmim.data.watch import DataWaitTimer


class _Delayed(Dataset):
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def __len__(self) -> int:
        return 8

    def __getitem__(self, key):
        time.sleep(self.delay_s)
        return torch.ones(4), ()


class _Tiny(pl.LightningModule):
    def __init__(self, step_s: float) -> None:
        super().__init__()
        self.layer, self.step_s = torch.nn.Linear(4, 1), step_s

    def training_step(self, batch, batch_idx):
        time.sleep(self.step_s)
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Between(pl.Callback):
    """Records the logged waits, and sleeps after each batch as a checkpoint save or a slow logger would."""

    def __init__(self, sleep_s: float) -> None:
        self.values, self.sleep_s = [], sleep_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["train/data_wait_ms"]))
        time.sleep(self.sleep_s)


def _waits(delay_s: float, step_s: float, between_s: float):
    between = _Between(between_s)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[DataWaitTimer(), between],
    )
    loader = make_loader(_Delayed(delay_s), 2, 0, True, lambda b: collate_readable(b, 1), trainer)
    trainer.fit(_Tiny(step_s), loader)
    assert len(between.values) == 4
    return between.values


def test_slow_data_is_measured_and_a_slow_step_or_slow_hooks_are_not():
    slow_data = _waits(delay_s=0.04, step_s=0.0, between_s=0.0)  # 80 ms of loading per batch
    assert min(slow_data) >= 80 and sum(slow_data) >= 320, slow_data  # every batch's loading, counted once
    slow_rest = _waits(delay_s=0.0, step_s=0.08, between_s=0.08)  # 80 ms of training, 80 ms after each batch
    assert max(slow_rest) < 40, slow_rest
