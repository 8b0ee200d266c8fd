"""The quick fine-tune monitor: during pretraining, how well would fine-tuning from these weights do?

kNN top-1 (`simmim.knn`) measures frozen features, and masked-image-modelling features are not made for frozen use:
on the built-in digits the kNN top-1 of random weights is higher than after pretraining, while fine-tuning from the
pretrained weights beats fine-tuning from random ones. This monitor measures what pretraining is for instead: a copy
of the encoder gets a fresh linear head and is fine-tuned, every layer, for a fixed number of steps on the labelled
training images, then scored on the labelled validation images (`val/finetune_acc1`, a percentage). Its draws (head,
batch order) come from the run seed alone, so two checkpoints are compared under the same draws; every rank runs the
same fine-tune and logs the same value. `docs/payoff.md` measures how it ranks checkpoints against full fine-tuning.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from typing import Callable, ContextManager, List, Optional, Tuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info

from simmim.errors import DataFolderError
from simmim.knn import PeriodicMonitor, eval_loader
from simmim.labelled import labelled_split
from simmim.optim import depth_scaled_decay, layer_decay_param_groups
from simmim.seeding import monitor_generator


def quick_finetune_top1(
    encoder: torch.nn.Module,
    train: Tuple[torch.Tensor, torch.Tensor],
    val: Tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    steps: int = 100,
    batch_size: int = 32,
    lr: float = 1e-3,
    layer_decay: float = 0.9,
    layer_decay_depth: Optional[int] = 8,
    weight_decay: float = 0.05,
    generator: Optional[torch.Generator] = None,
    autocast: Callable[[], ContextManager] = nullcontext,
) -> float:
    """Top-1 (0-100) on `val` of a copy of `encoder` (a `SwinTransformerV2`, left untouched) with a fresh linear
    head, fine-tuned for `steps` AdamW steps of `batch_size` images drawn from `train` ((images, labels) tensors, the
    images normalised), learning rate `lr` with 10% linear warm-up and a cosine decay to 0, layer decay as the
    fine-tuning stage applies it, label smoothing 0.1. Every random draw (head, batches, drop-path) comes from
    `generator`; the global generators are left as they were. `autocast`: a context-manager factory for the forward
    passes (the trainer's precision)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(encoder.parameters()).device
    # the global generators (drop-path, dropout, the head's default init) are forked and seeded from `generator`:
    # the same draws on every rank and at every check, and the training run's own draws left as they were
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(generator.initial_seed())  # without advancing `generator`
        model = copy.deepcopy(encoder).float()
        model.head = torch.nn.Linear(model.num_features, num_classes).to(device)
        with torch.no_grad():
            model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator).clamp_(-2, 2) * 0.02)
            model.head.bias.zero_()
        depths = [len(layer.blocks) for layer in model.layers]
        decay = depth_scaled_decay(layer_decay, sum(depths), layer_decay_depth)
        groups = layer_decay_param_groups(
            model.named_parameters(), depths, weight_decay, decay, model.no_weight_decay()
        )
        optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr)
        warmup = max(1, steps // 10)
        images, labels = train
        model.train()
        for step in range(steps):
            if step < warmup:
                factor = (step + 1) / warmup
            else:
                factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
            for g in optimizer.param_groups:
                g["lr"] = lr * factor * g["lr_scale"]
            pick = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
            with autocast():
                logits = model(images[pick].to(device)).float()
            loss = F.cross_entropy(logits, labels[pick].to(device), label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(val[0]), 256):
                with autocast():
                    logits = model(val[0][start : start + 256].to(device)).float()
                correct += (logits.argmax(1) == val[1][start : start + 256].to(device)).sum().item()
        return 100.0 * correct / max(len(val[0]), 1)


def load_images(
    files: List, labels: List[int], img_size: int, trainer: Optional[pl.Trainer] = None, num_workers: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of every readable file, resized and center-cropped to `img_size` and normalised."""
    xs, ys = [], []
    for x, y, *_ in eval_loader(files, labels, img_size, 256, num_workers, trainer):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


class QuickFinetuneMonitor(PeriodicMonitor):
    """Before training (a fresh run) and every `every_n_epochs` training epochs, `quick_finetune_top1` of the
    encoder on a labelled image folder, logged as `val/finetune_acc1`.

    Args:
        root: Class folders (`root/train/<class>` and `root/val/<class>`, or `root/<class>` split by
            `val_fraction`); None: the built-in digits.
        img_size: The size images are resized and center-cropped to.
        every_n_epochs: How often.
        steps, batch_size, lr: The fine-tune's length, batch and peak learning rate.
        label_fraction: The share of each class's training labels it fine-tunes on (the low-label case).
        max_images: At most this many training and this many validation images are kept in memory (a fixed,
            evenly spread pick).
        num_workers: The loader's, to read the images once.
        option: The setting that gave `root`, named in errors.
    """

    metric = "val/finetune_acc1"
    off_hint = "fine-tune the exported encoder instead, or --model.finetune_every_n_epochs 0 to silence this"

    def __init__(
        self,
        root: Optional[str],
        img_size: int,
        every_n_epochs: int = 5,
        steps: int = 100,
        batch_size: int = 32,
        lr: float = 1e-3,
        label_fraction: float = 0.1,
        val_fraction: float = 0.2,
        max_images: int = 2000,
        num_workers: int = 0,
        option: str = "--model.knn_root",
    ) -> None:
        super().__init__(every_n_epochs)
        self.root, self.img_size = root, img_size
        self.steps, self.batch_size, self.lr, self.label_fraction = steps, batch_size, lr, label_fraction
        self.val_fraction, self.max_images = val_fraction, max_images
        self.num_workers, self.option = num_workers, option
        self.data: Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None
        self.num_classes = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Reads the images once they exist (the data module writes the built-in digits in `prepare_data`)."""
        if self.data is not None:
            return
        tf, tl, vf, vl, classes = labelled_split(self.root, self.val_fraction, self.label_fraction, self.option)
        tf, tl, vf, vl = (_spread(v, self.max_images) for v in (tf, tl, vf, vl))
        if not tf or not vf:
            raise DataFolderError(
                f"{self.option} {self.root}: the quick fine-tune monitor needs labelled images on both sides "
                f"({len(tf)} to train, {len(vf)} to score): add images, or give train/ and val/ folders"
            )
        self.num_classes = len(classes)
        self.data = (
            load_images(tf, tl, self.img_size, trainer, self.num_workers),
            load_images(vf, vl, self.img_size, trainer, self.num_workers),
        )
        rank_zero_info(
            f"quick fine-tune monitor: {len(classes)} classes, {len(self.data[0][1])} train / {len(self.data[1][1])} "
            f"val images, {self.steps} steps every {self.every_n_epochs} epoch(s), logged as val/finetune_acc1"
        )

    def accuracy(self, pl_module: pl.LightningModule) -> float:
        precision = pl_module.trainer.precision_plugin
        return quick_finetune_top1(
            pl_module.encoder,
            *self.data,
            self.num_classes,
            self.steps,
            self.batch_size,
            self.lr,
            generator=monitor_generator(),
            autocast=precision.forward_context,
        )


def _spread(items: List, limit: int) -> List:
    """At most `limit` items, evenly spread over the list (classes stay represented in sorted folder order)."""
    if len(items) <= limit:
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]
