"""LightningCLI conventions shared by the stages: omegaconf configs, `fit` as the default subcommand, checkpoints in
the run's own folder with `last.ckpt` (`--ckpt_path last` resumes the newest run under the root, in its folder),
optional checkpoints every N steps, checkpoints read safely, the bad-image limit, and user errors as one line
instead of a traceback."""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.plugins import CheckpointIO
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from simmim.bad_images import BadImageLimit
from simmim.errors import ConfigError
from simmim.export import SafeCheckpointIO
from simmim.runs import ClaimCheckpointFolders, is_checkpoint, metadata_file, newest_last_checkpoint
from simmim.sharding import register as register_strategies
from simmim.sharding import with_timeout
from simmim.step_timing import DataWaitTimer
from simmim.untrusted import check_run_outputs, check_sharded_checkpoint, checkpoint_hyperparameters

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
register_strategies()  # `--trainer.strategy zero1 | fsdp2 | fsdp2_no_reshard`, and `fsdp` wrapping each block
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# main(args) is how tests and the entry point drive the CLI; the warning about args beside sys.argv is noise.
warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")


def has_config(args: List[str]) -> bool:
    """Whether the arguments name a `--config` file."""
    return any(a == "--config" or a.startswith("--config=") for a in args)


def with_default_subcommand(
    args: Optional[List[str]], default_config: Path, subcommands: Sequence[str], prog: str
) -> List[str]:
    """Arguments without a subcommand run `fit`; without `--config` the stage's default config comes first, so
    `--data.root DIR` alone runs the default recipe on DIR. A Lightning subcommand the stage does not offer (such as
    `test`, which has no meaning without labels in pretraining) ends with a one-line message."""
    args = list(args or [])
    if args and args[0] in LIGHTNING_SUBCOMMANDS and args[0] not in subcommands:
        raise SystemExit(f"error: {prog} has no `{args[0]}` subcommand; it offers {', '.join(subcommands)}")
    if not args or args[0] not in (*subcommands, "-h", "--help"):
        args = ["fit", *args]
    if args[0] in subcommands and not has_config(args):
        args = [args[0], "--config", str(default_config), *args[1:]]
    return args


def finish_distributed() -> None:
    """Destroy the process group before the interpreter exits. Left alive, gloo's threads sometimes abort the
    process at exit ("terminate called without an active exception", return code -6) after the work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def strategy_with_timeout(strategy, seconds: float):
    """`--trainer.strategy NAME` (ddp, zero1, fsdp2, ...) built with collectives that fail after `seconds` instead
    of Lightning's 30 minutes."""
    built = with_timeout(strategy, timedelta(seconds=seconds)) if isinstance(strategy, str) else None
    if built is None:
        raise ConfigError(
            f"--collective_timeout_s applies to a data-parallel --trainer.strategy (ddp, zero1, fsdp2, ...), not "
            f"{strategy!r}: give that strategy's own timeout argument instead"
        )
    return built


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX on x86). Without, PyTorch emulates bf16
    matmuls: a SwinV2 step in bf16-mixed ran about 7x slower than in fp32 on an AVX2 CPU. True where it cannot
    tell (other architectures, other PyTorch versions)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is None for check in checks):
        return True
    return any(check() for check in checks)


def _trains_on_cpu(accelerator) -> bool:
    if accelerator == "cpu":
        return True
    mps = getattr(torch.backends, "mps", None)
    gpu = torch.cuda.is_available() or (mps is not None and mps.is_available())
    return accelerator in (None, "auto") and not gpu


def precision_for_this_cpu(precision, accelerator) -> str:
    """`precision`, except that bf16-mixed (the recipes' and default runs' setting; also spelled "bf16") becomes
    32-true, with a notice, on a CPU that would only emulate bf16: several times slower for no saving that matters
    on a CPU. bf16-true is left as asked (it also halves the weights' memory), and so is every GPU run."""
    if str(precision) not in ("bf16-mixed", "bf16") or not _trains_on_cpu(accelerator) or cpu_has_native_bf16():
        return precision
    rank_zero_info(
        "This CPU has no bf16 arithmetic (no AVX512-BF16 or AMX), so bf16-mixed would be emulated and run several "
        "times slower: training in fp32 (32-true) instead; the saved config keeps bf16-mixed"
    )
    return "32-true"


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


