"""Pretraining callbacks: reconstruction grids."""

from __future__ import annotations

import os
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torchvision.utils import make_grid, save_image

from simmim.export import run_dir
from simmim.pretrain.model import local_stats
from simmim.sharding import is_sharded


class ReconstructionGrid(pl.Callback):
    """Every `every_n_epochs` and at the end of fit, save a PNG grid from the first readable validation batch.

    Columns: original, masked input, reconstruction, reconstruction pasted into the visible pixels.
    Files: `<run>/reconstructions/epoch_XXX.png` (and `final.png`); also logged to TensorBoard when active.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.last_path: Optional[str] = None
        self.seen = 0  # readable validation images in the current validation epoch

    def why_none(self, trainer: pl.Trainer) -> str:
        """Why no grid was written (for the end-of-run summary)."""
        if not trainer.num_val_batches or not sum(trainer.num_val_batches):
            return "none: no validation images (--data.val_fraction)"
        return "none: no validation image could be decoded"

    @torch.no_grad()
    def make_grid(self, pl_module: pl.LightningModule, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dm = pl_module.trainer.datamodule
        mean = torch.tensor(dm.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(dm.std, device=x.device).view(1, 3, 1, 1)
        x, mask = x[: self.num_images], mask[: self.num_images]
        was_training = pl_module.training
        pl_module.eval()
        rec = pl_module.model.reconstruct(x, mask).float()
        pl_module.train(was_training)
        m = pl_module.model.pixel_mask(mask)  # (B, 1, H, W)
        if pl_module.model.norm_target_patch_size:  # the decoder predicts locally normalised pixels
            mean_loc, std_loc = local_stats(x.float(), pl_module.model.norm_target_patch_size)
            rec = rec * std_loc + mean_loc
        images = [x, x * (1 - m), rec, x * (1 - m) + rec * m]
        images = [(im * std + mean).clamp(0, 1) for im in images]
        rows = torch.stack(images, dim=1).flatten(0, 1)  # (B*4, 3, H, W): one row per image
        return make_grid(rows, nrow=4, padding=2, pad_value=1.0)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        folder = os.path.join(run_dir(trainer), "reconstructions")
        batch = getattr(pl_module, "first_val_batch", None)
        grid = None
        validated = sum(trainer.num_val_batches or [0]) > 0  # the same on every rank
        if validated and is_sharded(pl_module.model):  # a sharded forward is collective: every rank runs it
            grid = self.make_grid(pl_module, *(batch or pl_module.blank_batch()))
        if batch is None or not trainer.is_global_zero:
            return
        grid = self.make_grid(pl_module, *batch) if grid is None else grid
        os.makedirs(folder, exist_ok=True)
        self.last_path = os.path.join(folder, f"{name}.png")
        save_image(grid, self.last_path)
        logger = trainer.logger
        if logger is not None and hasattr(logger.experiment, "add_image"):
            logger.experiment.add_image("reconstruction", grid, trainer.global_step)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if len(batch[0]) and self.seen == 0:  # the epoch's first readable batch
            pl_module.first_val_batch = (batch[0].detach(), batch[1].detach())
        self.seen += len(batch[0])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.seen == 0 and sum(trainer.num_val_batches or [0]):
            rank_zero_warn(
                "no validation image could be decoded (the warnings name them): this validation has no val/loss "
                "and no reconstruction grid; fix or remove the files, or set --data.val_fraction 0"
            )
        if not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer, pl_module, f"epoch_{trainer.current_epoch:03d}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "final")
