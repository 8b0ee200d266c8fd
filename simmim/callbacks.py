"""Pretraining callbacks: reconstruction grids and the encoder export."""

from __future__ import annotations

import os
from typing import Mapping, Optional

import pytorch_lightning as pl
import torch
from safetensors.torch import save_file
from torchvision.utils import make_grid, save_image

from simmim.model import local_stats


def run_dir(trainer: pl.Trainer) -> str:
    """The run's folder: the logger's version folder, or the root dir without a logger.

    Collective under DDP (`trainer.log_dir` broadcasts): call it on every rank, before any rank-zero check."""
    return trainer.log_dir or trainer.default_root_dir


def save_weights(path: str, state_dict: Mapping[str, torch.Tensor], **metadata: str) -> str:
    """Write `state_dict` as safetensors (detached, on CPU, contiguous) with string `metadata`; returns `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, path, metadata=metadata)
    return path


class ReconstructionGrid(pl.Callback):
    """Every `every_n_epochs` and at the end of fit, save a PNG grid from the first validation batch.

    Columns: original, masked input, reconstruction, reconstruction pasted into the visible pixels.
    Files: `<run>/reconstructions/epoch_XXX.png` (and `final.png`); also logged to TensorBoard when active.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.last_path: Optional[str] = None

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
        if batch is None or not trainer.is_global_zero:
            return
        grid = self.make_grid(pl_module, *batch)
        os.makedirs(folder, exist_ok=True)
        self.last_path = os.path.join(folder, f"{name}.png")
        save_image(grid, self.last_path)
        logger = trainer.logger
        if logger is not None and hasattr(logger.experiment, "add_image"):
            logger.experiment.add_image("reconstruction", grid, trainer.global_step)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and len(batch[0]):
            pl_module.first_val_batch = (batch[0].detach(), batch[1].detach())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer, pl_module, f"epoch_{trainer.current_epoch:03d}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "final")


# Checkpoint entry recording the encoder's per-stage (h, w) windows, read back as `pretrained_window_sizes`.
WINDOWS_KEY = "swinv2_window_sizes"


class ExportEncoder(pl.Callback):
    """At the end of fit, write the encoder (official key layout, with `mask_token`) to `<run>/encoder.safetensors`;
    `swinv2.load_pretrained` reads it."""

    def __init__(self) -> None:
        self.path: Optional[str] = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[WINDOWS_KEY] = [list(w) for w in pl_module.encoder.window_sizes]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = os.path.join(run_dir(trainer), "encoder.safetensors")
        if not trainer.is_global_zero:
            return
        windows = ",".join(f"{h}x{w}" for h, w in pl_module.encoder.window_sizes)
        meta = {"format": "swinv2-official", "arch": str(pl_module.hparams.arch), "window_sizes": windows}
        self.path = save_weights(path, pl_module.encoder.state_dict(), **meta)
