"""What both stages' LightningModules share, in one base class (`StageModule`), so that the stages cannot drift:

- each training batch's random draws (drop-path, dropout, mixup) seeded from (run seed, rank, epoch, batch index)
  before the batch (`simmim.seeding.seed_step`), so ranks differ and a resumed run repeats the interrupted one;
- an optimizer step whose gradients hold inf or NaN skipped, counted, printed and logged (`train/skipped_steps`);
- under a sharded strategy (`fsdp2`), the module's `model` sharded block by block (`configure_model`), and the
  stand-in forward of a rank whose evaluation batch came out empty;
- the checkpoint contract's architecture record of the stage's SwinV2 (`swin`) in every checkpoint;
- the images a step is given: normalised floats, or a one-line refusal saying what to do (`images`).

A stage builds `self.model` (what is sharded and run), names its SwinV2 (`swin`) and passes its input size.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import pytorch_lightning as pl
import torch

import swinv2
from simmim.distributed import is_sharded
from simmim.errors import ConfigError
from simmim.optim import drop_nonfinite_grads
from simmim.seeding import seed_step


class StageModule(pl.LightningModule):
    """Base of `SimMIMPretrainer` and `SwinV2Classifier`.

    Under sharding, run the model through `self.model(...)` or one of `SHARDED_FORWARD_METHODS`, on every rank: a
    forward gathers weights from all ranks, and a submodule called directly (`self.model.encoder`) would find its
    root's weights still sharded.

    Args:
        img_size: The input size (square), for `blank_images`.
    """

    SHARDED_FORWARD_METHODS: Sequence[str] = ()

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.input_size = img_size
        self.skipped_steps = 0  # optimizer steps skipped for non-finite gradients, in this process's run

    @property
    def swin(self) -> swinv2.SwinTransformerV2:
        """The SwinV2 whose architecture the checkpoints record."""
        raise NotImplementedError

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as every step takes it: normalised float images. uint8 images mean the stage's data module did not
        normalise them (pretraining's does it on the device after the copy, in `on_after_batch_transfer`, which
        Lightning runs only for a data module handed to it): refused with what to do."""
        if x.dtype == torch.uint8:
            raise ConfigError(
                "the batches arrive as uint8 images, but steps take normalised float images: pretraining's data "
                "module normalises them on the device, so pass the data module itself (trainer.fit(model, "
                "datamodule=dm)), not its loaders; a loader of your own must normalise its images"
            )
        return x

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_step(self.global_rank, self.current_epoch, batch_idx)

    def on_before_optimizer_step(self, optimizer) -> None:
        if drop_nonfinite_grads(self):
            self.skipped_steps += 1
            print(
                f"step {self.global_step}: non-finite gradients, optimizer step skipped ({self.skipped_steps} so far)"
            )
        if self._trainer is not None:
            self.log("train/skipped_steps", float(self.skipped_steps))

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        swinv2.add_record(checkpoint, self.swin)

    def configure_model(self) -> None:
        shard = getattr(self.trainer.strategy, "shard", None)  # the strategies of simmim.distributed
        if shard is not None:
            shard(self.model, self.SHARDED_FORWARD_METHODS)

    @torch.no_grad()
    def join_sharded_forward(self, *inputs: torch.Tensor) -> None:
        """For a rank whose batch came out empty (every file unreadable) in validation or prediction: under
        sharding the others' forward waits on this rank's share of the weights, so run the model on `inputs` (a
        blank stand-in) and drop the result. Without sharding it does nothing."""
        if is_sharded(self.model):
            self.model(*inputs)

    def blank_images(self) -> torch.Tensor:
        """One black image of the module's input size, (1, 3, S, S), on its device."""
        return torch.zeros(1, 3, self.input_size, self.input_size, device=self.device)
