"""Reading weight files without running any pickled code.

Every torch file goes through `torch.load(weights_only=True)`: tensors, plain containers and numbers only. The one
extra type allowed is the yacs `CfgNode` that the official microsoft/Swin-Transformer and SimMIM training scripts
pickle into their checkpoints (`{"model": ..., "config": CfgNode, ...}`); `OfficialConfig` rebuilds it as a plain
`OrderedDict`, running nothing. A file that needs anything else (a function such as `os.system`, a class of some
other library) is refused with `UnsafeCheckpointError`, which names the refused global.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from typing import Any, Dict, Union

import torch

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what a transformers hub folder holds
PathLike = Union[str, os.PathLike]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs a Python global (a function or class) that loading it would have to import or call."""


class UnreadableCheckpointError(ValueError):
    """A file that is not a checkpoint at all (truncated, another format)."""


class OfficialConfig:
    """Stands in for yacs' `CfgNode` (a dict subclass) in official checkpoints. The unpickler creates it through
    `__new__`, which returns a plain `OrderedDict`: the config's items become its items, and the attributes yacs
    pickles with it (`__immutable__`, ...) land in its `__dict__` as data. Nothing of yacs is imported or run."""

    def __new__(cls, *args: Any) -> OrderedDict:
        return OrderedDict()


# (stand-in, the name the pickle uses): passed to `torch.serialization.safe_globals` for the duration of a load.
_STAND_INS = [(OfficialConfig, "yacs.config.CfgNode")]


def _refusal(path: str, error: Exception) -> Exception:
    """One-line error for a file `torch.load(weights_only=True)` would not read."""
    text = str(error)
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        return UnsafeCheckpointError(
            f"refused to load {path}: it needs the Python global '{found.group(1)}', which loading would import "
            "or call (only tensors, plain containers and the official yacs config are read). If you trust the "
            "file, load it once with torch.load(path, weights_only=False), delete the entry holding that object "
            "and torch.save the rest"
        )
    reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if reason:
        return UnsafeCheckpointError(
            f"refused to load {path}: {reason.group(1).strip()} (only tensors, plain containers and the official "
            "yacs config are read); if you trust the file, load it once with torch.load(path, weights_only=False), "
            "delete the offending entry and torch.save the rest"
        )
    return UnreadableCheckpointError(
        f"cannot read {path} as a PyTorch checkpoint ({type(error).__name__}: {text.splitlines()[0]})"
    )


def _weights_file(path: str) -> str:
    """`path` itself, or the weights file inside a transformers hub folder."""
    if os.path.isdir(path):
        inside = [os.path.join(path, n) for n in HF_WEIGHT_FILES if os.path.isfile(os.path.join(path, n))]
        if not inside:
            raise FileNotFoundError(f"{path} is a folder without {' or '.join(HF_WEIGHT_FILES)}: pass the file")
        return inside[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def read_safetensors(path: str) -> Dict[str, Any]:
    """`{"state_dict": tensors, **header metadata}`: the same shape as a Lightning checkpoint, so the metadata a
    file records is found under the same keys whichever container holds it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, "pt") as f:
            metadata = dict(f.metadata() or {})
        return {**metadata, "state_dict": load_file(path)}
    except (SafetensorError, OSError) as e:
        raise UnreadableCheckpointError(f"cannot read {path} as safetensors ({e}): corrupt or truncated") from None


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read a `.safetensors` or torch checkpoint (`.pth`, `.ckpt`, `.bin`) on the CPU, running no pickled code.

    A folder (a transformers hub download) is read through its `model.safetensors` or `pytorch_model.bin`.
    A safetensors file comes back as `{"state_dict": tensors, **its string metadata}`.

    Raises:
        FileNotFoundError: no such file, or a folder without weights.
        UnsafeCheckpointError: the file needs a global beyond tensors, containers and the official yacs config.
        UnreadableCheckpointError: the file is not a checkpoint at all (truncated, another format).
    """
    path = _weights_file(os.fspath(path))
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, IndexError... on bad bytes
        raise _refusal(path, e) from None
