"""Forward+backward throughput and peak memory: our SwinV2 encoder against timm's, in one process.

    python benchmarks/encoder.py                       # SwinV2-T, 192 px, window 12, batch 8, fp32 + bf16, CPU
    python benchmarks/encoder.py --device cuda --batch 64
    python benchmarks/encoder.py --impls ours ours-fused ours-unfused ours-compiled timm
    python benchmarks/encoder.py --model swinv2_base --impls ours ours+compile timm timm+compile transformers

Both models get the same weights (`to_timm_state_dict`). Timing alternates the models step by step; img/s is the
median over rounds, and the speed ratio is the median of the per-round ratios (paired, so that drift of this
shared machine cancels). Peak memory on CUDA is
`max_memory_allocated`; on CPU it is the peak resident set during one step minus the resident set before it,
each model measured in a fresh subprocess (the CPU allocator has no peak counter).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import resource
import statistics
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional

import timm
import torch

import swinv2

FUSED = {
    "ours": None,
    "timm": None,
    "ours-fused": True,
    "ours-unfused": False,
    "ours-compiled": None,
    "transformers": None,
}
COMPILE = "+compile"  # suffix: torch.compile the whole model


class HFEncoder(torch.nn.Module):
    """transformers' `Swinv2Model` of the same shape (its own random weights: for speed only), returning a tensor."""

    def __init__(self, arch: str, img_size: int, window: int) -> None:
        super().__init__()
        from transformers import Swinv2Config, Swinv2Model

        v = swinv2.VARIANTS[arch]
        config = Swinv2Config(
            image_size=img_size,
            patch_size=4,
            embed_dim=v["embed_dim"],
            depths=list(v["depths"]),
            num_heads=list(v["num_heads"]),
            window_size=window,
        )
        self.model = Swinv2Model(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).pooler_output


def build(impl: str, args: argparse.Namespace, fused: Optional[bool] = None) -> torch.nn.Module:
    if impl.endswith(COMPILE):
        return torch.compile(build(impl[: -len(COMPILE)], args, fused))
    if impl == "transformers":
        return HFEncoder(args.model, args.img_size, args.window)
    ours = swinv2.create_model(args.model, img_size=args.img_size, window_size=args.window, fused_attn=fused)
    if impl == "ours-compiled":
        ours.compile_attention()
    if impl.startswith("ours"):
        return ours
    theirs = timm.create_model(
        f"{args.model}_window8_256", pretrained=False, img_size=args.img_size, window_size=args.window
    )
    theirs.load_state_dict(swinv2.to_timm_state_dict(ours))
    return theirs


def fused_of(impl: str) -> Optional[bool]:
    return FUSED[impl.removesuffix(COMPILE)]


def make_step(model: torch.nn.Module, args: argparse.Namespace, dtype: str) -> Callable[[], None]:
    model = model.to(args.device).train()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    amp = torch.autocast(args.device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step() -> None:
        with amp:
            loss = model(x).float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(impl: str, args: argparse.Namespace, dtype: str, fused: Optional[bool]) -> float:
    if args.device == "cuda":
        step = make_step(build(impl, args, fused), args, dtype)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_cpu_peak_child, (impl, args, dtype, fused))


def _cpu_peak_child(impl: str, args: argparse.Namespace, dtype: str, fused: Optional[bool]) -> float:
    torch.set_num_threads(args.threads)
    step = make_step(build(impl, args, fused), args, dtype)
    with open("/proc/self/statm") as f:  # resident pages now; ru_maxrss may hold an older, higher peak
        before = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before  # KiB -> MiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="swinv2_tiny")
    p.add_argument("--img-size", type=int, default=192)
    p.add_argument("--window", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column (a subprocess per impl)")
    p.add_argument(
        "--impls",
        nargs="+",
        default=["ours", "timm"],
        choices=sorted(FUSED) + sorted(i + COMPILE for i in FUSED),
        help="what to time: ours (defaults), timm, transformers, ours-fused / ours-unfused (fused_attn forced), "
        "ours-compiled (compile_attention()); NAME+compile: torch.compile of the whole model",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    impls = list(dict.fromkeys(args.impls + ["timm"]))  # timm is the reference of every ratio
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"{args.model}, {args.img_size} px, window {args.window}, batch {args.batch}, fwd+bwd, {device_name}")
    print(f"torch {torch.__version__}, timm {timm.__version__}, {datetime.date.today()}")
    print("| dtype | impl | img/s | ms/step | peak MiB | speed vs timm |")
    print("|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        steps = {i: make_step(build(i, args, fused_of(i)), args, dtype) for i in impls}
        times: Dict[str, List[float]] = {i: [] for i in impls}
        for step in steps.values():  # warm-up
            step()
        for _ in range(args.rounds):
            for impl, step in steps.items():
                sync(args.device)
                t0 = time.perf_counter()
                step()
                sync(args.device)
                times[impl].append(time.perf_counter() - t0)
        del steps
        med = {i: statistics.median(t) for i, t in times.items()}
        ratio = {i: statistics.median(a / b for a, b in zip(times["timm"], times[i])) for i in impls}
        for impl in impls:
            mem = float("nan") if args.no_memory else peak_memory_mib(impl, args, dtype, fused_of(impl))
            print(
                f"| {dtype} | {impl} | {args.batch / med[impl]:.1f} | {med[impl] * 1e3:.0f} | {mem:.0f} "
                f"| {ratio[impl]:.2f}x |"
            )


if __name__ == "__main__":
    main()
