"""LightningCLI conventions shared by the stages: omegaconf configs, `fit` as the default subcommand,
checkpoints in a fixed `<default_root_dir>/checkpoints` folder with `last.ckpt` (so `--ckpt_path last` resumes)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import List, Optional

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

SUBCOMMANDS = ("fit", "validate", "test", "predict")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# main(args) is how tests and the entry point drive the CLI; the warning about args beside sys.argv is noise.
warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")


def has_config(args: List[str]) -> bool:
    """Whether the arguments name a `--config` file."""
    return any(a == "--config" or a.startswith("--config=") for a in args)


def with_default_subcommand(args: Optional[List[str]], default_config: Path) -> List[str]:
    """Arguments without a subcommand run `fit`; without `--config` the stage's default config comes first, so
    `--data.root DIR` alone runs the default recipe on DIR."""
    args = list(args or [])
    if not args or args[0] not in (*SUBCOMMANDS, "-h", "--help"):
        args = ["fit", *args]
    if args[0] in SUBCOMMANDS and not has_config(args):
        args = [args[0], "--config", str(default_config), *args[1:]]
    return args


def finish_distributed() -> None:
    """Destroy the process group before the interpreter exits. Left alive, gloo's threads sometimes abort the
    process at exit ("terminate called without an active exception", return code -6) after the work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class StageCLI(LightningCLI):
    """LightningCLI with omegaconf configs, an overwritable saved config and a fixed checkpoint folder; stages add
    their callbacks in `stage_callbacks`."""

    def __init__(self, model_class, datamodule_class, args: List[str], **kwargs) -> None:
        # omegaconf+: interpolations are resolved after the command line is applied, so the default configs'
        # `save_dir: ${...default_root_dir}` follows `--trainer.default_root_dir`.
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf+"})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(model_class, datamodule_class, args=args, **kwargs)

    def stage_callbacks(self) -> list:
        return []

    def root_dir(self) -> str:
        """The run's `trainer.default_root_dir` (the working directory when unset)."""
        return self._get(self.config_init, "trainer.default_root_dir") or os.getcwd()

    def instantiate_trainer(self, **kwargs):
        root = self.root_dir()
        extra = kwargs.setdefault("callbacks", [])
        if not any(isinstance(c, ModelCheckpoint) for c in extra):
            extra.append(ModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), save_last=True))
        extra.extend(self.stage_callbacks())
        return super().instantiate_trainer(**kwargs)
