"""Reading files from other people: weights without running any pickled code, and records checked and bounded.

Everything here treats a file as data from outside: it may be crafted. Every torch file goes through
`torch.load(weights_only=True)`: tensors, plain containers and numbers only. The one
extra type allowed is the yacs `CfgNode` that the official microsoft/Swin-Transformer and SimMIM training scripts
pickle into their checkpoints (`{"model": ..., "config": CfgNode, ...}`); `OfficialConfig` rebuilds it as a plain
`OrderedDict`, running nothing. A file that needs anything else (a function such as `os.system`, a class of some
other library) is refused with `UnsafeCheckpointError`, which names the refused global. A file must be a regular
file (a FIFO or a device would hang or never end), and a torch zip archive may hold only stored members, as
`torch.save` writes them: a compressed member could expand far beyond the file's size in memory.

An architecture record (what a weights file or a run's hyper-parameters say the model is) is checked against
`ARCHITECTURE_LIMITS` by `check_architecture` before anything is allocated: a crafted record could otherwise ask for
a billion blocks or a terabyte-wide layer. The limits are wide enough for SwinV2-G at 1536 px.
"""

from __future__ import annotations

import inspect
import math
import os
import pickle
import re
import stat
import zipfile
from collections import OrderedDict
from typing import Any, BinaryIO, Dict, Mapping, Union

import torch

from swinv2.model import SwinTransformerV2

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
    """`path` itself, or the weights file inside a transformers hub folder; a regular file either way (symbolic
    links are followed, as in a Hugging Face cache, but never to a FIFO, a device or a socket)."""
    if os.path.isdir(path):
        inside = [os.path.join(path, n) for n in HF_WEIGHT_FILES if os.path.lexists(os.path.join(path, n))]
        if not inside:
            raise FileNotFoundError(f"{path} is a folder without {' or '.join(HF_WEIGHT_FILES)}: pass the file")
        path = inside[0]
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    if not stat.S_ISREG(mode):
        raise UnreadableCheckpointError(f"{path} is not a regular file (a FIFO, device or socket): not reading it")
    return path


ZIP_MAGIC = b"PK\x03\x04"  # how torch.load tells a zip archive from the legacy format


