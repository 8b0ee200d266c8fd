"""Configuration errors a user can act on: the option, the value, and what would work."""

from __future__ import annotations

from typing import Any


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


def check_loader(batch_size: int, num_workers: int, val_fraction: float, max_bad_fraction: float) -> None:
    """The data options both stages share."""
    require(batch_size >= 1, "--data.batch_size", batch_size, "must be a positive number of images per device")
    require(num_workers >= 0, "--data.num_workers", num_workers, "must be 0 (load in the main process) or more")
    require(0.0 <= val_fraction < 1.0, "--data.val_fraction", val_fraction, "must be in [0, 1)")
    require(0.0 <= max_bad_fraction <= 1.0, "--data.max_bad_fraction", max_bad_fraction, "must be in [0, 1]")
