"""Does SimMIM pretraining pay off? Fine-tune on 10% of the built-in digits' labels from the default pretraining
export and from scratch, with the same budget, and print both validation top-1 accuracies.

    python -m simmim.pretrain                                          # once: the default pretraining run
    python benchmarks/pretraining_payoff.py --epochs 150 --seeds 0 1 2  # then this (~4 min per seed, 2 cores)

The 10% label subset is fixed; the seed changes initialisation, augmentation and order.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics

from simmim.finetune.cli import DEFAULT_PRETRAIN_EXPORTS, main


def run(pretrained: str, args: argparse.Namespace, seed: int, tag: str) -> float:
    cli = main(
        [
            "fit",
            "--model.pretrained",
            pretrained,
            "--data.label_fraction",
            str(args.label_fraction),
            "--data.batch_size",
            "32",
            "--trainer.max_epochs",
            str(args.epochs),
            "--trainer.check_val_every_n_epoch",
            str(args.epochs),
            "--trainer.default_root_dir",
            f"runs/payoff_{tag}",
            "--seed_everything",
            str(seed),
            *(["--trainer.precision", args.precision] if args.precision else []),
        ]
    )
    return cli.trainer.callback_metrics["val/acc1"].item()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label-fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--precision", default=None, help="e.g. 32 on a CPU without native bf16 (default: the config's)")
    args = p.parse_args()
    exports = sorted(glob.glob(DEFAULT_PRETRAIN_EXPORTS), key=os.path.getmtime)
    if not exports:
        raise SystemExit("run `python -m simmim.pretrain` first")
    rows = [
        (seed, run("null", args, seed, "scratch"), run(exports[-1], args, seed, "pretrained")) for seed in args.seeds
    ]
    print(f"\n{args.label_fraction:.0%} of the labels, {args.epochs} epochs, export {exports[-1]}:")
    print("| seed | from scratch | SimMIM pretrained |\n|---|---|---|")
    for seed, scratch, pretrained in rows:
        print(f"| {seed} | {scratch:.1f} | {pretrained:.1f} |")
    if len(rows) > 1:
        means = [statistics.mean(r[i] for r in rows) for i in (1, 2)]
        print(f"| mean | {means[0]:.1f} | {means[1]:.1f} |")
