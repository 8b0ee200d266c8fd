"""Peak memory of one training step (forward, backward, AdamW step) at rising resolutions, with activation
checkpointing and sequential attention on and off.

    python benchmarks/memory.py                                  # SwinV2-B, batch 1, 192/384/768 px, CPU, fp32
    python benchmarks/memory.py --device cuda --precision bf16 --sizes 192 384 768 1536
    python benchmarks/memory.py --chunks 16 4 1                  # several sequential-attention chunk sizes

Each row is a fresh model of `--arch` with a classifier head (1000 classes), batch `--batch`, cross-entropy on
random labels, and the window `--window` (default: 12 at 192 px, 24 above, the recipes' pretraining and larger
fine-tuning windows). Settings: `plain`, `checkpoint` (per block), `sequential-N` (attention N windows at a time),
`both-N`.

CPU: every setting runs in a fresh subprocess; the peak is the process's peak resident set (VmHWM), reset (via
`/proc/self/clear_refs`) once the model is built, so the forward peak and the backward+optimizer peak are read
separately. glibc is told to return every allocation above 128 KiB to the system at once
(`MALLOC_MMAP_THRESHOLD_`), so freed activations do not linger in its heap and hide the next phase's peak.
CUDA: `torch.cuda.max_memory_allocated`, reset between phases, all settings in one process.
Reported: the step's peak (the larger of the two phases) in MiB, absolute and above the built model.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import subprocess
import sys
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch

import swinv2

MMAP_THRESHOLD = 131072


def rss_mib(field: str) -> float:
    """VmRSS or VmHWM of this process in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak(device: str) -> float:
    """Start a new peak measurement; returns the memory in use now (MiB)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    return rss_mib("VmRSS")


def peak(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_mib("VmHWM")


def measure(setting: Dict) -> Dict:
    """One training step of one setting; peaks in MiB (this process, or this CUDA device)."""
    device, size = setting["device"], setting["size"]
    torch.manual_seed(0)
    model = swinv2.create_model(
        setting["arch"],
        img_size=size,
        window_size=setting["window"],
        use_checkpoint=setting["checkpoint"],
        attn_chunk_size=setting["chunk"],
        **setting["encoder_kwargs"],
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(setting["batch"], 3, size, size, device=device)
    y = torch.randint(0, model.num_classes, (setting["batch"],), device=device)
    amp = torch.autocast(device, dtype=torch.bfloat16) if setting["precision"] == "bf16" else nullcontext()
    model_mib = reset_peak(device)
    with amp:
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    forward = peak(device)
    reset_peak(device)
    loss.backward()
    opt.step()
    backward = peak(device)
    step = max(forward, backward)
    return {**setting, "model_mib": model_mib, "forward_mib": forward, "backward_mib": backward, "step_mib": step}


def measure_in_subprocess(settings: List[Dict]) -> List[Dict]:
    """Measure `settings` one after another in one fresh process (one setting per call for isolated peaks)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(settings)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        killed = out.returncode < 0 or "MemoryError" in out.stderr or "not enough memory" in out.stderr
        if killed and len(settings) == 1:
            return [{**settings[0], "error": "out of memory"}]
        raise RuntimeError(f"settings {settings} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_on_cuda(setting: Dict) -> Dict:
    try:
        return measure(setting)
    except torch.cuda.OutOfMemoryError:
        return {**setting, "error": "out of memory"}
    finally:
        torch.cuda.empty_cache()


def settings_for(args: argparse.Namespace, size: int) -> List[Dict]:
    window = args.window or (12 if size <= 192 else 24)
    base = dict(
        arch=args.arch,
        encoder_kwargs=json.loads(args.encoder_kwargs),
        size=size,
        window=window,
        batch=args.batch,
        device=args.device,
        precision=args.precision,
    )
    rows = [dict(base, name="plain", checkpoint=False, chunk=None)]
    rows += [dict(base, name=f"sequential-{c}", checkpoint=False, chunk=c) for c in args.chunks]
    rows.append(dict(base, name="checkpoint", checkpoint=True, chunk=None))
    rows += [dict(base, name=f"both-{c}", checkpoint=True, chunk=c) for c in args.chunks]
    return rows


def table(rows: List[Dict]) -> str:
    names = list(dict.fromkeys(r["name"] for r in rows))
    lines = [
        "| px | window | " + " | ".join(names) + " | both / plain |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    for size in dict.fromkeys(r["size"] for r in rows):
        at = {r["name"]: r for r in rows if r["size"] == size}
        cells = [f"{at[n]['step_mib']:.0f}" if "error" not in at[n] else "OOM" for n in names]
        both = [n for n in names if n.startswith("both")][-1]
        ok = "error" not in at["plain"] and "error" not in at[both]
        ratio = f"{at[both]['step_mib'] / at['plain']['step_mib']:.0%}" if ok else "-"
        lines.append(f"| {size} | {at['plain']['window']} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def detail(rows: List[Dict]) -> str:
    lines = ["| px | setting | model | forward peak | backward+step peak |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['name']} | - | OOM | OOM |")
        else:
            mib = " | ".join(f"{r[k]:.0f}" for k in ("model_mib", "forward_mib", "backward_mib"))
            lines.append(f"| {r['size']} | {r['name']} | {mib} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="swinv2_base")
    p.add_argument("--encoder_kwargs", default="{}", help="JSON of further SwinTransformerV2 arguments")
    p.add_argument("--sizes", type=int, nargs="+", default=[192, 384, 768])
    p.add_argument("--window", type=int, default=None, help="default: 12 at 192 px, 24 above")
    p.add_argument("--chunks", type=int, nargs="+", default=[1], help="sequential attention: windows per chunk")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    p.add_argument("--out", default=None, help="write the Markdown tables to this file (and the rows to .json)")
    p.add_argument("--json", action="store_true", help="print one JSON row per setting")
    p.add_argument(
        "--one_process",
        action="store_true",
        help="CPU: measure all settings in one fresh process (faster; compare the peaks above the model then)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps([measure(s) for s in json.loads(args.worker)]))
        return []
    settings = [s for size in args.sizes for s in settings_for(args, size)]
    if args.device == "cuda":
        rows = [measure_on_cuda(s) for s in settings]
    elif args.one_process:
        rows = measure_in_subprocess(settings)
    else:
        rows = [row for s in settings for row in measure_in_subprocess([s])]
    for row in rows:
        print(json.dumps(row) if args.json else f"{row['size']} px {row['name']}: {row.get('step_mib', 'OOM')}")
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()}, {os.cpu_count()} CPUs"
    header = (
        f"# Peak memory of one training step ({args.arch}, batch {args.batch}, {args.precision})\n\n"
        f"{datetime.date.today()}, {device}, torch {torch.__version__}, "
        f"`python benchmarks/memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        + ("Peak resident set of a fresh process, MiB" if args.device == "cpu" else "max_memory_allocated, MiB")
        + " (forward, backward and AdamW step):\n\n"
    )
    report = header + table(rows) + "\n\nBy phase (MiB; model = in use before the step):\n\n" + detail(rows) + "\n"
    if args.out:  # the tables, and the rows as JSON beside them (read by benchmarks/memory_model.py)
        with open(args.out, "w") as f:
            f.write(report)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1)
    print(report)
    return rows


if __name__ == "__main__":
    main()
