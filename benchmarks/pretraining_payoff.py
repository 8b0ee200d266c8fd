"""Does SimMIM pretraining pay off with the default recipes? Pretrain with the default config on a data set's
unlabelled training images, then fine-tune with the default config from the export and from scratch (which gets
the from-scratch recipe by itself), with 10% and 25% of the labels, 3 seeds; print mean and spread.

    python benchmarks/pretraining_payoff.py --data photos   # natural-image crops, held-out regions (16 classes)
    python benchmarks/pretraining_payoff.py --data digits   # the built-in digits (10 classes)

Only the data, the class count and the label fraction are given to the stage commands (and, to run two at a time
on one thread each, the loader's worker count and the run folders): every other setting is the default config's.
The photos are cut by `simmim.data.builtin.prepare_photos` from sample photographs that scikit-image, scikit-learn
and matplotlib ship; no validation crop shares a pixel with a training crop. The digits' pretraining set is all
of the digits (as `python -m simmim.pretrain` uses them), their fine-tuning validation split included.
Each run's log is in `runs/payoff_<data>/logs/`; results accumulate in `runs/payoff_<data>/results.jsonl`, so an
interrupted benchmark resumes (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from payoff_study import run_jobs  # noqa: E402

from simmim.data.builtin import DEFAULT_DIGITS_ROOT, DEFAULT_PHOTOS_ROOT, prepare_digits, prepare_photos  # noqa: E402

DATA = {  # name: (pretraining --data.root, fine-tuning --data.root, classes)
    "photos": (f"{DEFAULT_PHOTOS_ROOT}/train", str(DEFAULT_PHOTOS_ROOT), 16),
    "digits": (None, None, 10),
}


def plan(data: str, fractions, seeds, out: Path) -> list:
    """The pretraining run and the scratch runs; the pretrained runs once the pretraining's export is known (the
    results file names it), so a pretraining run that restarts into another version folder is followed."""
    pre_root, ft_root, classes = DATA[data]
    pre = ["fit", "--trainer.default_root_dir", str(out / "pretrain"), "--data.num_workers", "0"]
    jobs = [{"name": "pretrain", "stage": "pretrain", "args": pre + (["--data.root", pre_root] if pre_root else [])}]
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    export = next((r.get("export") for r in reversed(rows) if r["name"] == "pretrain" and r["rc"] == 0), None)
    for fraction in fractions:
        for seed in seeds:
            for side, weights in (("scratch", "null"), ("pretrained", export)):
                if weights is None:
                    continue
                args = ["fit", "--model.num_classes", str(classes), "--data.label_fraction", str(fraction)]
                args += ["--data.root", ft_root] if ft_root else []
                args += ["--model.pretrained", weights, "--seed_everything", str(seed), "--data.num_workers", "0"]
                args += ["--trainer.default_root_dir", str(out / f"{side}_f{fraction}_s{seed}")]
                jobs.append({"name": f"{side}_f{fraction}_s{seed}", "stage": "finetune", "args": args})
    return jobs


def summary(rows: list, fractions, seeds) -> str:
    acc = {r["name"]: r.get("val/acc1", float("nan")) for r in rows}
    lines = [
        "| labels | from scratch | SimMIM pretrained | payoff | per seed (scratch / pretrained) |",
        "|---|---|---|---|---|",
    ]
    for f in fractions:
        s = [acc[f"scratch_f{f}_s{seed}"] for seed in seeds]
        p = [acc[f"pretrained_f{f}_s{seed}"] for seed in seeds]
        spread = (lambda v: f" +- {statistics.stdev(v):.1f}") if len(seeds) > 1 else (lambda v: "")
        gains = [b - a for a, b in zip(s, p)]
        lines.append(
            f"| {f:.0%} | {statistics.mean(s):.1f}{spread(s)} | {statistics.mean(p):.1f}{spread(p)} | "
            f"{statistics.mean(gains):+.1f}{spread(gains)} | "
            + ", ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(s, p))
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=sorted(DATA), default="photos")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--slots", type=int, default=2, help="runs at a time, one thread each (default 2)")
    p.add_argument("--out", type=Path, default=None, help="default: runs/payoff_<data>")
    args = p.parse_args()
    out = args.out or Path(f"runs/payoff_{args.data}")
    prepare_photos() if args.data == "photos" else prepare_digits(DEFAULT_DIGITS_ROOT)
    t0 = time.time()
    rows = run_jobs(lambda: plan(args.data, args.fractions, args.seeds, out), out / "results.jsonl", lambda: args.slots)
    failed = [r["name"] for r in rows if r["rc"] != 0]
    if failed:
        raise SystemExit(f"runs failed: {failed}; their logs are in {out / 'logs'}")
    pre = next(r for r in rows if r["name"] == "pretrain")
    print(
        f"\n{args.data}: pretraining val/loss {pre.get('val/loss', float('nan')):.4f}, {time.time() - t0:.0f} s in all"
    )
    print(summary(rows, args.fractions, args.seeds))
