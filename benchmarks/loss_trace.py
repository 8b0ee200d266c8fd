"""The first logged training losses of the two default runs, to show that a change of structure changed no number.

Runs `python -m simmim.pretrain` with the default config for `--steps` optimizer steps, then `python -m
simmim.finetune` with its default config from that run's export, both with `seed_everything: 0`, and prints (or
writes with `--out`) the first `--values` values of `train/loss` each logged. `--steps` shortens the runs; it also
shortens the cosine schedules, the same way on both sides of a comparison.

    python benchmarks/loss_trace.py --out before.json           # on the old commit
    python benchmarks/loss_trace.py --compare before.json       # on the new one: exits 1 if a value differs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List


def logged_losses(run_root: Path) -> List[float]:
    """`train/loss` in logging order from the TensorBoard events under `run_root`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = [p.parent for p in run_root.rglob("events.out.tfevents.*")]
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return [s.value for s in acc.Scalars("train/loss")]


def trace(steps: int, values: int, workdir: Path) -> Dict[str, List[float]]:
    pre, fine = workdir / "pretrain", workdir / "finetune"
    common = ["--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false"]
    subprocess.run(
        [sys.executable, "-m", "simmim.pretrain", *common, "--trainer.default_root_dir", str(pre)], check=True
    )
    (export,) = pre.rglob("encoder.safetensors")
    subprocess.run(
        [sys.executable, "-m", "simmim.finetune", *common, "--trainer.default_root_dir", str(fine)]
        + ["--model.pretrained", str(export)],
        check=True,
    )
    return {"pretrain": logged_losses(pre)[:values], "finetune": logged_losses(fine)[:values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of each run")
    parser.add_argument("--values", type=int, default=20, help="logged losses compared per run")
    parser.add_argument("--out", type=Path, help="write the trace here (JSON)")
    parser.add_argument("--compare", type=Path, help="a trace written earlier: exit 1 where a value differs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = trace(args.steps, args.values, Path(tmp))
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        differ = [k for k in before if before[k] != result[k]]
        print("identical" if not differ else f"differ: {', '.join(differ)}")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
