"""Stage 1 command line: `python -m simmim.pretrain [fit|validate] [--config FILE] [--data.root DIR] ...`.

With no arguments it pretrains a small SwinV2 on the built-in digits with `configs/pretrain/default.yaml`.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from simmim.cli import CONFIG_DIR, StageCLI, with_default_subcommand
from simmim.errors import user_errors_as_messages
from simmim.export import ExportWeights
from simmim.knn import KNNMonitor
from simmim.pretrain.callbacks import ReconstructionGrid
from simmim.pretrain.data import PretrainDataModule
from simmim.pretrain.module import SimMIMPretrainer


class PretrainCLI(StageCLI):
    PROG = "python -m simmim.pretrain"
    DESCRIPTION = "SimMIM pretraining of a SwinV2 encoder (no subcommand: fit; no --config: the default recipe)"
    SUBCOMMANDS = ("fit", "validate")

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.img_size", "model.img_size")
        parser.link_arguments("model.patch_size", "data.model_patch_size")
        parser.add_argument("--grid_every_n_epochs", type=int, default=1, help="reconstruction grid period")

    def stage_callbacks(self) -> list:
        self.grid = ReconstructionGrid(every_n_epochs=self._get(self.config_init, "grid_every_n_epochs") or 1)
        self.export = ExportWeights("encoder", {"encoder.safetensors": "official"})
        return [self.grid, self.export]


def main(args: Optional[List[str]] = None) -> PretrainCLI:
    args = with_default_subcommand(
        sys.argv[1:] if args is None else list(args),
        CONFIG_DIR / "pretrain/default.yaml",
        PretrainCLI.SUBCOMMANDS,
        PretrainCLI.PROG,
    )
    with user_errors_as_messages():
        cli = PretrainCLI(SimMIMPretrainer, PretrainDataModule, args=args)
    if cli.subcommand == "fit" and cli.trainer.is_global_zero:
        ckpt = cli.trainer.checkpoint_callback
        loss = cli.trainer.callback_metrics.get("train/loss")
        print(f"\nsteps: {cli.trainer.global_step}, last training loss: {'-' if loss is None else f'{loss:.4f}'}")
        monitor = next((c for c in cli.trainer.callbacks if isinstance(c, KNNMonitor)), None)
        if monitor is not None and monitor.last is not None:
            train, val = monitor.counts
            start = "" if monitor.first is None else f" (before training: {monitor.first:.2f}%)"
            print(
                f"kNN top-1 (val/knn_acc1): {monitor.last:.2f}% of {val} images, voting {train} labelled images{start}"
            )
        print(f"checkpoints: {ckpt.dirpath} (last: {ckpt.last_model_path or '-'})")
        print(f"encoder export: {cli.export.path}")
        print(f"reconstruction grid: {cli.grid.last_path or cli.grid.why_none(cli.trainer)}")
    return cli