def check_archive(source: Union[str, BinaryIO], name: str, require_zip: bool = False) -> None:
    """A torch zip archive (a path or a seekable binary file) holds stored (uncompressed) members whose sizes add up
    to at most its own size; anything else could inflate in memory far beyond the file (a 1 MB file holding 1 GiB
    of zeros). A file that is not a zip (torch's legacy format) passes unless `require_zip`.

    Raises:
        UnreadableCheckpointError: a compressed or oversized member, a broken zip, or not a zip when required.
    """
    f = open(source, "rb") if isinstance(source, str) else source
    try:
        f.seek(0)
        if f.read(4) != ZIP_MAGIC:
            if require_zip:
                raise UnreadableCheckpointError(f"{name} is not a torch archive (torch writes zip archives)")
            return
        size = f.seek(0, os.SEEK_END)
        try:
            members = zipfile.ZipFile(f).infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
            raise UnreadableCheckpointError(f"cannot read {name} as a PyTorch checkpoint (a broken zip: {e})") from None
    finally:
        if isinstance(source, str):
            f.close()
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED or m.file_size > size:
            raise UnreadableCheckpointError(
                f"refused to load {name}: its member {m.filename!r} is compressed ({m.compress_size} bytes that "
                f"expand to {m.file_size}); torch.save never compresses, so the file was made by another tool or "
                "crafted to exhaust memory"
            )
    if sum(m.file_size for m in members) > size:
        raise UnreadableCheckpointError(f"refused to load {name}: its members add up to more than the file's size")


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
        UnreadableCheckpointError: the file is not a checkpoint at all (truncated, another format), is not a
            regular file, or is an archive with compressed members.
    """
    path = _weights_file(os.fspath(path))
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    check_archive(path, path)
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, IndexError... on bad bytes
        raise _refusal(path, e) from None


# ---------------------------------------------------------------------------------------------------------------
# Architecture records: checked and bounded before any allocation

# (lowest, highest) of each number an architecture may hold. SwinV2-G (embed 512, depths 2-2-42-4, 128 heads) at
# 1536 px and windows up to 48 fits with room; a record beyond them is damaged or crafted.
ARCHITECTURE_LIMITS: Dict[str, tuple] = {
    "img_size": (1, 4096),  # per side, pixels
    "patch_size": (1, 64),
    "in_chans": (1, 512),  # OpenCV's resize handles up to 512 channels
    "num_classes": (0, 100_000),  # ImageNet-22K has 21,841
    "embed_dim": (1, 4096),
    "stages": (1, 8),
    "depth": (1, 128),  # blocks per stage
    "num_heads": (1, 1024),
    "window_size": (1, 128),  # per side, tokens
    "pretrained_window_sizes": (0, 128),  # 0: none
    "mlp_ratio": (0.0, 16.0),
    "extra_norm_period": (0, 512),
    "attn_chunk_size": (1, 1 << 20),
    "drop_rate": (0.0, 1.0),
    "attn_drop_rate": (0.0, 1.0),
    "drop_path_rate": (0.0, 1.0),
    "parameters": (1, 6_000_000_000),  # SwinV2-G has about 3.0B
    # attention masks and position indices the blocks keep (SwinV2-G at 1536 px, window 48: about 1.4e9)
    "buffer_elements": (0, 2_000_000_000),
}
CHOICES = {
    "position_bias": ("log_cpb", "linear_cpb", "table"),
}
FLAGS = ("qkv_bias", "ape", "patch_norm", "mask_token", "use_checkpoint")
RECORD_FIELDS = (
    "variant", "img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depths", "num_heads", "window_size",
    "pretrained_window_sizes", "mlp_ratio", "qkv_bias", "ape", "patch_norm", "extra_norm_period", "position_bias",
    "mask_token",
)  # fmt: skip
OPTION_FIELDS = ("drop_rate", "attn_drop_rate", "drop_path_rate", "use_checkpoint", "attn_chunk_size", "fused_attn")
MAX_RECORD_CHARS = 1 << 16
_DEFAULTS = {n: p.default for n, p in inspect.signature(SwinTransformerV2).parameters.items()}


class MalformedRecordError(UnreadableCheckpointError):
    """An architecture record (or an architecture inferred from a file's keys) that no model of this project has:
    an unknown field, a value of the wrong type, or a number out of `ARCHITECTURE_LIMITS`."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(where: str, field: str, v: Any, limit: str, integer: bool = True) -> None:
    low, high = ARCHITECTURE_LIMITS[limit]
    ok = _is_int(v) if integer else (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
    if not ok or not low <= v <= high:
        kind = "an integer" if integer else "a number"
        raise MalformedRecordError(f"{where}: {field}={v!r} must be {kind} from {low} to {high}")


def _sides(where: str, field: str, v: Any, limit: str) -> tuple:
    """An int or an [h, w] pair, checked."""
    pair = [v, v] if _is_int(v) else v
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise MalformedRecordError(f"{where}: {field}={v!r} must be an integer or a pair [h, w]")
    for side in pair:
        _number(where, field, side, limit)
    return tuple(pair)


def _per_stage_sides(where: str, field: str, v: Any, stages: int, limit: str) -> list:
    if _is_int(v):
        return [_sides(where, field, v, limit)] * stages
    if not isinstance(v, (list, tuple)) or len(v) != stages:
        raise MalformedRecordError(f"{where}: {field}={v!r} must be one value, or one per stage ({stages})")
    return [_sides(where, field, x, limit) for x in v]


def read_json_record(text: Union[str, bytes], where: str) -> Any:
    """A JSON record (a safetensors header entry), bounded in length, parsed; not yet checked."""
    import json

    if len(text) > MAX_RECORD_CHARS:
        raise MalformedRecordError(f"{where}: its architecture record is {len(text)} characters long (a damaged file)")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise MalformedRecordError(f"{where}: its architecture record is not JSON ({str(e)[:120]})") from None


def parse_record(text: Union[str, bytes], where: str) -> Dict[str, Any]:
    """A JSON architecture record (a safetensors header entry), bounded in length and checked."""
    return check_architecture(read_json_record(text, where), where)


def check_architecture(arch: Any, where: str, fields: tuple = RECORD_FIELDS) -> Dict[str, Any]:
    """`arch` (SwinTransformerV2 arguments, such as a file's record) as a dict, after checking every field's type and
    range (`ARCHITECTURE_LIMITS`, `CHOICES`) and the model's size, so that building it allocates a bounded amount.
    Fields not given keep the constructor's defaults, which are within bounds.

    Raises:
        MalformedRecordError: one line naming `where`, the field and what it must be.
    """
    if not isinstance(arch, Mapping):
        raise MalformedRecordError(f"{where}: the architecture record is a {type(arch).__name__}, not a mapping")
    unknown = sorted(str(k) for k in arch if k not in fields)
    if unknown:
        raise MalformedRecordError(f"{where}: unknown architecture field(s) {unknown[:5]}; known: {', '.join(fields)}")
    a = dict(arch)
    full = {**_DEFAULTS, **a}  # what the constructor builds when a field is not given
    depths, heads = full["depths"], full["num_heads"]
    for field, v in (("depths", depths), ("num_heads", heads)):
        if not isinstance(v, (list, tuple)):
            raise MalformedRecordError(f"{where}: {field}={v!r} must be a list with one integer per stage")
    _number(where, "the number of stages", len(depths), "stages")
    if len(heads) != len(depths):
        raise MalformedRecordError(f"{where}: depths {list(depths)} and num_heads {list(heads)} differ in length")
    for d, h in zip(depths, heads):
        _number(where, "depths", d, "depth")
        _number(where, "num_heads", h, "num_heads")
    embed = full["embed_dim"]
    _number(where, "embed_dim", embed, "embed_dim")
    for i, h in enumerate(heads):
        if (embed * 2**i) % h:
            raise MalformedRecordError(f"{where}: stage {i} has {embed * 2**i} channels, not divisible by {h} heads")
    for field in ("patch_size", "in_chans", "num_classes", "extra_norm_period"):
        if field in a:
            _number(where, field, a[field], field)
    for field in ("mlp_ratio", "drop_rate", "attn_drop_rate", "drop_path_rate"):
        if field in a:
            _number(where, field, a[field], field, integer=False)
    if a.get("attn_chunk_size") is not None:
        _number(where, "attn_chunk_size", a["attn_chunk_size"], "attn_chunk_size")
    img = _sides(where, "img_size", full["img_size"], "img_size")
    windows = _per_stage_sides(where, "window_size", full["window_size"], len(depths), "window_size")
    pretrained = a.get("pretrained_window_sizes", 0)
    if not (_is_int(pretrained) and pretrained == 0) and not (
        isinstance(pretrained, (list, tuple)) and not any(pretrained)
    ):
        _per_stage_sides(where, "pretrained_window_sizes", pretrained, len(depths), "pretrained_window_sizes")
    for field, choices in CHOICES.items():
        if field in a and a[field] not in choices:
            raise MalformedRecordError(f"{where}: {field}={a[field]!r} must be one of {', '.join(choices)}")
    for field in (*FLAGS, "fused_attn"):
        if field in a and not (isinstance(a[field], bool) or (field == "fused_attn" and a[field] is None)):
            raise MalformedRecordError(f"{where}: {field}={a[field]!r} must be true or false")
    if "variant" in a and not isinstance(a["variant"], str):
        raise MalformedRecordError(f"{where}: variant={a['variant']!r} must be a name")
    width = [embed * 2**i for i in range(len(depths))]
    hidden = full["mlp_ratio"]
    params = sum(d * (4 + 2 * hidden) * c * c for d, c in zip(depths, width)) + width[-1] * full["num_classes"]
    _number(where, "the parameter count", int(params), "parameters")
    _number(
        where,
        "the blocks' buffer size",
        _buffer_elements(img, full["patch_size"], windows, depths),
        "buffer_elements",
    )
    return a


def _buffer_elements(img: tuple, patch: int, windows: list, depths: list) -> int:
    """Elements of the buffers a model of this shape keeps per block: the relative position index (window^4, 64-bit,
    so counted twice) and, on shifted blocks of a stage wider than its window, the shifted-window attention mask
    (padded tokens x window^2)."""
    total = 0
    for i, (depth, window) in enumerate(zip(depths, windows)):
        res = [max(1, -(-(side // patch) // 2**i)) for side in img]  # ceil, as the model pads odd maps
        used = [min(w, r) for w, r in zip(window, res)]
        n = used[0] * used[1]
        total += depth * 2 * n * n
        if any(r > w for r, w in zip(res, used)):
            padded = [-(-r // w) * w for r, w in zip(res, used)]
            total += (depth // 2) * padded[0] * padded[1] * n
    return total
