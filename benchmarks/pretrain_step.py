"""One whole SimMIM pretraining step (forward, loss, backward, AdamW) of ours against the peers, in one process.

    python benchmarks/pretrain_step.py                          # SwinV2-T and -B, 192 px, window 12, batch 8, CPU
    python benchmarks/pretrain_step.py --device cuda --impls ours ours+compile timm timm+compile transformers
    python benchmarks/pretrain_step.py --out benchmarks/results/pretrain_step_cpu.md

The implementations, each with mask ratio 0.6 (32 px mask patches) and `torch.optim.AdamW` (lr 1e-4, weight decay
0.05) over all its parameters (PyTorch's default implementation, as our training builds it):
- **ours**: `simmim.pretrain.model.SimMIM` over `swinv2.create_model(..., mask_token=True)`, with the official
  loss (L1 on the masked pixels of the locally normalised target, window 47).
- **timm**: timm's `SwinTransformerV2` with a mask token blended in after its patch embedding, under the same
  decoder (1x1 conv + PixelShuffle) and the same loss code; given our weights (`to_timm_state_dict`).
- **transformers**: `Swinv2ForMaskedImageModeling` of the same shape, its own loss (L1 on the masked raw pixels:
  no target normalisation, which only makes its step cheaper).
- `NAME+compile`: `torch.compile` of the whole model (forward and backward).

Timing: one warm-up step each, then `--rounds` rounds in which every implementation runs one step in turn; img/s is
the median step, a ratio is the median of the per-round ratios (paired, so that drift of a shared machine cancels).
FLOPs per step are counted by `torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions and fused
attention, forward and backward; element-wise work is not counted). MFU = counted FLOPs per second / the matmul
peak measured on the same device in the same run, per dtype. Step peak memory: the second step's peak above the
memory in use before it (`peak_memory_mib`: CUDA `max_memory_allocated`; CPU a fresh process's peak resident set).

On a CPU without native bf16 arithmetic (the measured bf16 matmul peak under a quarter of fp32's, as on AVX2-only
x86: PyTorch emulates bf16 there) bf16 is skipped with a note: its timings would measure the emulation.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List

import timm
import torch
import torch.nn as nn
from memory import MMAP_THRESHOLD, peak, reset_peak  # benchmarks/memory.py
from torch.utils.flop_counter import FlopCounterMode

import swinv2
from simmim.pretrain.masking import MaskGenerator
from simmim.pretrain.model import SimMIM

COMPILE = "+compile"
IMPLS = ("ours", "timm", "transformers")


class TimmMaskedEncoder(nn.Module):
    """timm's SwinV2 as a SimMIM encoder: `forward_features(x, mask)` with a learnable mask token blended into the
    patch embedding where `mask` is 1, as SimMIM's official SwinV2 wrapper does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, model.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.num_features, self.in_chans, self.patch_size = model.num_features, 3, 4

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.model.patch_embed(x)  # (B, H, W, C)
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        return self.model.norm(self.model.layers(x))


class TransformersSimMIM(nn.Module):
    """transformers' `Swinv2ForMaskedImageModeling` of the same shape, called as ours is: loss of (images, mask)."""

    def __init__(self, arch: str, img_size: int, window: int) -> None:
        super().__init__()
        from transformers import Swinv2Config, Swinv2ForMaskedImageModeling

        v = swinv2.VARIANTS[arch]
        config = Swinv2Config(
            image_size=img_size,
            patch_size=4,
            embed_dim=v["embed_dim"],
            depths=list(v["depths"]),
            num_heads=list(v["num_heads"]),
            window_size=window,
            encoder_stride=32,
        )
        self.model = Swinv2ForMaskedImageModeling(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x, bool_masked_pos=mask.flatten(1).bool()).loss


def build(impl: str, arch: str, img_size: int, window: int) -> nn.Module:
    if impl.endswith(COMPILE):
        return torch.compile(build(impl[: -len(COMPILE)], arch, img_size, window))
    if impl == "transformers":
        return TransformersSimMIM(arch, img_size, window)
    torch.manual_seed(0)
    ours = swinv2.create_model(arch, img_size=img_size, window_size=window, num_classes=0, mask_token=True)
    if impl == "ours":
        return SimMIM(ours, 32, norm_target_patch_size=47)
    theirs = timm.create_model(
        f"{arch}_window8_256", pretrained=False, img_size=img_size, window_size=window, num_classes=0
    )
    state = {k: v for k, v in swinv2.to_timm_state_dict(ours).items() if not k.startswith(("head.", "mask_token"))}
    theirs.load_state_dict(state)
    return SimMIM(TimmMaskedEncoder(theirs), 32, norm_target_patch_size=47)


