"""Linear probe: a linear classifier trained on frozen encoder features, the standard measure of what pretraining
learned. `python -m simmim.probe --checkpoint encoder.safetensors [--data.root DIR]` prints its top-1.

Features are computed once (cached), average-pooled over positions, from the final stage after the final norm by
default, or from an earlier stage (`--stage`) and/or without the final norm (`--no_final_norm`). The classifier is a
per-feature standardisation (a BatchNorm without affine parameters, as in MAE's linear probe) and a linear layer,
trained with AdamW and a cosine schedule on the cached features.
"""

from __future__ import annotations

import argparse
import time
from typing import List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import swinv2
from simmim.data.builtin import labelled_root
from simmim.data.folders import labelled_split
from simmim.errors import ConfigError
from simmim.eval.classify import Inputs, checkpoint_inputs, loader


@torch.no_grad()
def stage_features(
    encoder: swinv2.SwinTransformerV2, x: torch.Tensor, stage: int = -1, final_norm: bool = True
) -> torch.Tensor:
    """(B, C) average-pooled features of `stage` (0-based; -1: the last), after the final norm when `final_norm`
    and `stage` is the last. A stage's output includes its patch merging (the downsample at the end of every stage
    but the last), so stage i < last gives twice its blocks' width."""
    last = len(encoder.layers) - 1
    stage = last if stage == -1 else stage
    if not 0 <= stage <= last:
        raise ConfigError(f"--stage {stage}: the encoder has stages 0 to {last} (-1: the last)")
    h = encoder.embed(x)
    for layer in encoder.layers[: stage + 1]:
        h = layer(h)
    if stage == last and final_norm:
        h = encoder.norm(h)
    return h.mean(dim=(1, 2))


def cached_features(
    encoder: swinv2.SwinTransformerV2,
    files: Sequence,
    labels: Sequence[int],
    img_size: int,
    stage: int,
    final_norm: bool,
    batch_size: int = 128,
    num_workers: int = 0,
    inputs: Optional[Inputs] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every readable image (resized, center-cropped to `img_size`; `inputs`: the pixel
    format and normalisation, `simmim.eval.classify.loader`)."""
    feats, ys = [], []
    for x, y, *_ in loader(files, labels, img_size, batch_size, False, 0, num_workers, inputs):
        if len(x):
            feats.append(stage_features(encoder, x, stage, final_norm))
            ys.append(y)
    return torch.cat(feats), torch.cat(ys)


def train_linear(
    train: Tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> nn.Module:
    """A standardise-then-linear classifier trained on cached (features, labels) with cross-entropy."""
    torch.manual_seed(seed)
    x, y = train
    head = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False), nn.Linear(x.shape[1], num_classes))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, -(-len(x) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()


@torch.no_grad()
def top1(head: nn.Module, data: Tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = data
    return 100.0 * (head(x).argmax(1) == y).float().mean().item()


def load_encoder(
    checkpoint: str, img_size: Optional[int], random_init: bool, raw: Optional[Mapping] = None
) -> swinv2.SwinTransformerV2:
    """The frozen encoder of `checkpoint` (any file `swinv2.create_model_from_checkpoint` reads; `raw`: the file,
    already read), at `img_size` if given; with `random_init` one of the same architecture, randomly initialised
    (the baseline to compare with)."""
    size = {} if img_size is None else {"img_size": img_size}
    source = checkpoint if raw is None else raw
    encoder = swinv2.create_model_from_checkpoint(source, strict=False, num_classes=0, **size)
    report = encoder.load_report
    missing = [k for k in report.missing_keys if not k.startswith(("head.", "mask_token"))]
    if missing or report.unexpected_keys:
        raise ConfigError(
            f"--checkpoint {checkpoint}: its weights do not fill the encoder (missing {missing[:5]}, unexpected "
            f"{report.unexpected_keys[:5]}): a probe of a partly random encoder would mislead"
        )
    if random_init:
        encoder = swinv2.SwinTransformerV2(**{**encoder.architecture(), "num_classes": 0})
    return encoder.eval().requires_grad_(False)


def parse(args: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simmim.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="encoder weights (this project's export, official, timm, transformers)")
    p.add_argument(
        "--random_init", action="store_true", help="probe a randomly initialised encoder of --checkpoint's shape"
    )
    p.add_argument("--data.root", dest="root", help="class folders (train/ and val/, or split 80/20); default: digits")
    p.add_argument("--data.img_size", dest="img_size", type=int, help="default: the checkpoint's image size")
    p.add_argument("--data.val_fraction", dest="val_fraction", type=float, default=0.2)
    p.add_argument("--data.batch_size", dest="batch_size", type=int, default=128)
    p.add_argument("--data.num_workers", dest="num_workers", type=int, default=0)
    p.add_argument("--stage", type=int, default=-1, help="features of this stage (0-based; -1: the last)")
    p.add_argument("--no_final_norm", action="store_true", help="the last stage's features before the final norm")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(args)


def main(args: Optional[List[str]] = None) -> float:
    """Runs the probe and prints its top-1; returns it."""
    opts = parse(args)
    if opts.checkpoint is None:
        raise SystemExit("error: --checkpoint is required (with --random_init: the shape to initialise randomly)")
    opts.root = labelled_root(opts.root)
    torch.manual_seed(opts.seed)
    raw = swinv2.read_checkpoint(opts.checkpoint)  # read once: the weights and the input record
    encoder = load_encoder(opts.checkpoint, opts.img_size, opts.random_init, raw)
    img_size = encoder.img_size[0]
    last = len(encoder.layers) - 1
    split = labelled_split(opts.root, opts.val_fraction)
    if len(split.train_files) < 2 or not split.val_files:
        raise ConfigError(
            f"--data.root {opts.root}: {len(split.train_files)} training and {len(split.val_files)} held-out images: "
            "too few"
        )
    start = time.perf_counter()
    common = dict(img_size=img_size, stage=opts.stage, final_norm=not opts.no_final_norm)
    # the pixel format and normalisation the weights were trained with, as their file records them
    common.update(batch_size=opts.batch_size, num_workers=opts.num_workers,
                  inputs=checkpoint_inputs(opts.checkpoint, encoder.in_chans, raw))  # fmt: skip
    train = cached_features(encoder, split.train_files, split.train_labels, **common)
    val = cached_features(encoder, split.val_files, split.val_labels, **common)
    head = train_linear(train, len(split.classes), opts.epochs, opts.lr, seed=opts.seed)
    acc = top1(head, val)
    what = "a random init of its architecture" if opts.random_init else opts.checkpoint
    stage = "last stage" if opts.stage in (-1, last) else f"stage {opts.stage}"
    norm = ", after the final norm" if opts.stage in (-1, last) and not opts.no_final_norm else ""
    print(
        f"linear probe of {what} ({stage}{norm}, {train[0].shape[1]} features): top-1 {acc:.2f}% on {len(val[1])} "
        f"images ({len(split.classes)} classes, {len(train[1])} training images, {time.perf_counter() - start:.0f} s)"
    )
    return acc
