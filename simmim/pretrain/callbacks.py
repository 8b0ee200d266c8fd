"""Pretraining callbacks: reconstruction grids."""

from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torchvision.utils import make_grid, save_image

from simmim.checkpointing.exports import run_dir
from simmim.data.pixels import RGB8
from simmim.distributed import is_sharded
from simmim.errors import require
from simmim.pretrain.model import local_stats


class ReconstructionGrid(pl.Callback):
    """Every `every_n_epochs` and at the end of fit, save a PNG grid of `num_images` validation images spread evenly
    over the validation set (in file order the first batch would often hold one class folder only).

    Columns: original, masked input, reconstruction, reconstruction pasted into the visible pixels.
    Files: `<run>/reconstructions/epoch_XXX.png` (and `final.png`); also logged to TensorBoard when active.
    Images of other than 8-bit RGB show `bands` (`display_bands`) with a per-band percentile stretch.

    Args:
        every_n_epochs: The period in epochs.
        num_images: Rows of the grid.
        bands: The channels shown as red, green, blue (or one, as gray), numbered from 1; None: the first three
            (or the first, for fewer than three).
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8, bands: Optional[List[int]] = None) -> None:
        require(
            every_n_epochs >= 1,
            "--grid.every_n_epochs",
            every_n_epochs,
            "must be at least 1 (a period longer than the run writes only the final grid)",
        )
        require(num_images >= 1, "--grid.num_images", num_images, "must be at least 1")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.bands = bands
        self.last_path: Optional[str] = None
        self.seen = 0  # readable validation images in the current validation epoch
        self.stride = 1  # take every stride-th of them
        self.picked: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.batch: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # the images and masks the grid shows

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        display_bands(getattr(pl_module, "channels", 3), self.bands, "--grid.bands")  # refused at the start

    def why_none(self, trainer: pl.Trainer) -> str:
        """Why no grid was written (for the end-of-run summary)."""
        if not trainer.num_val_batches or not sum(trainer.num_val_batches):
            return "none: no validation images (--data.val_fraction)"
        return "none: no validation image could be decoded"

    def make_grid(self, pl_module: pl.LightningModule, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        was_training = pl_module.training
        pl_module.eval()
        try:
            x, mask = x[: self.num_images], mask[: self.num_images]
            pixels = getattr(pl_module.trainer.datamodule, "pixels", RGB8) if pl_module._trainer else RGB8
            bands = display_bands(x.shape[1], self.bands, "--grid.bands")
            return reconstruction_grid(pl_module.model, x, mask, pl_module.mean, pl_module.std, bands, pixels != RGB8)
        finally:
            pl_module.train(was_training)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        folder = os.path.join(run_dir(trainer), "reconstructions")
        batch = self.batch
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
        self.seen, self.picked = 0, []
        files = getattr(trainer.datamodule, "val_files", None)
        if files:  # this rank's share of the validation images
            share = math.ceil(len(files) / getattr(trainer, "world_size", 1))
        else:  # at most
            share = sum(trainer.num_val_batches or [0]) * getattr(trainer.datamodule, "batch_size", 1)
        self.stride = max(1, int(share) // self.num_images)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        x, mask = batch[0], batch[1]
        for i in range(len(x)):
            if (self.seen + i) % self.stride == 0 and len(self.picked) < self.num_images:
                self.picked.append((x[i].detach().clone(), mask[i].detach().clone()))  # not the whole batch
        self.seen += len(x)
        if self.picked and (len(self.picked) == self.num_images or batch_idx + 1 == sum(trainer.num_val_batches)):
            self.batch = tuple(torch.stack(t) for t in zip(*self.picked))

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


def display_bands(channels: int, bands: Optional[Sequence[int]], option: str = "--bands") -> List[int]:
    """The channels (from 0) that show an image of `channels` as RGB, or as gray where one: `bands` (numbered from
    1, as GDAL and most band lists number them), else the first three, or the first."""
    if bands is None:
        return [0, 1, 2] if channels >= 3 else [0]
    require(
        len(bands) in (1, 3) and all(isinstance(b, int) and 1 <= b <= channels for b in bands),
        option,
        list(bands),
        f"must be one or three band numbers in 1..{channels} (red, green, blue; or one shown as gray)",
    )
    return [b - 1 for b in bands]


def percentile_stretch(images: List[torch.Tensor], low: float = 0.02, high: float = 0.98) -> List[torch.Tensor]:
    """Every tensor of `images` (B, C, H, W) mapped per band so that the `low` and `high` quantiles of the first one
    become 0 and 1: the display of 16-bit, float and multi-band pixels, which seldom fill their range."""
    flat = images[0].transpose(0, 1).flatten(1).float()
    lo, hi = (torch.quantile(flat, q, dim=1).view(1, -1, 1, 1) for q in (low, high))
    scale = (hi - lo).clamp(min=1e-12)
    return [(im - lo) / scale for im in images]


@torch.no_grad()
def reconstruction_grid(
    model, x: torch.Tensor, mask: torch.Tensor, mean, std, bands: Optional[List[int]] = None, stretch: bool = False
) -> torch.Tensor:
    """A (3, H', W') image grid, one row per image of the normalised batch `x`: the original, the masked input, the
    reconstruction and the reconstruction pasted into the visible pixels. `model` is a `SimMIM` (eval mode).
    `bands` (channels from 0, `display_bands`) are shown; `stretch`: per band, by percentiles (else the pixels as
    fractions of their range, clipped)."""
    channels = x.shape[1]
    mean = torch.tensor(mean, device=x.device).view(1, channels, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, channels, 1, 1)
    rec = model.reconstruct(x, mask).float()
    m = model.pixel_mask(mask)  # (B, 1, H, W)
    if model.norm_target_patch_size:  # the decoder predicts locally normalised pixels
        mean_loc, std_loc = local_stats(x.float(), model.norm_target_patch_size)
        rec = rec * std_loc + mean_loc
    images = [x, x * (1 - m), rec, x * (1 - m) + rec * m]
    picked = display_bands(channels, None) if bands is None else bands
    images = [(im * std + mean)[:, picked] for im in images]
    images = [im.clamp(0, 1).expand(-1, 3, -1, -1) for im in (percentile_stretch(images) if stretch else images)]
    rows = torch.stack(images, dim=1).flatten(0, 1)  # (B*4, 3, H, W): one row per image
    return make_grid(rows, nrow=4, padding=2, pad_value=1.0)