class StageCLI(LightningCLI):
    """LightningCLI with omegaconf configs, an overwritable saved config and per-run checkpoint folders; stages name
    their program and subcommands (`PROG`, `SUBCOMMANDS`) and add their callbacks in `stage_callbacks`."""

    PROG = "python -m simmim"
    DESCRIPTION = ""
    SUBCOMMANDS: Sequence[str] = ("fit", "validate")

    def __init__(self, model_class, datamodule_class, args: List[str], **kwargs) -> None:
        # omegaconf+: interpolations are resolved after the command line is applied, so the default configs'
        # `save_dir: ${...default_root_dir}` follows `--trainer.default_root_dir`.
        kwargs.setdefault(
            "parser_kwargs", {"parser_mode": "omegaconf+", "prog": self.PROG, "description": self.DESCRIPTION}
        )
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(model_class, datamodule_class, args=args, **kwargs)

    def stage_callbacks(self) -> list:
        return []

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=Optional[int],
            default=None,
            help="also write last.ckpt every N optimizer steps (exact mid-epoch resume loses at most N steps)",
        )
        parser.add_argument(
            "--collective_timeout_s",
            type=Optional[float],
            default=None,
            help="with a data-parallel --trainer.strategy (ddp, zero1, fsdp2, ...): a collective that waits longer "
            "than this fails (default: 1800)",
        )

    def subcommands(self) -> Dict[str, Set[str]]:
        """The Lightning subcommands this stage offers (`--help` lists only these)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in self.SUBCOMMANDS}

    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path last` is the newest `last.ckpt` under the root (every run has its own folder; left as
        `last` when there is none, and Lightning starts afresh with a warning). The file's hyper-parameters are
        then merged into the config as LightningCLI does, but read by `swinv2.read_checkpoint` and checked against
        the module's typed signature first (`simmim.untrusted.checkpoint_hyperparameters`): a value that names a
        class to build is refused, not handed to the parser, which would build it.

        This overrides LightningCLI's private hook because it is the only place the CLI merges a checkpoint's
        values into the config; `tests/simmim/test_untrusted.py` fails if the pinned Lightning stops calling it."""
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        if config.get("ckpt_path") == "last":
            newest = newest_last_checkpoint(config.trainer.get("default_root_dir") or os.getcwd())
            if newest is not None:
                config.ckpt_path = str(newest)
        path = config.get("ckpt_path")
        if not is_checkpoint(path):  # none yet, a URL, a missing file: the trainer says what is wrong
            return
        if os.path.isdir(path):  # a shard folder, whatever strategy will read it
            check_sharded_checkpoint(path)
        hparams = checkpoint_hyperparameters(metadata_file(path), self.model_class)
        if hparams:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        """A run resumed from `<save_dir>/<name>/<version>/checkpoints/*.ckpt` logs and writes into that version
        folder again (the logger's `version` is set to it), so one run keeps one folder across resumes."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt, logger = config.get("ckpt_path"), config.trainer.get("logger")
        init = logger.get("init_args") if hasattr(logger, "get") else None
        if self.subcommand != "fit" or not is_checkpoint(ckpt) or init is None:
            return
        run = Path(ckpt).resolve().parent.parent
        if "save_dir" in init and "version" in init and init.get("version") is None:
            if run.parent == (Path(init.save_dir) / (init.get("name") or "")).resolve():
                init.version = run.name

    def _max_bad_fraction(self) -> float:
        """`--data.max_bad_fraction`; the module argument it replaced is still read (older configs and checkpoints
        carry it) with a warning."""
        old = getattr(self.model, "hparams", {}).get("max_bad_fraction")
        if old is None:
            return self.datamodule.max_bad_fraction
        rank_zero_warn(f"--model.max_bad_fraction is deprecated: it is now --data.max_bad_fraction (using {old})")
        return old

    def _check_outputs(self, callbacks: list) -> None:
        """No file of the run is written through a link out of its root (`simmim.untrusted.check_run_outputs`):
        checked on every subcommand (validate writes its config.yaml too), before the trainer and its loggers
        exist. No logger configured means Lightning's default, a TensorBoard logger in `<root>/lightning_logs`.
        A `--ckpt_path last` left for Lightning to find in a configured checkpoint folder has its shard folders
        checked here (`_parse_ckpt_path` checks the ones it finds)."""
        root = self._get(self.config_init, "trainer.default_root_dir") or os.getcwd()
        loggers = self._get(self.config_init, "trainer.logger")
        if loggers is None or loggers is True:
            folders = [os.path.join(root, "lightning_logs")]
        else:
            folders = [getattr(lg, "root_dir", None) for lg in _as_list(loggers) if lg is not False]
        dirpaths = [c.dirpath for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        check_run_outputs(root, [f for f in folders if f], dirpaths)
        if self._get(self.config_init, "ckpt_path") == "last":  # not found under the root: Lightning looks here
            for folder in (Path(d) for d in dirpaths if "://" not in str(d)):
                for shards in (p for p in folder.glob("last*.ckpt") if p.is_dir()):
                    check_sharded_checkpoint(shards)

    def instantiate_trainer(self, **kwargs):
        """The configured callbacks and plugins, plus: a `ModelCheckpoint` keeping `last.ckpt` in the run's folder
        (unless one is configured) and one every `--checkpoint_every_n_steps`, the claim on the checkpoint
        folders, the bad-image limit, the data-wait timer, the stage's callbacks, and safe checkpoint reading (unless
        a `CheckpointIO` plugin is configured). bf16-mixed trains in fp32 on a CPU without bf16 arithmetic
        (`precision_for_this_cpu`)."""
        callbacks = [*_as_list(self._get(self.config_init, "trainer.callbacks")), *kwargs.pop("callbacks", [])]
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(ModelCheckpoint(save_last=True, enable_version_counter=False))
        every = self._get(self.config_init, "checkpoint_every_n_steps")
        if every:  # beside the first checkpoint callback, sharing its last.ckpt
            dirpath = next(c.dirpath for c in callbacks if isinstance(c, ModelCheckpoint))
            callbacks.append(
                ModelCheckpoint(
                    dirpath=dirpath,
                    every_n_train_steps=every,
                    save_last=True,
                    filename="periodic-{step}",
                    enable_version_counter=False,
                )
            )
        self._check_outputs(callbacks)
        self.bad_images = BadImageLimit(self._max_bad_fraction())
        callbacks += [
            ClaimCheckpointFolders(self._get(self.config_init, "ckpt_path")),
            self.bad_images,
            DataWaitTimer(),
            *self.stage_callbacks(),
        ]
        timeout = self._get(self.config_init, "collective_timeout_s")
        if timeout is not None:
            kwargs["strategy"] = strategy_with_timeout(self._get(self.config_init, "trainer.strategy"), timeout)
        precision = self._get(self.config_init, "trainer.precision")
        cpu_precision = precision_for_this_cpu(precision, self._get(self.config_init, "trainer.accelerator"))
        if cpu_precision != precision:  # the trainer only: the saved config keeps what was asked
            kwargs["precision"] = cpu_precision
        plugins = _as_list(self._get(self.config_init, "trainer.plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())
        return super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)
