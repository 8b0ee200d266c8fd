"""Does SimMIM pretraining pay off? Fine-tune on 10% of the built-in digits' labels from the default pretraining
export and from scratch, with the same budget, and print both validation top-1 accuracies.

    python -m simmim.pretrain                      # once: the default pretraining run (~3 min on 2 cores)
    python benchmarks/pretraining_payoff.py        # then this (~2 x 1-2 min)
"""

from __future__ import annotations

import argparse
import glob
import os

from simmim.finetune import DEFAULT_PRETRAIN_EXPORTS, main


def run(pretrained: str, args: argparse.Namespace, tag: str) -> float:
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
            "--trainer.logger.init_args.save_dir",
            f"runs/payoff_{tag}",
            "--seed_everything",
            str(args.seed),
        ]
    )
    return cli.trainer.callback_metrics["val/acc1"].item()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label-fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    exports = sorted(glob.glob(DEFAULT_PRETRAIN_EXPORTS), key=os.path.getmtime)
    if not exports:
        raise SystemExit("run `python -m simmim.pretrain` first")
    scratch = run("null", args, "scratch")
    pretrained = run(exports[-1], args, "pretrained")
    print(f"\n{args.label_fraction:.0%} of the labels, {args.epochs} epochs, seed {args.seed}:")
    print(
        f"| init | val top-1 |\n|---|---|\n| from scratch | {scratch:.1f} |\n| SimMIM pretrained | {pretrained:.1f} |"
    )
