"""Stage 1 command line: `python -m simmim.pretrain [fit|validate] [--config FILE] [--data.root DIR] ...`.

With no arguments it pretrains a small SwinV2 on the built-in digits with `configs/pretrain/default.yaml`.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import pytorch_lightning as pl

from simmim.cli import CONFIG_DIR, Stage, StageCLI, with_default_subcommand
from simmim.errors import user_errors_as_messages
from simmim.monitors import KNNMonitor, QuickFinetuneMonitor
from simmim.pretrain.callbacks import ReconstructionGrid
from simmim.pretrain.data import PretrainDataModule
from simmim.pretrain.module import SimMIMPretrainer

PRETRAIN = Stage(
    prog="python -m simmim.pretrain",
    description="SimMIM pretraining of a SwinV2 encoder (no subcommand: fit; no --config: the default recipe)",
    subcommands=("fit", "validate"),
    default_config=CONFIG_DIR / "pretrain/default.yaml",
    exports={"encoder.safetensors": "official"},
    options=(("grid", ReconstructionGrid, {}),),  # --grid.every_n_epochs, --grid.num_images
    links=(
        ("data.img_size", "model.img_size"),
        ("model.patch_size", "data.model_patch_size"),
        ("model.mean", "data.mean"),  # values, or auto: the data module works them out
        ("model.std", "data.std"),
        ("data.channels", "model.in_chans", "instantiate"),  # given, or read from the first image
    ),
    resume_ignores=("pretrained",),  # a resume's weights are its checkpoint's
)


def monitor_summary(callbacks: List[pl.Callback]) -> List[str]:
    """The monitors' closing lines, saying what each number means."""
    lines = []
    quick = next((c for c in callbacks if isinstance(c, QuickFinetuneMonitor)), None)
    if quick is not None and quick.last is not None:
        start = "" if quick.first is None else f", from the initial weights {quick.first:.2f}%"
        lines.append(
            f"quick fine-tune top-1 (val/finetune_acc1): {quick.last:.2f}%{start}: every layer fine-tuned for "
            f"{quick.steps} steps on {len(quick.data[0][1])} labelled images, scored on {len(quick.data[1][1])}; "
            "it rises as pretraining pays off"
        )
    knn = next((c for c in callbacks if isinstance(c, KNNMonitor)), None)
    if knn is not None and knn.last is not None:
        train, val = knn.counts
        start = "" if knn.first is None else f" (before training: {knn.first:.2f}%)"
        lines.append(
            f"kNN top-1 (val/knn_acc1): {knn.last:.2f}% of {val} images, voting {train} labelled images{start}; "
            "frozen features: it can fall while fine-tuning gets better (docs/payoff.md)"
        )
    return lines


def main(args: Optional[List[str]] = None) -> StageCLI:
    args = with_default_subcommand(sys.argv[1:] if args is None else list(args), PRETRAIN)
    with user_errors_as_messages():
        cli = StageCLI(PRETRAIN, SimMIMPretrainer, PretrainDataModule, args=args)
    if cli.subcommand == "fit" and cli.trainer.is_global_zero:
        ckpt = cli.trainer.checkpoint_callback
        loss = cli.trainer.callback_metrics.get("train/loss")
        print(f"\nsteps: {cli.trainer.global_step}, last training loss: {'-' if loss is None else f'{loss:.4f}'}")
        for line in monitor_summary(cli.trainer.callbacks):
            print(line)
        print(f"checkpoints: {ckpt.dirpath} (last: {ckpt.last_model_path or '-'})")
        print(f"encoder export: {cli.export.path}")
        grid = cli.setting("grid")
        print(f"reconstruction grid: {grid.last_path or grid.why_none(cli.trainer)}")
    return cli
