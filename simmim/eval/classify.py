"""What the evaluation tools share: the labelled loader (`simmim.eval.probe`, `simmim.eval.transfer`,
`simmim.eval.activations`; resized, center-cropped images without augmentation) and the controlled classifier
training of the two studies (AdamW with a cosine schedule, cross-entropy, top-1 on a held-out split). Plain PyTorch on
the CPU, so a study's numbers depend on nothing but its arguments and seed."""

from __future__ import annotations

from functools import partial
from typing import Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import swinv2
from simmim.data.folders import LabelledImageDataset
from simmim.data.loaders import IMAGENET_MEAN, IMAGENET_STD, WorkerLoader, collate_readable
from simmim.data.pixels import PixelFormat
from simmim.monitors import ResizeCenterCrop


def loader(
    files: Sequence[str],
    labels: Sequence[int],
    size: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    inputs: Optional[Inputs] = None,
) -> torch.utils.data.DataLoader:
    """(images (B, C, size, size), labels (B,), ...) batches of `files`, shuffled by a generator seeded with `seed`;
    unreadable files are left out of their batch. Workers, if any, start safely for OpenCV (`WorkerLoader`).
    `inputs`: the pixel format and normalisation (`checkpoint_inputs`); None: 8-bit RGB with ImageNet's."""
    fmt, mean, std = inputs if inputs is not None else (None, IMAGENET_MEAN, IMAGENET_STD)
    dataset = LabelledImageDataset(files, labels, ResizeCenterCrop(size, mean, std, fmt), fmt=fmt)
    generator = torch.Generator().manual_seed(seed)
    return WorkerLoader(
        dataset,
        batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        collate_fn=partial(collate_readable, num_fields=3),
    )


Inputs = Tuple[Optional[PixelFormat], Sequence[float], Sequence[float]]


def checkpoint_inputs(path: str, channels: int, raw: Optional[Mapping] = None) -> Optional[Inputs]:
    """(pixel format, mean, std) from the input record of the weights file `path` (`swinv2.read_inputs`: files this
    project writes; `raw`: the file, already read) for an encoder of `channels`; None for a file without one
    (official, timm: 8-bit RGB)."""
    record = swinv2.read_inputs(swinv2.read_checkpoint(path) if raw is None else raw, path)
    if record is None:
        return None
    return PixelFormat(channels, record["depth"]), record["mean"], record["std"]


def fit(model: nn.Module, batches: torch.utils.data.DataLoader, epochs: int, lr: float) -> float:
    """Train `model` with AdamW (weight decay 0.05), a cosine schedule over all steps, cross-entropy. Returns the
    mean training loss of the last epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * len(batches)))
    model.train()
    last = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, y, *_ in batches:
            if len(x) == 0:
                continue
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total, count = total + loss.item() * len(y), count + len(y)
        last = total / max(count, 1)
    return last


@torch.no_grad()
def accuracy(model: nn.Module, batches: torch.utils.data.DataLoader) -> float:
    """Top-1 in percent over every readable image of `batches`."""
    model.eval()
    correct = total = 0
    for x, y, *_ in batches:
        if len(x):
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return 100.0 * correct / max(total, 1)
