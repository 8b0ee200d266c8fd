"""What pretraining measures beside its loss: two monitors of labelled images, each a Lightning callback.

- **kNN top-1 of frozen features** (`KNNMonitor`, `val/knn_acc1`): the weighted kNN common in self-supervised
  learning: features average-pooled after the final norm and L2-normalised, cosine similarity, the k nearest
  training features each voting for its class with weight exp(similarity / temperature).
- **Quick fine-tune top-1** (`QuickFinetuneMonitor`, `val/finetune_acc1`): what fine-tuning from the current
  weights gives: a copy of the encoder fine-tuned every layer for a few steps on a tenth of the labels.

Both share their schedule (`PeriodicMonitor`) and read labelled images through `eval_loader`.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from simmim.data.crops import Normalise, resize
from simmim.data.folders import LabelledImageDataset, labelled_split
from simmim.data.index import FileIndex, agreed_index, folder_index
from simmim.data.loaders import IMAGENET_MEAN, IMAGENET_STD, collate_readable, make_loader
from simmim.data.pixels import RGB8, PixelFormat
from simmim.distributed import is_sharded
from simmim.errors import DataFolderError
from simmim.optim import depth_scaled_decay, layer_decay_param_groups
from simmim.seeding import monitor_generator


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy (0-1) of the weighted kNN classifier above; `chunk` validation rows at a time."""
    train = F.normalize(train_features.float(), dim=1)
    val = F.normalize(val_features.float(), dim=1)
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(val), chunk):
        similarity, nearest = (val[start : start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(similarity), num_classes, device=val.device, dtype=val.dtype)
        votes.scatter_add_(1, train_labels[nearest], (similarity / temperature).exp())
        correct += (votes.argmax(1) == val_labels[start : start + chunk]).sum().item()
    return correct / max(len(val), 1)


class ResizeCenterCrop:
    """(H, W, C) pixels of the format `fmt` (`simmim.data.pixels`; None: uint8 RGB) -> normalised float (C, size,
    size): the short side resized to `size` (area interpolation when shrinking, bicubic when enlarging), then the
    center square; `(x / full_range - mean) / std` per channel (`full_range`: 255 for 8-bit, 65535 for 16-bit, 1 for
    float pixels)."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        fmt: Optional[PixelFormat] = None,
    ):
        self.size = size
        self.normalise = Normalise(mean, std, (fmt or RGB8).full_range)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        image = image[:, :, None] if image.ndim == 2 else image  # a gray image given as (H, W)
        h, w = image.shape[:2]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        if (nh, nw) != (h, w):
            image = resize(image, (nw, nh), cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        return self.normalise(image[top : top + self.size, left : left + self.size])


def training_inputs(pl_module: pl.LightningModule) -> dict:
    """The pretraining module's normalisation and its data's pixel format: the monitors read their images as the
    training images are read."""
    data = getattr(pl_module._trainer, "datamodule", None)
    # the data module's when it worked them out ("auto": its `setup` runs before any callback's, the module's after)
    own = getattr(data, "mean", None) is not None
    mean, std = (data.mean, data.std) if own else (pl_module.mean, pl_module.std)
    pixels = getattr(data, "pixels", None)  # 8-bit RGB: read as ever (16-bit and float files rescaled)
    return {"mean": mean, "std": std, "fmt": None if pixels == RGB8 else pixels}


def eval_loader(
    files: List,
    labels: List[int],
    img_size: int,
    batch_size: int,
    num_workers: int,
    trainer=None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    fmt: Optional[PixelFormat] = None,
):
    """In-order (images, labels, index, readable) batches of labelled files, resized and center-cropped to `img_size`
    and normalised with `mean` and `std`; unreadable files are left out of their batch with a warning. `fmt`: the
    pixel format they are read in (`simmim.data.pixels`; None: 8-bit RGB, 16-bit and float files rescaled)."""
    dataset = LabelledImageDataset(files, labels, ResizeCenterCrop(img_size, mean, std, fmt), fmt=fmt)
    return make_loader(dataset, batch_size, num_workers, False, partial(collate_readable, num_fields=3), trainer)


@torch.no_grad()
def embed(encoder: torch.nn.Module, batches, device: torch.device, precision=None) -> Tuple[torch.Tensor, ...]:
    """(features, labels) of every readable image of `batches` ((images, labels, ...) tuples): the encoder's
    average-pooled final features, in float32 on `device`. `precision`: a Lightning precision plugin, whose
    autocast and input dtype the forward passes use."""
    features, labels = [], []
    for x, y, *_ in batches:
        if len(x) == 0:
            continue
        x = x.to(device)
        if precision is None:
            f = encoder.forward_head(encoder.forward_features(x), pre_logits=True)
        else:
            with precision.forward_context():
                f = encoder.forward_head(encoder.forward_features(precision.convert_input(x)), pre_logits=True)
        features.append(f.float())
        labels.append(y.to(device))
    if not features:
        width = getattr(encoder, "num_features", 0)
        return torch.empty(0, width, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(labels)


class PeriodicMonitor(pl.Callback):
    """A score of the encoder during pretraining: before training (a fresh run only) and every `every_n_epochs`
    training epochs, `accuracy(pl_module)` (a percentage) logged as `metric`. Off under a sharded strategy, with a
    warning naming `off_hint`."""

    metric = ""
    off_hint = ""

    def __init__(self, every_n_epochs: int) -> None:
        self.every_n_epochs = every_n_epochs
        self.first: Optional[float] = None  # the accuracy before training, in percent (a fresh run)
        self.last: Optional[float] = None  # the latest accuracy, in percent

    def accuracy(self, pl_module: pl.LightningModule) -> float:
        raise NotImplementedError

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The starting point (a fresh run only): what the initial weights give, written to the logger at step 0
        (a value logged through the module here would only reach it at the end of epoch 0, overwritten)."""
        if is_sharded(pl_module):
            self.every_n_epochs = 0
            rank_zero_warn(f"the {self.metric} monitor is off under a sharded strategy (fsdp2): {self.off_hint}")
        if self.every_n_epochs > 0 and trainer.global_step == 0:
            self.first = self.accuracy(pl_module)
            if trainer.is_global_zero and trainer.logger is not None:
                trainer.logger.log_metrics({self.metric: self.first}, step=0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs <= 0 or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.last = self.accuracy(pl_module)
        pl_module.log(self.metric, self.last, sync_dist=False, rank_zero_only=False)


class KNNMonitor(PeriodicMonitor):
    """Before training (a fresh run) and every `every_n_epochs` training epochs, the kNN top-1 of the encoder's
    features on a labelled image folder, logged as `val/knn_acc1` (a percentage). Under DDP each rank embeds its
    share of the images and the features are gathered, so every rank computes the same value over the whole set.

    Args:
        root: Class folders (`root/train/<class>` and `root/val/<class>`, or `root/<class>` split by
            `val_fraction`); None: the built-in digits.
        img_size: The size images are resized and center-cropped to.
        every_n_epochs: How often.
        k, temperature: The classifier's settings.
        batch_size, num_workers: The embedding loader's.
        val_fraction: Held-out share when `root` has no train/ and val/ folders.
        option: The setting that gave `root`, named in errors.
    """

    metric = "val/knn_acc1"
    off_hint = (
        "run `python -m simmim.probe` on the exported encoder instead, or --model.knn_every_n_epochs 0 to silence this"
    )

    def __init__(
        self,
        root: Optional[str],
        img_size: int,
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        option: str = "--model.knn_root",
    ) -> None:
        super().__init__(every_n_epochs)
        self.root, self.img_size = root, img_size
        self.k, self.temperature, self.batch_size, self.num_workers = k, temperature, batch_size, num_workers
        self.val_fraction, self.option = val_fraction, option
        self.classes: Optional[List[str]] = None
        self.counts: Tuple[int, int] = (0, 0)  # the (train, val) images it was computed over, all ranks together

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Lists the images once they exist (the data module writes the built-in digits in `prepare_data`)."""
        if self.classes is not None:
            return
        split = labelled_split(self.root, self.val_fraction, option=self.option, index_of=agreed_on(trainer))
        self.train_files, self.train_labels, self.classes = split.train_files, split.train_labels, split.classes
        self.val_files, self.val_labels = split.val_files, split.val_labels
        if not self.train_files or not self.val_files:
            raise DataFolderError(
                f"{self.option} {self.root}: the kNN monitor needs images on both sides ({len(self.train_files)} to "
                f"vote, {len(self.val_files)} to classify): add images, or give train/ and val/ folders"
            )
        rank_zero_info(
            f"kNN monitor: {len(self.classes)} classes, {len(self.train_files)} train / {len(self.val_files)} val "
            f"images, every {self.every_n_epochs} epoch(s), logged as val/knn_acc1"
        )

    def _gathered_features(self, pl_module: pl.LightningModule, files: List, labels: List[int]):
        trainer = pl_module.trainer
        rank, world = trainer.global_rank, trainer.world_size
        per_rank = math.ceil(len(files) / world)
        real = list(range(rank, len(files), world))
        filler = per_rank - len(real)  # equal batch counts on every rank (sharded forwards): padded, label -1
        mine = real + [real[-1] if real else 0] * filler
        own_labels = [labels[i] for i in real] + [-1] * filler
        norm = training_inputs(pl_module)
        images = [files[i] for i in mine]
        loader = eval_loader(images, own_labels, self.img_size, self.batch_size, self.num_workers, trainer, **norm)
        encoder = pl_module.encoder
        features, own = embed(encoder, loader, pl_module.device, trainer.precision_plugin)
        rows = torch.full((per_rank, encoder.num_features), float("nan"), device=pl_module.device)
        row_labels = torch.full((per_rank,), -1, dtype=torch.long, device=pl_module.device)
        rows[: len(features)], row_labels[: len(own)] = features, own  # unreadable files: their rows stay -1
        if world > 1:
            rows, row_labels = pl_module.all_gather(rows).flatten(0, 1), pl_module.all_gather(row_labels).flatten()
        keep = row_labels >= 0
        return rows[keep], row_labels[keep]

    def accuracy(self, pl_module: pl.LightningModule) -> float:
        """kNN top-1 in percent, with the encoder in eval mode (then back to its mode)."""
        encoder = pl_module.encoder
        was_training = encoder.training
        encoder.eval()
        try:
            train = self._gathered_features(pl_module, self.train_files, self.train_labels)
            val = self._gathered_features(pl_module, self.val_files, self.val_labels)
        finally:
            encoder.train(was_training)
        self.counts = (len(train[1]), len(val[1]))
        return 100.0 * knn_top1(*train, *val, len(self.classes), self.k, self.temperature)


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
    files: List,
    labels: List[int],
    img_size: int,
    trainer: Optional[pl.Trainer] = None,
    num_workers: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    fmt: Optional[PixelFormat] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of every readable file, resized and center-cropped to `img_size` and normalised."""
    xs, ys = [], []
    for x, y, *_ in eval_loader(files, labels, img_size, 256, num_workers, trainer, mean, std, fmt):
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
        split = labelled_split(self.root, self.val_fraction, self.label_fraction, self.option, agreed_on(trainer))
        tf, tl, vf, vl = (_spread(v, self.max_images) for v in split[:4])
        classes = split.classes
        if not tf or not vf:
            raise DataFolderError(
                f"{self.option} {self.root}: the quick fine-tune monitor needs labelled images on both sides "
                f"({len(tf)} to train, {len(vf)} to score): add images, or give train/ and val/ folders"
            )
        self.num_classes = len(classes)
        norm = training_inputs(pl_module)
        self.data = (
            load_images(tf, tl, self.img_size, trainer, self.num_workers, **norm),
            load_images(vf, vl, self.img_size, trainer, self.num_workers, **norm),
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


def agreed_on(trainer: pl.Trainer) -> Callable[[Path], FileIndex]:
    """A monitor's folders through their file indexes (the default cache), the same on every rank of `trainer`
    (`agreed_index`): a monitor's numbers are gathered or compared across ranks."""
    return lambda folder: agreed_index(trainer, lambda: folder_index(folder), folder)


def _spread(items: List, limit: int) -> List:
    """At most `limit` items, evenly spread over the list (classes stay represented in sorted folder order)."""
    if len(items) <= limit:
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]
