"""The command line both stages share: one LightningCLI subclass (`StageCLI`) with omegaconf configs, `fit` as the
default subcommand, the run's callbacks and plugins declared where LightningCLI expects them, `--ckpt_path last`,
and user errors as one line instead of a traceback (`simmim.errors`). A stage describes what it adds as data
(`Stage`: program, subcommands, default config, option links, callbacks, a check of the parsed config).

What every run gets, and where it is declared:

- Callbacks with a setting, each an option group in the saved `config.yaml`: `--checkpoint.*`, the `ModelCheckpoint`
  keeping `last.ckpt` in the run's own folder; `--checkpoint_every_n_steps`, `last.ckpt` every N optimizer steps
  (`StepCheckpoint`); `--bad_images.max_fraction`, the bad-image limit; `--export.files`, the weight files written
  at the end of fit; and the stage's own (`--grid.*`, `--best_checkpoint.*`).
- Callbacks without a setting are the default `--trainer.callbacks` list, so the saved `config.yaml` lists them
  too: the claim on the checkpoint folders, the logged wait for data, and the stage's own (the predictions CSV). A
  list given in a config or on the command line that leaves one out gets it back, first in the list.
- `trainer.plugins` defaults to `SafeCheckpointIO`, which reads checkpoints without running code from them; a run
  whose checkpoints would be read by Lightning's own `TorchCheckpointIO` (which unpickles) is refused.
- `--ckpt_path last` is the newest `last.ckpt` under the root, resolved when the arguments are parsed; the
  checkpoint's hyper-parameters are merged into the config only after `simmim.checkpointing.untrusted` checked them.
- bf16-mixed trains in fp32 on a CPU that would emulate bf16 (`precision_for_this_cpu`); `--collective_timeout_s`
  bounds the collectives of a data-parallel strategy.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from jsonargparse import Namespace
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_info

from simmim.checkpointing.exports import ExportWeights
from simmim.checkpointing.runs import ClaimCheckpointFolders, is_checkpoint, metadata_file, newest_last_checkpoint
from simmim.checkpointing.untrusted import check_run_outputs, check_sharded_checkpoint, checkpoint_hyperparameters
from simmim.data.watch import BadImageLimit, DataWaitTimer
from simmim.distributed import strategy_with_timeout
from simmim.errors import ConfigError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
SAFE_IO = "simmim.checkpointing.exports.SafeCheckpointIO"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
REQUIRED_CALLBACKS = (ClaimCheckpointFolders, DataWaitTimer)  # every run of either stage (`Stage.required` adds)

# main(args) is how tests and the entry point drive the CLI; the warning about args beside sys.argv is noise.
warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")


def has_config(args: List[str]) -> bool:
    """Whether the arguments name a `--config` file."""
    return any(a == "--config" or a.startswith("--config=") for a in args)


@dataclass(frozen=True)
class Stage:
    """What one stage adds to the shared command line.

    Args:
        prog, description: As `--help` shows them.
        subcommands: The Lightning subcommands it offers.
        default_config: The config put first when the arguments name none.
        exports: The default `--export.files` (file name -> layout).
        options: Callbacks with settings, each an option group in the saved config: (key, class, defaults).
        links: `(source, target)` options linked after the groups are added (`parser.link_arguments`), or
            `(source, target, "instantiate")`: an attribute of the built source (the data module) given to the target.
        required: Callback classes without a setting that every run has (built with no arguments; the default
            `--trainer.callbacks`).
        check: Called with the subcommand's parsed config before any class is built; it may fill values in or
            raise `ConfigError`.
        resume_ignores: Hyper-parameters a `--ckpt_path` checkpoint does not set (the command line's stand): paths
            the module would read, whose contents the checkpoint's weights replace anyway.
    """

    prog: str
    description: str
    subcommands: Tuple[str, ...]
    default_config: Path
    exports: Dict[str, str]
    options: Tuple[Tuple[str, type, Dict[str, Any]], ...] = ()
    links: Tuple[Tuple[str, ...], ...] = ()
    required: Tuple[type, ...] = ()
    check: Optional[Callable[[Any], None]] = None
    resume_ignores: Tuple[str, ...] = ()


def with_default_subcommand(args: Optional[List[str]], stage: Stage) -> List[str]:
    """Arguments without a subcommand run `fit`; without `--config` the stage's default config comes first, so
    `--data.root DIR` alone runs the default recipe on DIR. A Lightning subcommand the stage does not offer (such as
    `test`, which has no meaning without labels in pretraining) ends with a one-line message."""
    args, offered = list(args or []), stage.subcommands
    if args and args[0] in LIGHTNING_SUBCOMMANDS and args[0] not in offered:
        raise SystemExit(f"error: {stage.prog} has no `{args[0]}` subcommand; it offers {', '.join(offered)}")
    if not args or args[0] not in (*offered, "-h", "--help"):
        args = ["fit", *args]
    if args[0] in offered and not has_config(args):
        args = [args[0], "--config", str(stage.default_config), *args[1:]]
    return args


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX on x86); without, PyTorch emulates bf16
    matmuls, several times slower than fp32 (docs/training.md). True where it cannot tell (other architectures,
    other PyTorch versions)."""
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


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _class_named(path: Any) -> Optional[type]:
    """The class a parsed `class_path` names (the parser has imported it already); None for anything else."""
    module, _, name = str(path).rpartition(".")
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


class StepCheckpoint(ModelCheckpoint):
    """`last.ckpt` (and `periodic-{step}.ckpt`) every `every_n_train_steps` optimizer steps, in the folder of the
    run's epoch-end checkpoints, so that an interrupted run loses at most that many steps. None: it writes nothing.
    """

    def __init__(self, dirpath: Optional[str] = None, every_n_train_steps: Optional[int] = None) -> None:
        active = bool(every_n_train_steps)
        super().__init__(
            dirpath=dirpath,
            filename="periodic-{step}",
            save_last=active,
            every_n_train_steps=every_n_train_steps or 0,
            every_n_epochs=None if active else 0,
            enable_version_counter=False,
        )


class StageCLI(LightningCLI):
    """LightningCLI as both stages use it, for the stage `stage` describes (`Stage`)."""

    def __init__(self, stage: Stage, model_class, datamodule_class, args: List[str], **kwargs) -> None:
        self.stage = stage
        # omegaconf+: interpolations are resolved after the command line is applied, so the default configs'
        # `save_dir: ${...default_root_dir}` follows `--trainer.default_root_dir`.
        kwargs.setdefault(
            "parser_kwargs", {"parser_mode": "omegaconf+", "prog": stage.prog, "description": stage.description}
        )
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        self.required = (*REQUIRED_CALLBACKS, *stage.required)
        kwargs["trainer_defaults"] = {"plugins": [{"class_path": SAFE_IO}], **(kwargs.get("trainer_defaults") or {})}
        super().__init__(model_class, datamodule_class, args=args, **kwargs)

    def callback(self, cls: type) -> Any:
        """The run's callback of class `cls` (the first, where there are several)."""
        return next(c for c in self.trainer.callbacks if isinstance(c, cls))

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.callbacks": [{"class_path": _class_path(c)} for c in self.required]})
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.enable_version_counter": False})
        parser.add_lightning_class_args(StepCheckpoint, "step_checkpoint")
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=Optional[int],
            default=None,
            help="also write last.ckpt every N optimizer steps (exact mid-epoch resume loses at most N steps)",
        )
        parser.link_arguments("checkpoint_every_n_steps", "step_checkpoint.every_n_train_steps")
        parser.link_arguments("checkpoint.dirpath", "step_checkpoint.dirpath")
        parser.add_lightning_class_args(BadImageLimit, "bad_images")
        parser.add_lightning_class_args(ExportWeights, "export")
        parser.set_defaults({"export.files": dict(self.stage.exports)})
        for key, cls, defaults in self.stage.options:
            parser.add_lightning_class_args(cls, key)
            parser.set_defaults({f"{key}.{name}": value for name, value in defaults.items()})
        for source, target, *when in self.stage.links:
            parser.link_arguments(source, target, apply_on=when[0] if when else "parse")
        parser.add_argument(
            "--collective_timeout_s",
            type=Optional[float],
            default=None,
            help="with a data-parallel --trainer.strategy (ddp, zero1, fsdp2, ...): a collective that waits longer "
            "than this fails (default: 1800)",
        )

    def subcommands(self) -> Dict[str, Set[str]]:
        """The Lightning subcommands this stage offers (`--help` lists only these)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in self.stage.subcommands}

    def setting(self, key: str) -> Any:
        """An option of the running subcommand, as instantiated (`"trainer.precision"`, `"ckpt_path"`)."""
        return (self.config_init[self.subcommand] if self.subcommand else self.config_init).get(key)

    def parse_arguments(self, parser, args) -> None:
        """The arguments, then `--ckpt_path`: `last` becomes the newest `last.ckpt` under the root (every run has
        its own folder; left as `last` when there is none, and Lightning starts afresh with a warning), a shard
        folder is checked, and the checkpoint's hyper-parameters are merged into the config, as LightningCLI does,
        but read by `swinv2.read_checkpoint` and checked against the module's typed signature first
        (`checkpoint_hyperparameters`): a value that names a class to build is refused, never handed to the parser,
        which would build it."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
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
        for name in self.stage.resume_ignores:  # a path the file names is never read: the run's is
            hparams.pop(name, None)
        if hparams:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def _parse_ckpt_path(self) -> None:
        """Does nothing. LightningCLI's private hook would merge `--ckpt_path`'s hyper-parameters into the config
        unchecked, where a value naming a class gets built; `parse_arguments` has merged the checked ones. Overriding
        it is the only way to turn it off: `tests/simmim/test_untrusted.py` fails if the pinned Lightning renames it
        or stops calling it."""

    def before_instantiate_classes(self) -> None:
        """The stage's check of the config (`Stage.check`), the callbacks every run has (`_require_callbacks`); then
        a run resumed from `<save_dir>/<name>/<version>/checkpoints/*.ckpt` logs and writes into that version folder
        again (the logger's `version` is set to it), so one run keeps one folder across resumes."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.stage.check is not None:
            self.stage.check(config)
        self._require_callbacks(config.trainer)
        ckpt, logger = config.get("ckpt_path"), config.trainer.get("logger")
        init = logger.get("init_args") if hasattr(logger, "get") else None
        if self.subcommand != "fit" or not is_checkpoint(ckpt) or init is None:
            return
        run = Path(ckpt).resolve().parent.parent
        if "save_dir" in init and "version" in init and init.get("version") is None:
            if run.parent == (Path(init.save_dir) / (init.get("name") or "")).resolve():
                init.version = run.name

    def _require_callbacks(self, trainer) -> None:
        """A `--trainer.callbacks` list (from a config or the command line) that leaves out a callback every run
        has (`REQUIRED_CALLBACKS`, `Stage.required`; a subclass of one counts as it) gets it back, first in the list,
        where it is listed in the saved config as well."""
        given = _as_list(trainer.get("callbacks"))
        classes = [_class_named(c.get("class_path")) for c in given if hasattr(c, "get")]
        missing = [cls for cls in self.required if not any(issubclass(c, cls) for c in classes if c is not None)]
        if missing:
            trainer.callbacks = [*(Namespace(class_path=_class_path(cls)) for cls in missing), *given]

    def after_instantiate_classes(self) -> None:
        """The claim takes the checkpoint the run resumes from (Lightning takes it up only after the callbacks'
        `setup`)."""
        for claim in self.trainer.callbacks:
            if isinstance(claim, ClaimCheckpointFolders):
                claim.resume_from = self.setting("ckpt_path")

    @property
    def export(self) -> ExportWeights:
        """The run's weight exports (`--export.*`)."""
        return self.setting("export")

    @property
    def bad_images(self) -> BadImageLimit:
        """The run's bad-image limit (`--bad_images.*`)."""
        return self.setting("bad_images")

    def _checkpoint_callbacks(self) -> List[Tuple[str, ModelCheckpoint]]:
        """(where it was configured, callback) for every ModelCheckpoint of the run: its own, then the user's."""
        keys = ["checkpoint", "step_checkpoint", *(key for key, _, _ in self.stage.options)]
        sources = [(f"--{key}.*", self.setting(key)) for key in keys]
        sources += [("--trainer.callbacks", c) for c in _as_list(self.setting("trainer.callbacks"))]
        return [(name, c) for name, c in sources if isinstance(c, ModelCheckpoint)]

    def _check_outputs(self) -> None:
        """No file of the run is written through a link out of its root (`check_run_outputs`): checked on every
        subcommand (validate writes its config.yaml too), before the trainer and its loggers exist. No logger
        configured means Lightning's default, a TensorBoard logger in `<root>/lightning_logs`. A `--ckpt_path last`
        left for Lightning to find in a configured checkpoint folder has its shard folders checked here
        (`parse_arguments` checks the ones it finds)."""
        root = self.setting("trainer.default_root_dir") or os.getcwd()
        loggers = self.setting("trainer.logger")
        if loggers is None or loggers is True:
            folders = [os.path.join(root, "lightning_logs")]
        else:
            folders = [getattr(lg, "root_dir", None) for lg in _as_list(loggers) if lg is not False]
        dirpaths = [c.dirpath for _, c in self._checkpoint_callbacks() if c.dirpath]
        check_run_outputs(root, [f for f in folders if f], dirpaths, list(self.setting("export").files))
        if self.setting("ckpt_path") == "last":  # not found under the root: Lightning looks here
            for folder in (Path(d) for d in dirpaths if "://" not in str(d)):
                for shards in (p for p in folder.glob("last*.ckpt") if p.is_dir()):
                    check_sharded_checkpoint(shards)

    def _check_checkpoint_callbacks(self) -> None:
        """Two `ModelCheckpoint`s with the same triggers (the same state key: the run's own, `--trainer.callbacks`
        or both) would make Lightning stop with a traceback: refused in one line instead."""
        seen: Dict[str, str] = {}
        for name, cb in self._checkpoint_callbacks():
            if cb.state_key in seen:
                raise ConfigError(
                    f"{seen[cb.state_key]} and {name} are ModelCheckpoints with the same triggers: give one of them "
                    "another monitor, mode or period, or configure only one (--checkpoint.save_top_k, "
                    "--best_checkpoint.save_top_k, ...; the folder of the run's own is --checkpoint.dirpath)"
                )
            seen[cb.state_key] = name

    def instantiate_trainer(self, **kwargs):
        """The trainer, after the run's output folders and checkpoint callbacks are checked, with the collective
        timeout and the precision this CPU can run (the saved config keeps what was asked), reading checkpoints
        without running code from them."""
        self._check_outputs()
        self._check_checkpoint_callbacks()
        timeout = self.setting("collective_timeout_s")
        if timeout is not None:
            kwargs["strategy"] = strategy_with_timeout(self.setting("trainer.strategy"), timeout)
        precision = self.setting("trainer.precision")
        cpu_precision = precision_for_this_cpu(precision, self.setting("trainer.accelerator"))
        if cpu_precision != precision:
            kwargs["precision"] = cpu_precision
        trainer = super().instantiate_trainer(**kwargs)
        io, wrappers = trainer.strategy.checkpoint_io, []
        while getattr(io, "checkpoint_io", None) is not None:  # inside wrappers such as AsyncCheckpointIO
            wrappers.append(type(io).__name__)
            io = io.checkpoint_io
        if type(io) is TorchCheckpointIO:
            how = (
                f"give {wrappers[-1]} `init_args: {{checkpoint_io: {{class_path: {SAFE_IO}}}}}`"
                if wrappers
                else f"add {SAFE_IO} to the list (`--trainer.plugins+=...` keeps it)"
            )
            raise ConfigError(
                f"--trainer.plugins leaves checkpoint reading to Lightning's TorchCheckpointIO, which unpickles: {how}"
            )
        return trainer

    def instantiate_classes(self) -> None:
        """LightningCLI's, with Lightning's objection to a setting of its own classes (an invalid
        `--checkpoint.*` combination, say) as a one-line `ConfigError`. Only here: raised later, by a running
        trainer, the same exception is a bug that keeps its traceback."""
        try:
            super().instantiate_classes()
        except MisconfigurationException as e:
            raise ConfigError(str(e)) from e