def make_step(model: nn.Module, args: argparse.Namespace, dtype: str) -> Callable[[], None]:
    """A closure running one training step on a fixed random batch."""
    model = model.to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(args.device)
    masks = MaskGenerator(args.img_size, 32, 4, 0.6)
    mask = torch.stack([torch.from_numpy(masks()) for _ in range(args.batch)]).to(args.device)
    amp = torch.autocast(args.device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step() -> None:
        with amp:
            loss = model(x, mask)
        loss.float().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: str, seconds: float = 1.0) -> float:
    """The best FLOP/s of square matrix products on this device (sizes up to 4096 on GPU, 2048 on CPU; larger sizes
    are not tried once one product takes longer than `seconds`, as emulated bf16 does)."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    best = 0.0
    for n in (1024, 2048, 4096) if device == "cuda" else (512, 1024, 2048):
        a = torch.randn(n, n, device=device).to(torch_dtype)
        b = torch.randn(n, n, device=device).to(torch_dtype)
        reps, t0 = 0, time.perf_counter()
        while True:  # the first product is warm-up
            a @ b
            sync(device)
            if reps == 0:
                first, t0 = time.perf_counter() - t0, time.perf_counter()
                if first > seconds:
                    return max(best, 2 * n**3 / first)
            reps += 1
            if time.perf_counter() - t0 > seconds / 3:
                break
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def count_flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def peak_memory_mib(impl: str, args: argparse.Namespace, dtype: str) -> float:
    """The second step's peak above what was in use before it (weights, gradients' absence, AdamW moments): its
    activations, gradients and temporaries. CUDA: `max_memory_allocated`, in this process. CPU: the peak resident
    set of a fresh process whose glibc returns every block over 128 KiB to the system when it is freed, so that
    memory the first step freed cannot hide the second's (as `memory.py` measures)."""
    if args.device == "cuda":
        return _step_peak(impl, args, dtype)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # read by the spawned process at its start
    try:
        with mp.get_context("spawn").Pool(1) as pool:
            return pool.apply(_step_peak, (impl, args, dtype))
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]


def _step_peak(impl: str, args: argparse.Namespace, dtype: str) -> float:
    torch.set_num_threads(args.threads)
    step = make_step(build(impl, args.model, args.img_size, args.window), args, dtype)
    step()  # the AdamW moments exist from here on
    before = reset_peak(args.device)
    step()
    return peak(args.device) - before


def bf16_is_native(fp32_peak: float, bf16_peak: float) -> bool:
    return bf16_peak >= fp32_peak / 4


def run_dtype(args: argparse.Namespace, dtype: str, peak: float) -> List[Dict]:
    impls = list(dict.fromkeys(["ours", *args.impls]))
    steps = {i: make_step(build(i, args.model, args.img_size, args.window), args, dtype) for i in impls}
    flops = {i: count_flops(s) for i, s in steps.items()}  # also the warm-up step
    times: Dict[str, List[float]] = {i: [] for i in impls}
    for _ in range(args.rounds):
        for impl, step in steps.items():
            sync(args.device)
            t0 = time.perf_counter()
            step()
            sync(args.device)
            times[impl].append(time.perf_counter() - t0)
    del steps
    rows = []
    for impl in impls:
        med = statistics.median(times[impl])
        rows.append(
            {
                "dtype": dtype,
                "impl": impl,
                "img_s": args.batch / med,
                "ms": med * 1e3,
                "ours_speedup": statistics.median(t / o for t, o in zip(times[impl], times["ours"])),
                "gflop": flops[impl] / 1e9,
                "mfu": flops[impl] / med / peak,
                "mem": float("nan") if args.no_memory else peak_memory_mib(impl, args, dtype),
                "rounds_ms": [t * 1e3 for t in times[impl]],
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["swinv2_tiny", "swinv2_base"])
    p.add_argument("--img-size", type=int, default=192)
    p.add_argument("--window", type=int, default=12)
    p.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 128 on CUDA")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    p.add_argument("--force-bf16", action="store_true", help="time bf16 even where the CPU emulates it")
    p.add_argument(
        "--impls", nargs="+", default=list(IMPLS), choices=[*IMPLS, *(i + COMPILE for i in IMPLS)], help="peers"
    )
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args()
    args.batch = args.batch or (128 if args.device == "cuda" else 8)
    torch.set_num_threads(args.threads)

    import transformers

    if args.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({cpu_model()}), {args.threads} threads"
    peaks = {d: matmul_peak(args.device, d) for d in args.dtypes}
    lines = [
        f"# One SimMIM pretraining step: {args.img_size} px, window {args.window}, batch {args.batch}, mask 0.6",
        "",
        f"{datetime.date.today()}, {device}; torch {torch.__version__}, timm {timm.__version__}, "
        f"transformers {transformers.__version__}",
        f"`python benchmarks/pretrain_step.py {' '.join(sys.argv[1:])}`",
        "",
        "Measured matmul peak: " + ", ".join(f"{d} {peaks[d] / 1e9:.0f} GFLOP/s" for d in args.dtypes),
        "",
    ]
    dtypes = list(args.dtypes)
    if "bf16" in peaks and "fp32" in peaks and args.device == "cpu" and not args.force_bf16:
        if not bf16_is_native(peaks["fp32"], peaks["bf16"]):
            dtypes.remove("bf16")
            lines += [
                f"bf16 skipped: this CPU has no native bf16 arithmetic (bf16 matmul {peaks['bf16'] / 1e9:.1f} "
                f"GFLOP/s against fp32's {peaks['fp32'] / 1e9:.0f}: emulated). `--force-bf16` times it anyway.",
                "",
            ]
    lines += [
        "| model | dtype | impl | img/s | ms/step | ours is faster by | GFLOP/step | MFU | step peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rounds = ["", "Step times of every round in ms, in the order run (the ratio column is the median of the per-round",
              "ratios of these):", ""]  # fmt: skip
    for model in args.models:
        args.model = model
        for dtype in dtypes:
            for r in run_dtype(args, dtype, peaks[dtype]):
                rounds.append(f"- {model} {dtype} {r['impl']}: " + ", ".join(f"{t:.0f}" for t in r["rounds_ms"]))
                line = (
                    f"| {model} | {dtype} | {r['impl']} | {r['img_s']:.1f} | {r['ms']:.0f} | {r['ours_speedup']:.2f}x "
                    f"| {r['gflop']:.0f} | {100 * r['mfu']:.0f}% | {r['mem']:.0f} |"
                )
                print(line, flush=True)
                lines.append(line)
    print("\n".join(rounds), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines + rounds) + "\n")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
