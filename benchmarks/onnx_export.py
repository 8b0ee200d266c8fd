"""ONNX export of a SwinV2 classifier: how long `python -m simmim.export --to onnx` takes, and onnxruntime's CPU
latency against PyTorch eager on the same inputs.

    python benchmarks/onnx_export.py                                   # SwinV2-T, 192 px, window 12, 1000 classes
    python benchmarks/onnx_export.py --batches 1 8 --out benchmarks/results/onnx_cpu.md

The model is built with random weights (latency does not depend on them) and written as an export first, so the
timed export is the command's whole path: reading the file, `torch.onnx.export` (PyTorch's `torch.export`-based
exporter) and the check with onnxruntime at batch 1 and 3. Latency: PyTorch eager (fp32, `torch.no_grad`) and an
onnxruntime session (CPU provider, default graph optimisations), both on `--threads` threads, taking turns round by
round on the same input; the median of `--rounds` calls after a warm-up call each.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

import swinv2  # noqa: E402
from simmim.eval.export import main as export  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="swinv2_tiny")
    p.add_argument("--img_size", type=int, default=192)
    p.add_argument("--window", type=int, default=12)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args()
    import onnxruntime

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = swinv2.create_model(args.variant, img_size=args.img_size, window_size=args.window, num_classes=1000).eval()
    with tempfile.TemporaryDirectory() as tmp:
        src = swinv2.save_weights(Path(tmp) / "model.safetensors", model)
        t0 = time.perf_counter()
        export([str(src), "--to", "onnx", str(Path(tmp) / "model.onnx")])
        export_s = time.perf_counter() - t0
        size_mb = (Path(tmp) / "model.onnx").stat().st_size / 2**20
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(
            str(Path(tmp) / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        rows = []
        for batch in args.batches:
            x = torch.randn(batch, 3, args.img_size, args.img_size)
            feed = {"pixels": x.numpy()}
            with torch.no_grad():
                model(x)
            session.run(None, feed)
            eager, ort = [], []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                with torch.no_grad():
                    model(x)
                eager.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                session.run(None, feed)
                ort.append(time.perf_counter() - t0)
            e, o = statistics.median(eager) * 1e3, statistics.median(ort) * 1e3
            ratio = statistics.median(a / b for a, b in zip(eager, ort))
            rows.append(f"| {batch} | {e:.1f} | {o:.1f} | {ratio:.2f}x |")
    lines = [
        f"# ONNX export and onnxruntime latency ({args.variant}, {args.img_size} px, window {args.window})",
        "",
        f"{datetime.date.today()}, {cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads, Python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}",
        f"`python benchmarks/onnx_export.py {' '.join(sys.argv[1:])}`",
        "",
        f"Export (`python -m simmim.export --to onnx`, with its check at batch 1 and 3): {export_s:.1f} s; the file "
        f"is {size_mb:.0f} MB.",
        "",
        f"| batch | PyTorch eager ms | onnxruntime ms | onnxruntime faster (median of {args.rounds} paired rounds) |",
        "|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
