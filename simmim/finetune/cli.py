"""Stage 2 command line: `python -m simmim.finetune [fit|validate|predict] [--config FILE] ...`.

With no arguments it fine-tunes the default pretraining run's export on the built-in digits at a larger window.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import List, Optional

from pytorch_lightning.callbacks import ModelCheckpoint

import swinv2
from simmim.checkpointing.runs import is_checkpoint
from simmim.cli import CONFIG_DIR, Stage, StageCLI, has_config, with_default_subcommand
from simmim.data.folders import class_names
from simmim.errors import ConfigError, user_errors_as_messages
from simmim.finetune.callbacks import PredictionCSV
from simmim.finetune.data import ClassificationDataModule
from simmim.finetune.module import SwinV2Classifier
from swinv2.checkpoint import read_architecture

DEFAULT_PRETRAIN_EXPORTS = "runs/pretrain_default/logs/version_*/encoder.safetensors"


def num_classes_from_data(config) -> None:
    """`--model.num_classes` unset: the number of class folders of `--data.root` (or classes in `--data.index`);
    set: it must agree."""
    root, index = config.data.root, config.data.get("index")
    found = len(class_names(root, index=index, index_cache=config.data.get("index_cache")))
    where = f"classes in --data.index {index}" if index else f"class folders under {root or 'the built-in digits'}"
    data = f"{found} {where}"
    given, ckpt = config.model.num_classes, config.get("ckpt_path")
    if given is None:
        config.model.num_classes = found
    elif given != found and is_checkpoint(ckpt):
        raise ConfigError(
            f"--ckpt_path {ckpt} was trained with {given} classes, but the data has {data}: pass the training "
            "data's --data.root and --data.index (or its --config), so that classes keep their names"
        )
    elif given != found:
        raise ConfigError(
            f"--model.num_classes {given} disagrees with the data: {data}. "
            f"Leave it unset (it is read from the data) or set {found}"
        )


def inputs_from_pretrained(config) -> None:
    """What `--model.pretrained`'s input record says (`swinv2.read_inputs`: a file this project wrote) fills what
    is not given: the data's channels and depth, and the normalisation (the module's and the loaders'). Not with
    `--model.adapt_channels`, whose data has channels of its own."""
    path = config.model.get("pretrained")
    if path is None or config.model.get("adapt_channels"):
        return
    raw = swinv2.read_checkpoint(path)  # the module reads it again: a few seconds for the largest models
    record = swinv2.read_inputs(raw, path)
    if record is None:
        return
    arch = read_architecture(raw, path) or {}
    if config.data.get("channels") is None:
        config.data.channels = arch.get("in_chans", 3)
    if config.data.get("depth") is None:
        config.data.depth = record["depth"]
    for name in ("mean", "std"):
        if config.model.get(name) is None:
            config.model[name] = config.data[name] = record[name]


def finetune_check(config) -> None:
    num_classes_from_data(config)
    inputs_from_pretrained(config)


BEST_CHECKPOINT = {  # in the run's folder, beside last.ckpt
    "filename": "best-{epoch:03d}",
    "monitor": "val/acc1",
    "mode": "max",
    "auto_insert_metric_name": False,
}

FINETUNE = Stage(
    prog="python -m simmim.finetune",
    description="Fine-tune a pretrained SwinV2 for classification (no subcommand: fit; no --config: the default)",
    subcommands=("fit", "validate", "predict"),
    default_config=CONFIG_DIR / "finetune/default.yaml",
    exports={"classifier.safetensors": "official", "classifier_timm.safetensors": "timm"},
    options=(("best_checkpoint", ModelCheckpoint, BEST_CHECKPOINT),),
    links=(
        ("data.img_size", "model.img_size"),
        ("model.mean", "data.mean"),  # the loaders normalise (random erasing needs it)
        ("model.std", "data.std"),
        ("checkpoint.dirpath", "best_checkpoint.dirpath"),
        ("data.channels", "model.in_chans", "instantiate"),  # given, from the pretrained file, or the first image's
    ),
    required=(PredictionCSV,),
    check=finetune_check,
)


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


def main(args: Optional[List[str]] = None) -> StageCLI:
    raw = sys.argv[1:] if args is None else list(args)
    args = with_default_subcommand(raw, FINETUNE)
    if not has_config(raw) and args[0] == "fit" and not {"-h", "--help"} & set(args):
        args = _default_pretrained(args)
    with user_errors_as_messages():
        cli = StageCLI(FINETUNE, SwinV2Classifier, ClassificationDataModule, args=args)
    if cli.subcommand == "validate":
        print(f"val/acc1: {cli.trainer.callback_metrics['val/acc1'].item():.2f}")
    elif cli.subcommand == "predict":
        print(f"predictions: {cli.callback(PredictionCSV).path}")
    elif cli.subcommand == "fit" and cli.trainer.is_global_zero:
        print(f"\ncheckpoints: {cli.trainer.checkpoint_callback.dirpath}; exports: {cli.export.paths}")
        if "val/acc1" in cli.trainer.callback_metrics:
            print(f"val/acc1: {cli.trainer.callback_metrics['val/acc1'].item():.2f}")
    return cli
