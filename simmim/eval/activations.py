"""Activation study: `python -m simmim.activations`.

The SwinV2 paper's argument for residual post-norm and scaled cosine attention (Liu et al., CVPR 2022, Sec. 3.1 and
Fig. 2): in a pre-norm Transformer each block adds its unnormalised output to the main branch, so activations grow
with depth, and the discrepancy between shallow and deep layers destabilises large models; post-norm normalises what
each block adds, and cosine attention bounds the attention logits that post-norm would otherwise let a few token
pairs dominate. This command builds the same deep, narrow encoder in each design (the Swin V1 one, pre-norm and
dot-product attention from `simmim.eval.block_designs`, against SwinV2's), measures the magnitude of every block's
output on a fixed batch of held-out images, trains each briefly as a classifier on the same data with the same seed
and schedule (`simmim.eval.classify`), and measures again.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

import swinv2
from simmim.data.builtin import labelled_root
from simmim.data.folders import labelled_split, stratified_pick
from simmim.errors import ConfigError
from simmim.eval import block_designs
from simmim.eval.classify import accuracy, fit, loader

# Design name -> `simmim.eval.block_designs.build` arguments.
DESIGNS: Dict[str, Dict[str, str]] = {
    "pre+dot": dict(norm_position="pre", attention="dot"),  # Swin V1
    "pre+cosine": dict(norm_position="pre", attention="cosine"),
    "post+dot": dict(norm_position="post", attention="dot"),
    "post+cosine": dict(norm_position="post", attention="cosine"),  # SwinV2
}


@dataclass
class DesignResult:
    """Per-block output magnitudes of one design, before and after training, and how the training went."""

    blocks: List[str]
    init_mean: List[float]
    init_max: List[float]
    trained_mean: List[float] = field(default_factory=list)
    trained_max: List[float] = field(default_factory=list)
    train_loss: float = float("nan")
    top1: float = float("nan")
    seconds: float = 0.0


@torch.no_grad()
def block_magnitudes(model: swinv2.SwinTransformerV2, images: torch.Tensor) -> Dict[str, List]:
    """Mean and max of |x| over every element of each block's output (the main branch the next block reads), in
    eval mode, for one forward pass of `images` (B, 3, H, W). Blocks are named "stage.block", 1-based."""
    names, means, maxes = [], [], []
    hooks = []

    def record(name):
        def hook(module, inputs, output):
            names.append(name)
            means.append(output.abs().mean().item())
            maxes.append(output.abs().max().item())

        return hook

    for i, layer in enumerate(model.layers):
        for j, blk in enumerate(layer.blocks):
            hooks.append(blk.register_forward_hook(record(f"{i + 1}.{j + 1}")))
    model.eval()
    try:
        model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
    return dict(blocks=names, mean=means, max=maxes)


def build(design: str, seed: int, **kwargs) -> swinv2.SwinTransformerV2:
    """The encoder of one design (a key of `DESIGNS`), initialised from `seed`: every design draws the same values
    for the weights they share, so the designs differ only in how the blocks use them."""
    torch.manual_seed(seed)
    return block_designs.build(**DESIGNS[design], **kwargs)


def probe_batch(files: Sequence[str], labels: Sequence[int], count: int, img_size: int, seed: int) -> torch.Tensor:
    """About `count` of the held-out images, the same share of every class (the files are sorted by class, so the
    first `count` would leave the last classes out): (N, 3, img_size, img_size)."""
    if count < 1:
        raise ConfigError(f"--probe_images {count}: the magnitudes need at least one image")
    fraction = min(1.0, count / max(len(files), 1))
    picked = stratified_pick(list(labels), max(labels) + 1, fraction, seed, at_least_one=True)
    chosen = [i for i in range(len(files)) if picked[i]]
    batches = loader([files[i] for i in chosen], [labels[i] for i in chosen], img_size, 256, False, seed)
    return torch.cat([x for x, *_ in batches])


def study(
    root: Optional[str],
    designs: Sequence[str] = ("pre+dot", "post+cosine"),
    img_size: int = 64,
    window: int = 4,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    arch: Optional[Dict] = None,
    seed: int = 0,
    probe_images: int = 256,
) -> Dict[str, DesignResult]:
    """{design: DesignResult} for each design in `designs` (keys of `DESIGNS`): the same architecture `arch`, the
    same initial weights (`build`), data order and schedule; magnitudes on about `probe_images` held-out images spread
    over the classes (`probe_batch`)."""
    arch = arch or dict(embed_dim=32, depths=(2, 2, 18, 2), num_heads=(1, 2, 4, 8))
    tf, tl, vf, vl = (split := labelled_split(root, 0.2))[:4]
    classes = split.classes
    probe = probe_batch(vf, vl, probe_images, img_size, seed)
    results: Dict[str, DesignResult] = {}
    for name in designs:
        start = time.perf_counter()
        model = build(name, seed, img_size=img_size, window_size=window, num_classes=len(classes), **arch)
        before = block_magnitudes(model, probe)
        result = DesignResult(before["blocks"], before["mean"], before["max"])
        if epochs > 0:
            result.train_loss = fit(model, loader(tf, tl, img_size, batch_size, True, seed), epochs, lr)
            after = block_magnitudes(model, probe)
            result.trained_mean, result.trained_max = after["mean"], after["max"]
            result.top1 = accuracy(model, loader(vf, vl, img_size, 256, False, seed))
        result.seconds = time.perf_counter() - start
        results[name] = result
    return results


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def deepest_stage_growth(blocks: Sequence[str], values: Sequence[float]) -> float:
    """Last block's value over the first block's in the stage with the most blocks (where depth can show growth:
    patch merging re-normalises the main branch between stages in both designs)."""
    stages = [b.split(".")[0] for b in blocks]
    deepest = max(dict.fromkeys(stages), key=stages.count)  # the first of the deepest, whatever the hash seed
    first, last = stages.index(deepest), len(stages) - 1 - stages[::-1].index(deepest)
    return values[last] / values[first]


def table(results: Dict[str, DesignResult]) -> str:
    """A Markdown table: one row per block, mean |x| at init, and mean and max |x| after training, per design; then
    each mean column's growth over the deepest stage (`deepest_stage_growth`)."""
    trained = all(r.trained_mean for r in results.values())
    cols = [("init mean|x|", "init_mean")]
    if trained:
        cols += [("trained mean|x|", "trained_mean"), ("trained max|x|", "trained_max")]
    header = ["block"] + [f"{d} {c}" for d in results for c, _ in cols]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    first = next(iter(results.values()))
    for i, block in enumerate(first.blocks):
        cells = [_fmt(getattr(r, attr)[i]) for r in results.values() for _, attr in cols]
        lines.append(f"| {block} | " + " | ".join(cells) + " |")
    growth = [
        _fmt(deepest_stage_growth(r.blocks, getattr(r, attr))) if attr.endswith("mean") else ""
        for r in results.values()
        for _, attr in cols
    ]
    lines.append("| deepest stage last / first | " + " | ".join(growth) + " |")
    return "\n".join(lines)


