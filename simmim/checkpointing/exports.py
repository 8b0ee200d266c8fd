"""The Lightning side of the checkpoint contract (`swinv2.checkpoint`): weight exports at the end of fit, and
Lightning reading `--ckpt_path` files through the same safe reader as every other weights file."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_warn

import swinv2
from simmim.checkpointing.runs import SHARDED_METADATA
from simmim.checkpointing.untrusted import local_path
from simmim.distributed import full_state_dict, is_sharded
from simmim.errors import require
from swinv2.reading import read_checkpoint


def run_dir(trainer: pl.Trainer) -> str:
    """The run's folder: the logger's version folder, or the root dir without a logger.

    Collective under DDP (`trainer.log_dir` broadcasts): call it on every rank, before any rank-zero check."""
    return trainer.log_dir or trainer.default_root_dir


class ExportWeights(pl.Callback):
    """At the end of fit, write the stage's SwinV2 (`pl_module.swin`) to `<run>/<name>` for every `{name: layout}`
    in `files` with `swinv2.save_weights` (each file records the architecture, so
    `swinv2.create_model_from_checkpoint(path)` rebuilds the model alone). A model sharded by FSDP2 is gathered
    first, so the files are the same plain single-process weights under every strategy.

    Args:
        files: File name (a `.safetensors` name in the run's folder) -> layout: "official" (this project's and
            microsoft/Swin-Transformer's keys) or "timm". Empty: no export.
    """

    LAYOUTS = ("official", "timm")

    def __init__(self, files: Dict[str, str]) -> None:
        for name, layout in dict(files).items():
            plain = name == os.path.basename(name) and name not in (".", "..") and "\\" not in name
            require(
                plain and name.endswith(".safetensors") and len(name) > len(".safetensors"),
                "--export.files",
                repr(name),
                "must be a file name ending in .safetensors, written in the run's folder (no folders)",
            )
            require(layout in self.LAYOUTS, "--export.files", f"{name}: {layout!r}", "a layout is official or timm")
        self.files = dict(files)
        self.paths: List[str] = []

    @property
    def path(self) -> Optional[str]:
        """The first file written (None before the end of fit, and on ranks other than zero)."""
        return self.paths[0] if self.paths else None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = run_dir(trainer)  # collective: before the rank-zero check
        model = pl_module.swin
        if is_sharded(model):  # FSDP2: gather the shards (collective), write a plain single-process model
            state = full_state_dict(model, keep=trainer.is_global_zero)
            if trainer.is_global_zero:
                model = swinv2.SwinTransformerV2(**model.architecture())
                model.load_state_dict(state)
        if not trainer.is_global_zero:
            return
        # safetensors replaces a symbolic link by the file, never follows it (a logger's folder may go unchecked at
        # start-up): tests/simmim/test_untrusted.py fails if a version of it changes that
        inputs = pl_module.input_record() if hasattr(pl_module, "input_record") else None
        labels = pl_module.labels() if hasattr(pl_module, "labels") else None
        self.paths = [
            swinv2.save_weights(os.path.join(folder, n), model, layout, inputs, labels)
            for n, layout in self.files.items()
        ]


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning reads checkpoints (`--ckpt_path`) with `swinv2.read_checkpoint`: tensors and plain containers
    only, and a one-line `UnsafeCheckpointError` naming what a crafted file asked for. Remote paths (fsspec URLs)
    go through Lightning's loader with `weights_only=True`."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Optional[bool] = None) -> Dict:
        if "://" in str(path):
            return super().load_checkpoint(path, weights_only=True)
        return read_checkpoint(path)

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Lightning's save, except through a symbolic link: the link is replaced by the file, never followed."""
        if "://" not in str(path) and os.path.islink(path):
            os.unlink(path)
        super().save_checkpoint(checkpoint, path, storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        """Lightning's removal of an older checkpoint, limited to checkpoint files and shard folders (`*.ckpt`): a
        symbolic link is removed itself (never what it points to), and a `local://` or `file://` URL is a local
        path."""
        path = local_path(str(path))
        if "://" in path:
            return super().remove_checkpoint(path)
        if os.path.islink(path):
            os.unlink(path)
        elif not path.endswith(".ckpt") or (
            os.path.isdir(path) and not os.path.isfile(os.path.join(path, SHARDED_METADATA))
        ):
            rank_zero_warn(f"not removing {path}: not a checkpoint file or shard folder (*.ckpt)")
        elif os.path.lexists(path):
            super().remove_checkpoint(path)
