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
import time
from pathlib import Path
from typing import List, Optional

import pytorch_lightning as pl

from simmim.errors import ConfigError

LOCK_NAME = ".run.lock"


def newest_last_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The most recently written `last*.ckpt` in any `checkpoints` folder under `root` (None when there is none)."""
    found = [p for p in Path(root).glob("**/checkpoints/last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def claim_folder(folder: Path, resuming_here: bool) -> Optional[str]:
    """Claim a checkpoint folder for this process: None when claimed, else why it cannot be.

    Refused: a folder another live process on this machine has claimed, and a folder holding checkpoints when this
    run does not resume from one of them. A claim left by a process that is gone (a killed run) is taken over."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    owner = _read_lock(lock)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if owner.get("host") == mine["host"] and owner.get("pid") not in (None, mine["pid"]) and _alive(owner["pid"]):
        return (
            f"another run (pid {owner['pid']}, started {owner.get('started')}) is writing checkpoints to {folder}; "
            "start this one with another --trainer.default_root_dir (or let the logger give it its own version)"
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
    tmp.write_text(json.dumps(mine))
    os.replace(tmp, lock)  # take over a dead run's claim
    return None


class ClaimCheckpointFolders(pl.Callback):
    """At the start of fit, rank zero claims every checkpoint callback's folder (`claim_folder`) and all ranks stop
    together with the reason when it cannot; the claim is released at the end of fit."""

    def __init__(self) -> None:
        self.claimed: List[Path] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        problem = None
        if trainer.is_global_zero:
            resumed = Path(trainer.ckpt_path).resolve().parent if trainer.ckpt_path else None
            for folder in sorted({Path(cb.dirpath).resolve() for cb in trainer.checkpoint_callbacks if cb.dirpath}):
                problem = claim_folder(folder, resuming_here=folder == resumed)
                if problem:
                    break
                self.claimed.append(folder)
        problem = trainer.strategy.broadcast(problem)
        if problem:
            self.release()
            raise ConfigError(problem)

    def release(self) -> None:
        for folder in self.claimed:
            if _read_lock(folder / LOCK_NAME).get("pid") == os.getpid():
                (folder / LOCK_NAME).unlink(missing_ok=True)
        self.claimed = []

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release()