def summary(results: Dict[str, DesignResult]) -> str:
    """One line per design: growth over the deepest stage, the largest block output, the training result, time."""
    out = []
    for name, r in results.items():
        line = f"{name}: deepest-stage growth of mean|x| {deepest_stage_growth(r.blocks, r.init_mean):.3g}x at init"
        if r.trained_mean:
            line += (
                f", {deepest_stage_growth(r.blocks, r.trained_mean):.3g}x trained; largest block mean|x| "
                f"{max(r.trained_mean):.3g}, max|x| {max(r.trained_max):.3g}; last-epoch loss {r.train_loss:.3f}, "
                f"val top-1 {r.top1:.1f}%"
            )
        out.append(line + f" ({r.seconds:.0f} s)")
    return "\n".join(out)


def main(args: Optional[List[str]] = None) -> Dict[str, DesignResult]:
    p = argparse.ArgumentParser(prog="python -m simmim.activations", description=__doc__.split("\n\n")[0])
    p.add_argument("--data.root", dest="root", help="class folders (train/ and val/, or split 80/20); default: digits")
    p.add_argument("--designs", nargs="+", default=["pre+dot", "post+cosine"], choices=list(DESIGNS))
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--epochs", type=int, default=5, help="brief classification training (0: init only)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--embed_dim", type=int, default=32)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 2, 18, 2])
    p.add_argument("--num_heads", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe_images", type=int, default=256, help="held-out images (per class alike) to measure on")
    p.add_argument("--out", help="also write the table and summary to this Markdown file")
    opts = p.parse_args(args)
    opts.root = labelled_root(opts.root)
    arch = dict(embed_dim=opts.embed_dim, depths=tuple(opts.depths), num_heads=tuple(opts.num_heads))
    results = study(
        opts.root, opts.designs, opts.img_size, opts.window, opts.epochs, opts.lr, opts.batch_size, arch, opts.seed,
        opts.probe_images,
    )  # fmt: skip
    text = table(results) + "\n\n" + summary(results)
    print(text)
    if opts.out:
        Path(opts.out).write_text(text + "\n")
    return results
