"""Stage 1 system: SimMIM pretraining of a SwinV2 encoder as a LightningModule."""

from __future__ import annotations

import time
from typing import List, Optional, Tuple, Union

import pytorch_lightning as pl
import torch

import swinv2
from simmim.errors import require
from simmim.monitors import KNNMonitor, QuickFinetuneMonitor
from simmim.optim import SCHEDULE_KEYS, configure_adamw, param_groups_weight_decay
from simmim.pretrain.data import PretrainDataModule
from simmim.pretrain.model import SimMIM
from simmim.stage import StageModule
from swinv2.model import EncoderOptions, WindowSpec


class SimMIMPretrainer(StageModule):
    """SimMIM pretraining with the official SwinV2 recipe (docs/recipes.md).

    Args:
        arch: `swinv2.create_model` name.
        img_size: Input size (linked from the data).
        patch_size: Encoder patch size (linked to the data's mask generator).
        window_size: Window per stage (int or one per stage).
        drop_path_rate: Stochastic depth.
        use_checkpoint: Activation checkpointing of every block (memory for compute).
        compile_attention: `torch.compile` the window attention (it compiles at start; docs/speed.md measures
            what it gains).
        encoder_kwargs: Further `SwinTransformerV2` arguments (embed_dim, depths, num_heads, use_checkpoint, ...).
        norm_target_patch_size: Local target normalisation window (official: 47); None for raw pixels.
        base_lr, warmup_lr, min_lr: Per 512 images when `scale_lr` (official: 1e-4, 5e-7, 5e-6).
        scale_lr: Apply lr * total_batch / 512 (total batch = per-device batch x devices x accumulation).
        warmup_epochs: Linear warmup length.
        lr_schedule: "multistep" (official pretraining) or "cosine".
        milestones: Epochs at which multistep multiplies the LR by `gamma` (official: [700]).
        weight_decay, betas, eps: AdamW.
        knn_root: Labelled class folders for the monitors (`DIR/train/<class>` and `DIR/val/<class>`, or
            `DIR/<class>` split 80/20). None: the built-in digits' labels when pretraining on the built-in digits,
            otherwise no monitor.
        knn_every_n_epochs: The kNN monitor's period in training epochs (`val/knn_acc1`, `simmim.monitors`: frozen
            features); 0 turns it off.
        knn_k: Neighbours that vote (temperature 0.07).
        finetune_every_n_epochs: The quick fine-tune monitor's period (`val/finetune_acc1`,
            `simmim.monitors`: what fine-tuning from these weights gives); 0 turns it off.
        finetune_steps: Its fine-tune's length in steps of 32 images.
        mean, std: The normalisation of the input images, applied on the training device; None: ImageNet's for
            8-bit RGB, else "auto" (the data module works them out from the training images; the checkpoint
            records the values). The loss compares normalised pixels, and the monitors normalise their images the
            same way.
        in_chans: Channels per image (on the command line: the data's, `--data.channels` or its first image's).
        pretrained: Encoder weights to continue pretraining from (any file `swinv2.load_pretrained` reads: ours,
            official SimMIM or SwinV2, timm, transformers); the decoder starts afresh. None: from scratch.
        adapt_channels: Load a `pretrained` file trained for another number of input channels (RGB weights into a
            13-band encoder: `swinv2.adapt_in_chans`); without it such a file is refused.
    """

    SHARDED_FORWARD_METHODS = ("reconstruct",)  # the reconstruction grid's forward

    def __init__(
        self,
        arch: str = "swinv2_base",
        img_size: int = 192,
        patch_size: int = 4,
        window_size: WindowSpec = 12,
        drop_path_rate: float = 0.1,
        use_checkpoint: bool = False,
        compile_attention: bool = False,
        encoder_kwargs: Optional[EncoderOptions] = None,
        norm_target_patch_size: Optional[int] = 47,
        base_lr: float = 1e-4,
        warmup_lr: float = 5e-7,
        min_lr: float = 5e-6,
        scale_lr: bool = True,
        warmup_epochs: float = 10,
        lr_schedule: str = "multistep",
        milestones: Tuple[int, ...] = (700,),
        gamma: float = 0.1,
        weight_decay: float = 0.05,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        knn_root: Optional[str] = None,
        knn_every_n_epochs: int = 1,
        knn_k: int = 20,
        finetune_every_n_epochs: int = 0,
        finetune_steps: int = 100,
        mean: Optional[Union[List[float], str]] = None,
        std: Optional[Union[List[float], str]] = None,
        in_chans: int = 3,
        pretrained: Optional[str] = None,
        adapt_channels: bool = False,
    ) -> None:
        super().__init__(img_size, mean, std, in_chans)
        self.save_hyperparameters()
        encoder = swinv2.create_model(
            arch,
            img_size=img_size,
            patch_size=patch_size,
            window_size=window_size,
            drop_path_rate=drop_path_rate,
            use_checkpoint=use_checkpoint,
            num_classes=0,
            mask_token=True,
            **{"in_chans": in_chans, **(encoder_kwargs or {})},
        )
        require(
            encoder.in_chans == in_chans, "--model.encoder_kwargs", encoder_kwargs, f"in_chans: the data has {in_chans}"
        )
        self.load_report = None
        if pretrained is not None:  # continued pretraining: the encoder's weights, the decoder afresh
            self.load_report = swinv2.load_pretrained(encoder, pretrained, adapt_channels=adapt_channels)
        if compile_attention:
            encoder.compile_attention()
        self.model = SimMIM(encoder, encoder.encoder_stride, norm_target_patch_size)
        self._t_batch = time.perf_counter()

    @property
    def encoder(self) -> swinv2.SwinTransformerV2:
        return self.model.encoder

    @property
    def swin(self) -> swinv2.SwinTransformerV2:
        return self.model.encoder

    def on_fit_start(self) -> None:
        if self.load_report is not None and self.trainer.is_global_zero:
            print(f"continued pretraining from {self.hparams.pretrained}:\n{self.load_report}")

    def configure_callbacks(self) -> List[pl.Callback]:
        """The monitors, when they have labelled images: `knn_root`, or the labels that come with the data
        (`PretrainDataModule.labels`: the built-in digits')."""
        hp = self.hparams
        datamodule = self.trainer.datamodule if isinstance(self.trainer.datamodule, PretrainDataModule) else None
        root = hp.knn_root if hp.knn_root is not None else datamodule and datamodule.labels
        if root is None:
            return []
        workers = datamodule.num_workers if datamodule is not None else 0
        monitors: List[pl.Callback] = []
        if hp.knn_every_n_epochs > 0:
            monitors.append(KNNMonitor(root, hp.img_size, hp.knn_every_n_epochs, hp.knn_k, num_workers=workers))
        if hp.finetune_every_n_epochs > 0:
            monitors.append(
                QuickFinetuneMonitor(
                    root, hp.img_size, hp.finetune_every_n_epochs, hp.finetune_steps, num_workers=workers
                )
            )
        return monitors

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, mask, _ = batch
        x = self.images(x)
        loss = self.model(x, mask)
        now = time.perf_counter()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/throughput_img_s", len(x) / max(now - self._t_batch, 1e-9))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        self._t_batch = now
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, mask, _ = batch
        x = self.images(x)
        if len(x):
            self.log("val/loss", self.model(x, mask), prog_bar=True, batch_size=len(x), sync_dist=True)
        else:
            self.join_sharded_forward(*self.blank_batch())

    def blank_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """One black, unmasked image and its mask: a stand-in for a rank that has no image to feed a sharded
        forward (`join_sharded_forward`, the reconstruction grid)."""
        x = self.blank_images()
        grid = self.input_size // self.hparams.patch_size
        return x, torch.zeros(1, grid, grid, dtype=torch.bool, device=self.device)

    def configure_optimizers(self):
        hp = self.hparams
        skip = {f"model.encoder.{n}" for n in self.encoder.no_weight_decay()}
        groups = param_groups_weight_decay(self.named_parameters(), hp.weight_decay, skip)
        return configure_adamw(
            self.trainer,
            groups,
            **{k: hp[k] for k in SCHEDULE_KEYS},
            schedule=hp.lr_schedule,
            milestone_epochs=hp.milestones,
            gamma=hp.gamma,
        )
