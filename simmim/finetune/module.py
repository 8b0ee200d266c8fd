"""Stage 2 system: fine-tune a (SimMIM-)pretrained SwinV2 for classification, at the same or a larger window."""

from __future__ import annotations

import logging
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

import swinv2
from simmim.data.pixel_source import Normalisation
from simmim.errors import require
from simmim.optim import (
    SCHEDULE_KEYS,
    configure_adamw,
    depth_scaled_decay,
    layer_decay_param_groups,
)
from simmim.stage import StageModule
from swinv2.model import EncoderOptions, WindowSpec

log = logging.getLogger(__name__)


class SwinV2Classifier(StageModule):
    """SwinV2 fine-tuning with the official SimMIM fine-tuning recipe (docs/recipes.md).

    Args:
        arch: `swinv2.create_model` name.
        num_classes: Classifier outputs. The command line fills it with the data's class count when unset and
            refuses a value that disagrees; built directly, the module needs it.
        img_size: Input size (linked from the data).
        window_size: Fine-tuning window (int or one per stage).
        pretrained: Checkpoint to start from (our pretraining `.ckpt` or `encoder.safetensors`, official SimMIM or
            SwinV2, timm). None trains from scratch.
        pretrained_window_sizes: Windows of the pretraining run; None: those `pretrained` records (every file
            this project writes) or its `relative_coords_table` implies (official files), else the fine-tuning
            windows (no rescaling).
        drop_path_rate: Stochastic depth (official: 0.1 for B).
        use_checkpoint: Activation checkpointing of every block (memory for compute).
        compile_attention: `torch.compile` the window attention (it compiles at start; docs/speed.md measures
            what it gains).
        encoder_kwargs: Further `SwinTransformerV2` arguments (embed_dim, depths, num_heads, ...).
        base_lr, warmup_lr, min_lr: Per 512 images when `scale_lr` (official B: 1.25e-3, 2.5e-7, 2.5e-7).
        layer_decay: Layer-wise LR decay of a pretrained start, per layer of a `layer_decay_depth`-block model
            (official: 0.75 for B, at its own depth).
        layer_decay_depth: The block count `layer_decay` is meant for: a model of another depth gets the factor that
            gives its lowest layer the same share of the learning rate (`depth_scaled_decay`); None: `layer_decay`
            as it is, whatever the depth.
        scratch_layer_decay: The layer decay of a run from scratch (`pretrained` None): 1.0, none, as supervised
            training from scratch uses; None: the pretrained recipe's.
        mixup, cutmix, mix_prob, switch_prob, label_smoothing: timm Mixup settings (official: 0.8, 1.0, 1, 0.5, 0.1).
        mean, std: The normalisation of the input images; None: ImageNet's for 8-bit RGB, else "auto" (the data
            module works them out); on the command line, the pretrained file's record when it has one. The data
            module takes them from here: its loaders normalise before random erasing, which works on normalised
            pixels; integer images given to the module directly are normalised with them on the device.
        in_chans: Channels per image (on the command line: the data's).
        adapt_channels: Load a `pretrained` file trained for another number of input channels (RGB weights into a
            13-band model: `swinv2.adapt_in_chans`); without it such a file is refused.
    """

    def __init__(
        self,
        arch: str = "swinv2_base",
        num_classes: Optional[int] = None,
        img_size: int = 224,
        window_size: WindowSpec = 14,
        pretrained: Optional[str] = None,
        pretrained_window_sizes: Optional[List[Union[int, Tuple[int, int]]]] = None,
        drop_path_rate: float = 0.1,
        use_checkpoint: bool = False,
        compile_attention: bool = False,
        encoder_kwargs: Optional[EncoderOptions] = None,
        base_lr: float = 1.25e-3,
        warmup_lr: float = 2.5e-7,
        min_lr: float = 2.5e-7,
        scale_lr: bool = True,
        warmup_epochs: float = 20,
        weight_decay: float = 0.05,
        layer_decay: float = 0.75,
        layer_decay_depth: Optional[int] = None,
        scratch_layer_decay: Optional[float] = 1.0,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mix_prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        mean: Normalisation = None,
        std: Normalisation = None,
        in_chans: int = 3,
        adapt_channels: bool = False,
    ) -> None:
        super().__init__(img_size, mean, std, in_chans)
        if num_classes is None:
            raise ValueError("num_classes is required (the fine-tuning command line reads it from --data.root)")
        patch = (encoder_kwargs or {}).get("patch_size", 4)
        require(img_size % patch == 0, "--data.img_size", img_size, f"must be a multiple of the patch size {patch}")
        raw = swinv2.read_checkpoint(pretrained) if pretrained is not None else None
        if pretrained_window_sizes is None and raw is not None:
            pretrained_window_sizes = swinv2.checkpoint_windows(raw)
        self.save_hyperparameters()
        self.hparams.pretrained_window_sizes = pretrained_window_sizes  # as resolved from the checkpoint
        self.model = swinv2.create_model(
            arch,
            img_size=img_size,
            window_size=window_size,
            pretrained_window_sizes=tuple(pretrained_window_sizes) if pretrained_window_sizes else 0,
            num_classes=num_classes,
            drop_path_rate=drop_path_rate,
            use_checkpoint=use_checkpoint,
            **{"in_chans": in_chans, **(encoder_kwargs or {})},
        )
        if compile_attention:
            self.model.compile_attention()
        self.load_report = None
        if pretrained is not None:
            self.load_report = swinv2.load_pretrained(self.model, raw, adapt_channels=adapt_channels)
            log.info("loaded %s:\n%s", pretrained, self.load_report)
        self.mixup = (
            Mixup(
                mixup,
                cutmix,
                prob=mix_prob,
                switch_prob=switch_prob,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            if (mixup > 0 or cutmix > 0) and mix_prob > 0
            else None
        )
        self.soft_ce = SoftTargetCrossEntropy()
        self.layer_decay = self.recipe_layer_decay()

    def recipe_layer_decay(self) -> float:
        """The per-layer decay this run uses: `scratch_layer_decay` from scratch (unless None), else `layer_decay`
        scaled to this model's depth from `layer_decay_depth`."""
        hp = self.hparams
        if hp.pretrained is None and hp.scratch_layer_decay is not None:
            return hp.scratch_layer_decay
        return depth_scaled_decay(
            hp.layer_decay, sum(len(layer.blocks) for layer in self.model.layers), hp.layer_decay_depth
        )

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is not None and getattr(dm, "num_classes", None) not in (None, self.hparams.num_classes):
            raise ValueError(
                f"--model.num_classes {self.hparams.num_classes} disagrees with the data: {dm.describe()}. "
                f"Set --model.num_classes {dm.num_classes}."
            )
        if self.load_report is not None:
            print(f"pretrained weights from {self.hparams.pretrained}:\n{self.load_report}")
        elif self.hparams.scratch_layer_decay is not None and self.trainer.is_global_zero:
            print(
                f"from scratch (--model.pretrained null): the from-scratch recipe, layer decay "
                f"{self.hparams.scratch_layer_decay} (--model.scratch_layer_decay) instead of the pretrained start's"
            )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, _, _ = batch
        x = self.images(x)
        if self.mixup is not None and len(x) % 2 == 0:
            x, target = self.mixup(x, y)
            loss = self.soft_ce(self.model(x).float(), target)
        else:
            loss = F.cross_entropy(self.model(x).float(), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[-1]["lr"])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y, _, _ = batch
        if not len(x):
            return self.join_sharded_forward(self.blank_images())
        logits = self.model(self.images(x)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        metrics = {
            "val/loss": F.cross_entropy(logits, y),
            "val/acc1": (top[:, 0] == y).float().mean() * 100,
            "val/acc5": (top == y[:, None]).any(1).float().mean() * 100,
        }
        self.log_dict(metrics, prog_bar=True, batch_size=len(x), sync_dist=True)

    def predict_step(self, batch, batch_idx: int):
        x, _, index, _ = batch
        if not len(x):  # every file of the batch was unreadable: their CSV rows stay empty
            self.join_sharded_forward(self.blank_images())
            return {"index": index, "pred": index, "prob": index}
        probs = self.model(self.images(x)).float().softmax(-1)
        conf, pred = probs.max(-1)
        return {"index": index, "pred": pred, "prob": conf}

    @property
    def swin(self) -> swinv2.SwinTransformerV2:
        return self.model

    def configure_optimizers(self):
        hp, trainer = self.hparams, self.trainer
        depths = [len(layer.blocks) for layer in self.model.layers]
        groups = layer_decay_param_groups(
            self.model.named_parameters(), depths, hp.weight_decay, self.layer_decay, self.model.no_weight_decay()
        )
        return configure_adamw(trainer, groups, **{k: hp[k] for k in SCHEDULE_KEYS}, schedule="cosine")
