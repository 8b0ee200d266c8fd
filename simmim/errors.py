"""Configuration errors a user can act on: the option, the value, and what would work."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from swinv2.convert import CheckpointMismatchError
from swinv2.reading import UnreadableCheckpointError, UnsafeCheckpointError


class ConfigError(ValueError):
    """A configuration value that cannot work. The command lines end with its one-line message, no traceback."""


class DataFolderError(ConfigError, FileNotFoundError):
    """A data folder that is missing, empty, or not laid out as the stage needs (still a FileNotFoundError)."""


class DataError(ValueError):
    """The data turned out unusable during the run (too many unreadable images); ends the run in one line."""


def require(ok: bool, option: str, value: Any, what: str) -> None:
    """Raise `ConfigError("--option value: what")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{option} {value}: {what}")


def check_loader(batch_size: int, num_workers: int, val_fraction: float) -> None:
    """The data options both stages share."""
    require(batch_size >= 1, "--data.batch_size", batch_size, "must be a positive number of images per device")
    require(num_workers >= 0, "--data.num_workers", num_workers, "must be 0 (load in the main process) or more")
    require(0.0 <= val_fraction < 1.0, "--data.val_fraction", val_fraction, "must be in [0, 1)")


@contextmanager
def user_errors_as_messages() -> Iterator[None]:
    """A bad configuration value, a missing file, or a checkpoint that is refused, unreadable, malformed or of
    another architecture, ends the command with its one-line message (exit code 1) instead of a traceback,
    wherever it was named. Every command line of the project runs inside it."""
    try:
        yield
    except (
        ConfigError,
        DataError,
        FileNotFoundError,
        UnsafeCheckpointError,
        UnreadableCheckpointError,
        CheckpointMismatchError,
    ) as e:
        raise SystemExit(f"error: {e}") from None
    except RuntimeError as e:
        if not is_collective_timeout(e):
            raise
        raise SystemExit(
            "error: a collective operation (gradient all-reduce, barrier, broadcast) timed out: another process of "
            "the run stopped responding or died (its own output says why). A step that is slow on purpose (a long "
            f"checkpoint write) needs a larger --collective_timeout_s. The library said: {str(e).splitlines()[0]}"
        ) from e


def is_collective_timeout(error: BaseException) -> bool:
    """Whether an error is a `torch.distributed` collective that timed out (gloo's "Timed out waiting ... for recv",
    NCCL's watchdog), not another timeout such as a data loader's."""
    text = str(error)
    distributed = isinstance(error, torch.distributed.DistError) or "gloo" in text or "NCCL" in text
    return distributed and ("timed out" in text.lower() or "timeout" in text.lower())
