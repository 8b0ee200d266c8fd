"""Run folders: every run writes its checkpoints in its own folder, which it claims before training; `last` finds
the newest run to resume.

With a logger (every config has one) a run's folder is the logger's version folder, `<root>/logs/version_N`, and
its checkpoints go to `<root>/logs/version_N/checkpoints`: a second run into the same root gets `version_N+1`.
Without a logger, or with a checkpoint `dirpath` fixed by the user, runs share a folder, and the claim keeps them
apart: a new run stops before training when the folder holds another run's checkpoints, and two live runs can
never write one `last.ckpt`.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn

from simmim.checkpointing.untrusted import drop_foreign_paths
from simmim.errors import ConfigError

LOCK_NAME = ".run.lock"
SHARDED_METADATA = "meta.pt"  # Lightning's name for it in a sharded (torch.distributed.checkpoint) folder


def newest_last_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The most recently written `last*.ckpt` in a run's `checkpoints` folder under `root`: `<root>/checkpoints`
    (no logger) or `<root>/<name>/<version>/checkpoints` (a logger), or one level between; None when there is
    none. The search goes no deeper, so a root that also holds a dataset is not walked. A sharded checkpoint
    (`--trainer.strategy fsdp2`) is a folder, dated by its metadata file; `last.ckpt.previous` counts when a kill
    left it without `last.ckpt`."""
    patterns = ("checkpoints/last*.ckpt", "*/checkpoints/last*.ckpt", "*/*/checkpoints/last*.ckpt")
    found = [p for pattern in patterns for p in Path(root).glob(pattern) if is_checkpoint(p)]
    # a shard folder's previous version, when a kill came between the two renames that swap in a new one
    swapped = [Path(root).glob(pattern + ".previous") for pattern in patterns]
    found += [p for ps in swapped for p in ps if is_checkpoint(p) and not p.with_suffix("").exists()]
    return max(found, key=lambda p: metadata_file(p).stat().st_mtime) if found else None


def metadata_file(checkpoint: str | os.PathLike) -> Path:
    """The file holding a checkpoint's hyper-parameters and loop state: the checkpoint itself, or `meta.pt` in
    the folder of a sharded one."""
    path = Path(checkpoint)
    return path / SHARDED_METADATA if path.is_dir() else path


def is_checkpoint(path: str | os.PathLike | None) -> bool:
    """A checkpoint file, or a sharded checkpoint's folder (one with its metadata file)."""
    return bool(path) and metadata_file(path).is_file()


def checkpoint_folder(callback, trainer: pl.Trainer) -> Path:
    """Where a `ModelCheckpoint` will write, resolved as Lightning resolves it in the callback's own `setup`: its
    `dirpath`, else `<save_dir>/<name>/<version>/checkpoints` of the first logger, else `<root>/checkpoints`."""
    if callback.dirpath is not None:
        return Path(callback.dirpath)
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version / "checkpoints"
    return Path(trainer.default_root_dir) / "checkpoints"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(lock: Path) -> dict:
    """A claim's owner, or {} when there is none or it is not one (a folder from elsewhere may hold anything under
    this name: only a small regular file with a process id is read)."""
    try:
        st = lock.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
            return {}
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
    pid = owner.get("pid") if isinstance(owner, dict) else None
    if not (isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 1 << 22):
        return {}
    return {k: owner[k] for k in ("host", "pid", "started") if isinstance(owner.get(k), (str, int))}


def claim_folder(folder: Path, resuming_here: bool) -> Optional[str]:
    """Claim a checkpoint folder for this process: None when claimed, else why it cannot be.

    Refused: a folder another live process on this machine has claimed, a folder another machine has claimed
    (unless this run resumes from it: that machine's run is then taken to be gone), and a folder holding
    checkpoints when this run does not resume from one of them. A claim left by a process of this machine that is
    gone (a killed run) is taken over."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    owner = _read_lock(lock)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if owner.get("host") == mine["host"] and owner.get("pid") not in (None, mine["pid"]) and _alive(owner["pid"]):
        return (
            f"another run (pid {owner['pid']}, started {owner.get('started')}) is writing checkpoints to {folder}; "
            "start this one with another --trainer.default_root_dir (or let the logger give it its own version), "
            f"or delete {lock} if that process is not a run (a process id reused after a restart)"
        )
    if owner.get("host") not in (None, mine["host"]) and not resuming_here:
        return (
            f"a run on {owner['host']} (pid {owner.get('pid')}, started {owner.get('started')}) claimed {folder}; "
            f"start this one with another --trainer.default_root_dir, or delete {lock} if that run is gone"
        )
    if not resuming_here and any(folder.glob("*.ckpt")):
        return (
            f"{folder} holds another run's checkpoints: to resume that run add --ckpt_path last; to start a new "
            "one pass another --trainer.default_root_dir (or delete the folder)"
        )
    if not lock.exists():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: of two runs starting, one wins
        except FileExistsError:
            return f"another run claimed {folder} at the same moment; start this one again"
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        return None
    tmp = folder / f"{LOCK_NAME}.{os.getpid()}"
    tmp.unlink(missing_ok=True)  # a link planted under this name is removed, not written through
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with os.fdopen(fd, "w") as f:
        json.dump(mine, f)
    os.replace(tmp, lock)  # take over a dead run's claim
    return None


class ClaimCheckpointFolders(pl.Callback):
    """Before the run writes its config.yaml or a checkpoint (in the callbacks' `setup`, ahead of the config saver
    and the checkpoint callbacks; Lightning has made the loggers' folders by then), rank zero claims every checkpoint
    callback's folder (`claim_folder`) and all ranks stop together with the reason when it cannot; the claim is
    released when fit ends, normally or not. A setting-free callback (the command line lists it in
    `--trainer.callbacks`); `resume_from`, the checkpoint the run resumes from, is set by the command line from
    `--ckpt_path`, which Lightning has not taken up yet when `setup` runs.
    """

    def __init__(self) -> None:
        self.resume_from: Optional[str] = None
        self.claimed: List[Path] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        problem = None
        if trainer.is_global_zero:
            folders = sorted({checkpoint_folder(cb, trainer).resolve() for cb in trainer.checkpoint_callbacks})
            ckpt = self.resume_from or trainer.ckpt_path
            resumed = Path(ckpt).resolve().parent if is_checkpoint(ckpt) else None
            for folder in folders:
                problem = claim_folder(folder, resuming_here=folder == resumed)
                if problem:
                    break
                self.claimed.append(folder)
        problem = trainer.strategy.broadcast(problem)
        if problem:
            self.release()
            raise ConfigError(problem)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Dict) -> None:
        """Before the checkpoint callbacks take their state back (Lightning restores every callback's
        `on_load_checkpoint` first), drop the remembered paths that lie outside each callback's folder in this run:
        Lightning overwrites and deletes them later, and a checkpoint from someone else could name any file."""
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict):
            return
        for cb in trainer.checkpoint_callbacks:
            state = states.get(cb.state_key)
            if isinstance(state, dict):
                folder = str(cb.dirpath or checkpoint_folder(cb, trainer))
                states[cb.state_key], dropped = drop_foreign_paths(state, folder)
                if dropped:
                    rank_zero_warn(
                        f"the checkpoint's {type(cb).__name__} state names files outside {folder}, which this run "
                        f"will neither overwrite nor delete: {dropped[:4]}"
                    )

    def release(self) -> None:
        for folder in self.claimed:
            if _read_lock(folder / LOCK_NAME).get("pid") == os.getpid():
                (folder / LOCK_NAME).unlink(missing_ok=True)
        self.claimed = []

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.release()  # Lightning's error path skips `teardown`
