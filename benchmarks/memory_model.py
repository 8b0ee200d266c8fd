"""A memory model on paper: per-GPU memory of training a SwinV2 under each strategy and memory technique,
fitted to the measured SwinV2-B table of `benchmarks/memory.py` and checked against it.

    python benchmarks/memory_model.py                       # SwinV2-G: pretraining 192 px, fine-tuning 1536 px
    python benchmarks/memory_model.py --measured benchmarks/results/memory_cpu.json --out docs/...

Per GPU, memory = model states + activations.

States, bytes per parameter P (AdamW, bf16 autocast over fp32 weights, as the recipes train):
- fp32 weights 4, fp32 gradients 4, AdamW moments 8;
- DDP's gradient buckets, a second copy of the gradients: 4 (`zero1` builds DDP with `gradient_as_bucket_view`,
  which makes the buckets the gradients);
- autocast's bf16 copies of the weights, saved by every linear layer for backward: 2, unless activation
  checkpointing recomputes them;
- sharding over N ranks: `zero1` divides the moments by N; `fsdp2` divides weights, gradients and moments by N
  and adds the gathered weights of the largest block, twice (the one computing and the one prefetched).

Activations per image: every block saves `a` elements per token and channel (its input, q/k/v, the MLP's hidden
layers...) and, on the explicit CPU path, `b` per attention-matrix element (tokens x heads x window tokens: the
softmax output). a and b are fitted to the measured plain and sequential-attention forward peaks of SwinV2-B at
384 and 768 px; the check table lists every measured row, those four included. With activation checkpointing,
blocks keep only their inputs, and the largest block's activations come back once, during its backward.
Sequential attention (1 window at a time) removes the attention term except in a stage whose windows all fit in
one chunk. bf16: 2 bytes per saved element, except the fp32 residual stream that checkpointing keeps (4).

The G tables are for GPUs, where attention is fused (`F.scaled_dot_product_attention`): no attention matrix per
image, but every block keeps its whole mask for backward, (nW, nH, N, N) in a shifted block, whatever the batch;
sequential attention builds each chunk's mask inside the chunk and keeps none. Those masks count with the states.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

import swinv2

GB = 1e9
MIB = 2**20
RESERVE = 0.9  # of a GPU's memory usable by tensors (the rest: CUDA context, allocator fragmentation)
BACKWARD_FACTOR = 1.0  # with checkpointing: the recomputed block's saved activations, alive during its backward


@dataclass(frozen=True)
class Geometry:
    params: int
    params_with_head: int  # with a 1000-class head, as benchmarks/memory.py builds it
    largest_block: int
    token_channels: float  # sum over blocks of tokens x channels, per image
    attention: float  # sum over blocks of tokens x heads x window tokens, per image
    largest_block_tc: float
    largest_block_attention: float
    single_window_attention: float  # attention of stages whose image has one window (not chunked at batch 1)
    masks: float  # elements of every block's (nW, nH, N, N) attention mask (shifted) or (1, nH, N, N) bias
    largest_mask: float


def geometry(arch: str, size: int, window: int) -> Geometry:
    with torch.device("meta"):
        model = swinv2.create_model(arch, img_size=size, window_size=window, num_classes=0, mask_token=True)
    tc, att, single, per_block, masks = 0.0, 0.0, 0.0, [], []
    for layer in model.layers:
        for blk in layer.blocks:
            (h, w), (wh, ww) = blk.input_resolution, blk.window_size
            hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
            t, c, n = hp * wp, blk.attn.dim, wh * ww
            a = t * blk.attn.num_heads * n
            tc, att = tc + t * c, att + a
            windows = (hp // wh) * (wp // ww)
            single += a if windows == 1 else 0.0
            masks.append((windows if blk.attn_mask is not None else 1) * blk.attn.num_heads * n * n)
            per_block.append((sum(p.numel() for p in blk.parameters()), t * c, a))
    big = max(per_block)
    return Geometry(
        params=sum(p.numel() for p in model.parameters()),
        params_with_head=sum(p.numel() for p in model.parameters()) + (model.num_features + 1) * 1000,
        largest_block=big[0],
        token_channels=tc,
        attention=att,
        largest_block_tc=max(b[1] for b in per_block),
        largest_block_attention=max(b[2] for b in per_block),
        single_window_attention=single,
        masks=sum(masks),
        largest_mask=max(masks),
    )


def activation_elements(
    g: Geometry, a: float, b: float, checkpoint: bool, sequential: bool, fused: bool = False
) -> Tuple[float, float, float]:
    """(saved elements per image at the end of forward, extra elements per image during the largest backward,
    elements independent of the batch).

    `fused`: the GPU path (`F.scaled_dot_product_attention`), which keeps no attention matrix per image, only
    per-row statistics, but keeps each block's whole mask, (nW, nH, N, N) in a shifted block, for its backward,
    and makes the mask's gradient, one attention matrix per image, in that backward; sequential attention builds
    each chunk's mask inside the chunk and keeps none. The explicit CPU path keeps the
    softmax output (the `b` term) and, made in place, no mask."""
    attention = 0.0 if fused else (g.single_window_attention if sequential else g.attention)
    masks = 0.0 if (sequential or not fused) else (g.largest_mask if checkpoint else g.masks)
    # the fused kernel's gradient of a learnable mask is a whole (B, nH, L, S) buffer, made in a block's backward
    mask_grad = g.largest_block_attention if (fused and not sequential) else 0.0
    if not checkpoint:
        return a * g.token_channels + b * attention, mask_grad, masks
    block_attention = 0.0 if (sequential or fused) else g.largest_block_attention
    return g.token_channels, BACKWARD_FACTOR * (a * g.largest_block_tc + b * block_attention) + mask_grad, masks


def fit(measured: List[Dict]) -> Tuple[float, float]:
    """Least-squares a, b from the plain and sequential forward peaks (above the model) of the measured table."""
    rows, targets = [], []
    for r in measured:
        if r["checkpoint"] or "error" in r or r["size"] <= 192:  # 192 px: dominated by allocator noise
            continue
        g = geometry(r["arch"], r["size"], r["window"])
        attention = g.single_window_attention if r["chunk"] else g.attention
        rows.append([g.token_channels * 4 / MIB, attention * 4 / MIB])
        targets.append(r["forward_mib"] - r["model_mib"])
    solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64))
    a, b = solution.solution.tolist()
    return a, b


def check(measured: List[Dict], a: float, b: float) -> str:
    """Model against measurement, per row, for the whole step: the memory in use before it, plus the gradients and
    AdamW moments it creates (12 bytes per parameter in fp32), plus the activations. The model counts all of them
    alive at once, so it is an upper bound: in a real step the gradients appear as activations are freed."""
    lines = ["| px | setting | measured step peak, MiB | model, MiB | model / measured |", "|---|---|---|---|---|"]
    for r in measured:
        if "error" in r:
            continue
        g = geometry(r["arch"], r["size"], r["window"])
        saved, extra, _ = activation_elements(g, a, b, r["checkpoint"], bool(r["chunk"]))
        predicted = r["model_mib"] + 12 * g.params_with_head / MIB + (saved + extra) * 4 / MIB
        got = r["step_mib"]
        lines.append(f"| {r['size']} | {r['name']} | {got:.0f} | {predicted:.0f} | {predicted / got:.2f} |")
    return "\n".join(lines)


STRATEGIES = ("ddp", "zero1", "fsdp2")


def state_bytes(g: Geometry, strategy: str, ranks: int, checkpoint: bool) -> float:
    autocast_copies = 0 if checkpoint else 2
    if strategy == "ddp":
        return g.params * (4 + 4 + 4 + 8 + autocast_copies)
    if strategy == "zero1":
        return g.params * (4 + 4 + 8 / ranks + autocast_copies)
    return g.params * (16 / ranks + autocast_copies) + 2 * 4 * g.largest_block


def scenario_table(arch: str, size: int, window: int, a: float, b: float, gpus=(8, 32, 64), memories=(40, 80)) -> str:
    g = geometry(arch, size, window)
    head = " / ".join(f"{n} GPUs" for n in gpus)
    fits = " / ".join(f"{m} GB x {n}" for m in memories for n in gpus)
    lines = [
        f"| strategy | checkpointing | sequential | states and masks, GB ({head}) | activations, GB per image | "
        f"images per GPU that fit ({fits}) |",
        "|---|---|---|---|---|---|",
    ]
    for strategy in STRATEGIES:
        for checkpoint in (False, True):
            for sequential in (False, True):
                saved, extra, masks = activation_elements(g, a, b, checkpoint, sequential, fused=True)
                per_image = (saved * (4 if checkpoint else 2) + extra * 2) / GB
                states = [(state_bytes(g, strategy, n, checkpoint) + 2 * masks) / GB for n in gpus]
                batch = [max(0, math.floor((m * RESERVE - s) / per_image)) for m in memories for s in states]
                lines.append(
                    f"| {strategy} | {'on' if checkpoint else 'off'} | {'on' if sequential else 'off'} | "
                    + " / ".join(f"{s:.1f}" for s in states)
                    + f" | {per_image:.2f} | "
                    + " / ".join(str(x) for x in batch)
                    + " |"
                )
    return (
        f"{arch}, {size} px, window {window}: {g.params / 1e9:.2f}B parameters, largest block "
        f"{g.largest_block / 1e6:.0f}M\n\n" + "\n".join(lines)
    )


def main(argv: Optional[List[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measured", default="benchmarks/results/memory_cpu.json", help="rows of benchmarks/memory.py")
    p.add_argument("--arch", default="swinv2_giant")
    p.add_argument("--pretrain", type=int, nargs=2, default=[192, 12], metavar=("PX", "WINDOW"))
    p.add_argument("--finetune", type=int, nargs=2, default=[1536, 24], metavar=("PX", "WINDOW"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    with open(args.measured) as f:
        measured = json.load(f)
    a, b = fit(measured)
    report = (
        f"# Memory model\n\nFitted to `{args.measured}`: a = {a:.1f} saved elements per token and channel per "
        f"block, b = {b:.2f} per attention element.\n\nCheck against the measured SwinV2-B steps (fp32, batch 1):\n\n"
        + check(measured, a, b)
        + "\n\n## Pretraining\n\n"
        + scenario_table(args.arch, *args.pretrain, a, b)
        + "\n\n## Fine-tuning\n\n"
        + scenario_table(args.arch, *args.finetune, a, b)
        + "\n"
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    print(report)
    return report


if __name__ == "__main__":
    main()
