"""Stage 2 entry point: `python -m simmim.finetune [fit|validate|predict] [--config FILE] ...`.

With no arguments it fine-tunes the default pretraining run's export on the built-in digits at a larger window.
"""

from __future__ import annotations

import csv
import glob
import os
import sys
from typing import List, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

import swinv2
from simmim.callbacks import run_dir, save_weights
from simmim.cli import CONFIG_DIR, StageCLI, finish_distributed, has_config, with_default_subcommand
from simmim.finetune_data import ClassificationDataModule
from simmim.finetune_module import SwinV2Classifier

DEFAULT_PRETRAIN_EXPORTS = "runs/pretrain_default/logs/version_*/encoder.safetensors"


class ExportClassifier(pl.Callback):
    """At the end of fit: `<run>/classifier.safetensors` (official layout, with head) and
    `<run>/classifier_timm.safetensors` (timm's `SwinTransformerV2` layout, loads with strict=True)."""

    def __init__(self) -> None:
        self.paths: List[str] = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: SwinV2Classifier) -> None:
        folder = run_dir(trainer)  # collective: before the rank-zero check
        if not trainer.is_global_zero:
            return
        model = pl_module.model
        self.paths = [
            save_weights(os.path.join(folder, "classifier.safetensors"), model.state_dict(), format="swinv2-official"),
            save_weights(
                os.path.join(folder, "classifier_timm.safetensors"), swinv2.to_timm_state_dict(model), format="timm"
            ),
        ]


class PredictionCSV(pl.Callback):
    """`predict` writes `<run>/predictions.csv`: path, predicted class name, its probability; one row per file in
    file order. Under DDP the ranks' rows are gathered first. A file that could not be decoded keeps its row with
    empty `pred` and `prob` (its warning names it)."""

    def __init__(self) -> None:
        self.rows: List = []
        self.path: Optional[str] = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.rows += list(zip(outputs["index"].tolist(), outputs["pred"].tolist(), outputs["prob"].tolist()))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path = os.path.join(run_dir(trainer), "predictions.csv")  # collective: before the rank-zero check
        rows = self.rows
        if trainer.world_size > 1:
            shards: List = [None] * trainer.world_size
            torch.distributed.all_gather_object(shards, rows)  # shards differ in length: objects, not tensors
            rows = [row for shard in shards for row in shard]
        if not trainer.is_global_zero:
            return
        found = {i: (pred, prob) for i, pred, prob in rows}  # a distributed sampler may repeat a sample
        dm = trainer.datamodule
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "pred", "prob"])
            for i, path in enumerate(dm.predict_files):
                pred, prob = found.get(i, (None, None))
                w.writerow(
                    [os.fspath(path), "" if pred is None else dm.classes[pred], "" if prob is None else f"{prob:.4f}"]
                )
        if len(found) < len(dm.predict_files):
            print(f"{len(dm.predict_files) - len(found)} unreadable file(s) have empty predictions in {self.path}")


class FinetuneCLI(StageCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.img_size", "model.img_size")

    def stage_callbacks(self) -> list:
        self.export, self.predictions = ExportClassifier(), PredictionCSV()
        best = ModelCheckpoint(
            dirpath=os.path.join(self.root_dir(), "checkpoints"),
            filename="best-{epoch:03d}",
            monitor="val/acc1",
            mode="max",
            auto_insert_metric_name=False,
        )
        return [best, self.export, self.predictions]


def _default_pretrained(args: List[str]) -> List[str]:
    """The default run starts from the newest default pretraining export; a clear message if there is none."""
    if any(a.startswith("--model.pretrained") for a in args):
        return args
    exports = sorted(glob.glob(DEFAULT_PRETRAIN_EXPORTS), key=os.path.getmtime)
    if not exports:
        raise SystemExit(
            f"no pretrained encoder found at {DEFAULT_PRETRAIN_EXPORTS}: run pretraining first "
            "(`make pretrain` or `python -m simmim.pretrain`), or pass --model.pretrained PATH "
            "(or --model.pretrained null to train from scratch)"
        )
    return [*args, "--model.pretrained", exports[-1]]


def main(args: Optional[List[str]] = None) -> FinetuneCLI:
    raw = sys.argv[1:] if args is None else list(args)
    args = with_default_subcommand(raw, CONFIG_DIR / "finetune/default.yaml")
    if not has_config(raw) and args[0] == "fit":
        args = _default_pretrained(args)
    cli = FinetuneCLI(SwinV2Classifier, ClassificationDataModule, args=args)
    if cli.subcommand == "validate":
        print(f"val/acc1: {cli.trainer.callback_metrics['val/acc1'].item():.2f}")
    elif cli.subcommand == "predict":
        print(f"predictions: {cli.predictions.path}")
    elif cli.subcommand == "fit" and cli.trainer.is_global_zero:
        print(f"\ncheckpoints: {cli.trainer.checkpoint_callback.dirpath}; exports: {cli.export.paths}")
        if "val/acc1" in cli.trainer.callback_metrics:
            print(f"val/acc1: {cli.trainer.callback_metrics['val/acc1'].item():.2f}")
    return cli


if __name__ == "__main__":
    main()
    finish_distributed()
