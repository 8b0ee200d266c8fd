"""Do two-process DDP runs ever hang? Start `python -m simmim.pretrain` on 2 CPU processes (gloo) with 2 data-loader
workers per rank N times, each with a wall-clock limit, and count the runs that finished, failed or hung.

    python benchmarks/ddp_loop.py --runs 20            # about 20-40 s per run on 2 cores

A run that passes the limit counts as a hang: its whole process group is killed and the loop goes on. Before the
workers were started from a forkserver under DDP, one run in 22 hung with a worker blocked inside os.fork().
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int = 32) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:02d}.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))


def one_run(images: Path, out: Path, limit: float) -> tuple:
    args = [
        "--data.root", str(images), "--data.img_size", "32", "--data.mask_patch_size", "8", "--data.batch_size", "4",
        "--data.num_workers", "2", "--data.val_fraction", "0.25", "--trainer.max_steps", "3",
        "--trainer.limit_val_batches", "2", "--trainer.precision", "32", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out),
        "--model.encoder_kwargs", '{"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}',
        "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "simmim.pretrain", *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=limit)
        return ("finished" if proc.returncode == 0 else "failed"), time.monotonic() - start, err[-1500:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "hung", time.monotonic() - start, ""


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--limit-s", type=float, default=180.0, help="a run longer than this counts as a hang")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/ddp_loop.md"))
    args = p.parse_args()
    counts = {"finished": 0, "failed": 0, "hung": 0}
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        make_images(images)
        for i in range(args.runs):
            outcome, seconds, err = one_run(images, Path(tmp) / f"run{i}", args.limit_s)
            counts[outcome] += 1
            times.append(seconds)
            print(f"run {i + 1}/{args.runs}: {outcome} in {seconds:.1f} s", flush=True)
            if outcome == "failed":
                print(err, file=sys.stderr)
    report = (
        f"# Two-process DDP runs (CPU, gloo, 2 workers per rank, max_steps 3)\n\n"
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, `python benchmarks/ddp_loop.py --runs {args.runs}`\n\n"
        f"| runs | finished | failed | hung (> {args.limit_s:.0f} s) | median s | max s |\n|---|---|---|---|---|---|\n"
        f"| {args.runs} | {counts['finished']} | {counts['failed']} | {counts['hung']} | "
        f"{float(np.median(times)):.1f} | {max(times):.1f} |\n"
    )
    Path(args.out).write_text(report)
    print(report)
    sys.exit(0 if counts["finished"] == args.runs else 1)
