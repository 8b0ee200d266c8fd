"""Files and folders from other people: the one place the run checks them before use.

A checkpoint, a shard folder or a run folder handed over by a colleague or downloaded with a paper may be crafted.
`swinv2.reading` reads weights without running pickled code and bounds architecture records; this module does the
same for what the Lightning side reads and writes (docs/security.md):

- `checkpoint_hyperparameters`: a checkpoint's hyper-parameters are data, checked against the module's own typed
  signature; a value that names a class to build (`class_path`, `_target_`, an instantiator) is refused.
- `check_sharded_checkpoint`: every pickle of a `torch.distributed.checkpoint` folder is read by an unpickler that
  builds only the format's classes and refuses to change a class; every storage entry stays in the folder, in a
  regular file, within its size.
- `drop_foreign_paths`: `ModelCheckpoint` state restored from a checkpoint may name only files inside that
  callback's own folder (Lightning deletes the paths it remembers).
- `check_output_folder`: a folder the run writes into leads nowhere outside the run root through a symbolic link.
- `read_run_config`: a run's saved `config.yaml`, read by the evaluation tools, parsed as plain YAML and checked;
  `run_folder` finds it beside a weights file or above its `checkpoints/`.
- `read_small`: a file named by someone else is read only as a regular file of bounded size (a FIFO would block).

Errors are one line: `swinv2.reading.UnsafeCheckpointError` for something that would run code or change the
process, `MalformedRecordError` for values of the wrong type or out of bounds, `ConfigError` for folders.
"""

from __future__ import annotations

import inspect
import io
import os
import pickle
import stat
import typing
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch

from simmim.errors import ConfigError
from swinv2.model import VARIANTS
from swinv2.reading import (
    OPTION_FIELDS,
    RECORD_FIELDS,
    MalformedRecordError,
    UnreadableCheckpointError,
    UnsafeCheckpointError,
    check_architecture,
    check_archive,
    read_checkpoint,
)

# Keys that make jsonargparse (or Hydra) import and build something: refused anywhere in a value read from a file.
CLASS_SPEC_KEYS = frozenset({"class_path", "init_args", "dict_kwargs", "_target_", "_class_path", "__class__"})
# What LightningCLI itself records as a module's `_instantiator` (Lightning's own allow-list).
HONEST_INSTANTIATORS = frozenset(
    {"pytorch_lightning.cli.instantiate_module", "lightning.pytorch.cli.instantiate_module"}
)
MAX_NESTING = 16  # depth of lists and mappings in a hyper-parameter value
MAX_ITEMS = 4096  # entries of one list or mapping
MAX_TEXT = 4096  # characters of one string


# ---------------------------------------------------------------------------------------------------------------
# Hyper-parameters


def _plain(value: Any, key: str, where: str, depth: int = 0) -> None:
    """Refuse anything but bounded plain data (None, bool, int, float, str, lists/tuples, str-keyed dicts) and
    any mapping that names a class to build."""
    if depth > MAX_NESTING:
        raise MalformedRecordError(f"{where}: hyper-parameter {key} is nested more than {MAX_NESTING} levels deep")
    if value is None or isinstance(value, (bool, int, float)):
        return
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise MalformedRecordError(f"{where}: hyper-parameter {key} is a string of {len(value)} characters")
        if "${" in value:  # the omegaconf parser would resolve it (${oc.env:SECRET} reads the environment)
            raise UnsafeCheckpointError(
                f"{where}: hyper-parameter {key}={value[:80]!r} is an interpolation the config parser would resolve; "
                "values read from a checkpoint are data: refusing the file"
            )
        return
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_ITEMS:
            raise MalformedRecordError(f"{where}: hyper-parameter {key} has {len(value)} items")
        for i, v in enumerate(value):
            _plain(v, f"{key}[{i}]", where, depth + 1)
        return
    if isinstance(value, Mapping):
        if len(value) > MAX_ITEMS:
            raise MalformedRecordError(f"{where}: hyper-parameter {key} has {len(value)} entries")
        spec = sorted(str(k) for k in value if k in CLASS_SPEC_KEYS)
        if spec:
            raise UnsafeCheckpointError(
                f"{where}: hyper-parameter {key} names a class to build ({spec[0]}: {str(value[spec[0]])[:80]!r}); "
                "values read from a checkpoint are data and never build classes: refusing the file"
            )
        for k, v in value.items():
            if not isinstance(k, str):
                raise MalformedRecordError(f"{where}: hyper-parameter {key} has a key that is not a string ({k!r})")
            _plain(v, f"{key}.{k}" if key else k, where, depth + 1)
        return
    raise UnsafeCheckpointError(
        f"{where}: hyper-parameter {key} is a {type(value).__module__}.{type(value).__name__}, not plain data: "
        "refusing the file"
    )


def _is_typed_dict(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, dict) and hasattr(hint, "__annotations__")


def conforms(value: Any, hint: Any) -> bool:
    """Whether plain `value` is of the concrete type `hint`: None, bool, int, float, str, Optional/Union, Literal,
    List/Sequence/Tuple (a list or a tuple), Dict[str, T], and TypedDicts (known keys only). `Any` and every other
    type conform to nothing: a value from a file must match a type the module spells out."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is Union:
        return any(conforms(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if _is_typed_dict(hint):
        fields = typing.get_type_hints(hint)
        return isinstance(value, Mapping) and all(k in fields and conforms(v, fields[k]) for k, v in value.items())
    if origin in (list, tuple, typing.Sequence.__origin__) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args))
        return not args or all(conforms(v, args[0]) for v in value)
    if origin in (dict, typing.Mapping.__origin__):
        key, item = args or (str, Any)
        return isinstance(value, Mapping) and all(conforms(k, key) and conforms(v, item) for k, v in value.items())
    return False


def signature_types(module_class: type) -> Dict[str, Any]:
    """The typed `__init__` parameters of a module: what its hyper-parameters may hold."""
    hints = typing.get_type_hints(module_class.__init__)
    names = [n for n in inspect.signature(module_class.__init__).parameters if n != "self"]
    return {n: hints[n] for n in names if n in hints}


def encoder_architecture(hparams: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """The `SwinTransformerV2` arguments a stage module builds from `hparams` (its variant, then its own arguments,
    then `encoder_kwargs`), checked and bounded by `swinv2.reading.check_architecture`."""
    arch = hparams.get("arch", "swinv2_base")
    if arch not in VARIANTS:
        raise MalformedRecordError(f"{where}: arch={arch!r} is none of {', '.join(sorted(VARIANTS))}")
    own = ("img_size", "patch_size", "window_size", "pretrained_window_sizes", "num_classes", "drop_path_rate",
           "in_chans")  # fmt: skip
    kwargs = {**VARIANTS[arch], **{k: hparams[k] for k in own if hparams.get(k) is not None}}
    kwargs.update(hparams.get("encoder_kwargs") or {})
    if "pretrained_window_sizes" in kwargs and not kwargs["pretrained_window_sizes"]:
        kwargs["pretrained_window_sizes"] = 0
    return check_architecture(kwargs, where, (*RECORD_FIELDS, *OPTION_FIELDS))


def checked_hyperparameters(hparams: Any, module_class: type, where: str) -> Dict[str, Any]:
    """`hparams` (read from a file) as arguments of `module_class`, after checking that they are plain data of the
    types its signature declares and that the encoder they describe is within bounds. Lightning's own
    `_instantiator` entry is dropped when it is Lightning's; any other, and `_class_path`, are refused.

    Raises:
        UnsafeCheckpointError: a value names a class, a callable or an import path to build.
        MalformedRecordError: an unknown key, a value of another type, an encoder out of bounds.
    """
    if hparams is None:
        return {}
    if not isinstance(hparams, Mapping):
        raise MalformedRecordError(f"{where}: its hyper-parameters are a {type(hparams).__name__}, not a mapping")
    hparams = dict(hparams)
    instantiator = hparams.pop("_instantiator", None)
    if instantiator is not None and instantiator not in HONEST_INSTANTIATORS:
        raise UnsafeCheckpointError(
            f"{where}: its hyper-parameters name the instantiator {str(instantiator)[:80]!r}, a callable to import; "
            "values read from a checkpoint are data and never build classes: refusing the file"
        )
    return _checked_arguments(hparams, module_class, where, "hyper-parameter ", MalformedRecordError)


def _checked_arguments(values: Mapping[str, Any], cls: type, where: str, noun: str, error: type) -> Dict[str, Any]:
    """`values` as arguments of `cls`: plain data (`_plain`), known names of the declared types (`conforms`), and,
    for a stage module, an encoder within bounds (`encoder_architecture`); else an `error` naming the `noun`."""
    _plain(values, "", where)
    types = signature_types(cls)
    for key, value in values.items():
        if key not in types:
            raise error(f"{where}: {noun}{key!r} is not an argument of {cls.__name__} (another version, or crafted)")
        if not conforms(value, types[key]):
            raise error(f"{where}: {noun}{key}={str(value)[:80]!r} is not a {_type_name(types[key])}")
    if "arch" in types:
        encoder_architecture(values, where)
    elif isinstance(values.get("img_size"), int):  # a data module's crop, bounded as a model's input is
        check_architecture({"img_size": values["img_size"]}, where)
    return dict(values)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def checkpoint_hyperparameters(path: str | os.PathLike, module_class: type) -> Dict[str, Any]:
    """The checked hyper-parameters of the Lightning checkpoint at `path` (a sharded checkpoint's `meta.pt`), read
    without running code (`checked_hyperparameters`)."""
    raw = read_checkpoint(path)
    lightning = ("hyper_parameters", "state_dict", "loops", "pytorch-lightning_version")
    if not isinstance(raw, Mapping) or not any(k in raw for k in lightning):
        entries = sorted(map(str, raw))[:8] if isinstance(raw, Mapping) else type(raw).__name__
        raise UnreadableCheckpointError(
            f"{path} is not a Lightning checkpoint of this project (its entries: {entries}): --ckpt_path resumes or "
            "evaluates a run; to start from the file's weights pass --model.pretrained"
        )
    return checked_hyperparameters(raw.get("hyper_parameters"), module_class, os.fspath(path))


def checked_counts(state: Any, keys: Tuple[str, ...], where: str) -> Dict[str, int]:
    """A callback's or loader's state read from a checkpoint: `keys`, each a whole number from 0 to 2**62."""
    if not isinstance(state, Mapping):
        raise MalformedRecordError(f"{where}: the checkpoint holds a {type(state).__name__}, not a state mapping")
    for key in keys:
        v = state.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62):
            raise MalformedRecordError(f"{where}: the checkpoint's {key}={str(v)[:40]!r} is not a count")
    return {k: int(state[k]) for k in keys}


# ---------------------------------------------------------------------------------------------------------------
# Shard folders (torch.distributed.checkpoint)

# What a torch.distributed.checkpoint `.metadata` pickle is made of (torch 2.8 to 2.14; Path under Python <= 3.12
# and >= 3.13), as exact (module, name) pairs: a dotted name such as "os.system" would reach any global of the
# module.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_CLASSES = {
    *((_DCP_METADATA, n) for n in ("Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
                                   "ChunkStorageMetadata", "TensorProperties", "StorageMeta")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}  # fmt: skip
_DCP_GLOBALS = {
    *_DCP_CLASSES,
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib._local", "PosixPath"),
}
MAX_METADATA_BYTES = 1 << 30


class _MetadataUnpickler(pickle._Unpickler):
    """An unpickler for `.metadata` files that imports only the format's globals (`_DCP_GLOBALS`) and lets BUILD
    (the opcode that sets an object's state) touch only fresh instances of the format's own classes: a BUILD on a
    class object, such as `pathlib.PosixPath` itself, would change that class for the whole process.

    The pure-Python `pickle._Unpickler` is used because the C unpickler offers no hook per opcode; these files are
    small (a few MB for SwinV2-G), and `tests/simmim/test_untrusted.py` pins the hook."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        find = super().find_class  # the format's classes, imported once (no zero-argument super in a generator)
        self.format_classes = tuple(find(m, n) for m, n in _DCP_CLASSES)

    def find_class(self, module: str, name: str):
        # torch.__dict__, not getattr: a name from the file must not trigger torch's lazy imports
        dtype = module == "torch" and "." not in name and isinstance(torch.__dict__.get(name), torch.dtype)
        if (module, name) in _DCP_GLOBALS or dtype:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"the sharded checkpoint's metadata needs {module}.{name}, which is not part of the checkpoint "
            "format: refusing to load it (a crafted or foreign file)"
        )

    def load_build(self) -> None:
        target = self.stack[-2]
        if isinstance(target, type) or type(target) not in self.format_classes:
            raise UnsafeCheckpointError(
                f"the sharded checkpoint's metadata sets the state of {target!r}, which is not an object of the "
                "checkpoint format (a crafted file changing a class of the process): refusing to load it"
            )
        _plain_state(self.stack[-1])
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _plain_state(state: Any, depth: int = 0) -> None:
    """BUILD state of a format object: plain data and the format's own objects, never a class or a function."""
    if depth > MAX_NESTING or isinstance(state, type) or callable(state) and not isinstance(state, torch.Size):
        raise UnsafeCheckpointError("the sharded checkpoint's metadata holds a class or a function as state")
    if isinstance(state, (list, tuple)):
        for s in state:
            _plain_state(s, depth + 1)
    elif isinstance(state, dict):
        for k, v in state.items():
            _plain_state(k, depth + 1)
            _plain_state(v, depth + 1)


def _check_storage(folder: Path, fqn: str, info: Any, sizes: Dict[str, int]) -> None:
    """A storage entry names a regular file directly in `folder` and a byte range within it."""
    name, offset, length = info.relative_path, info.offset, info.length
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", "..") or "\x00" in name:
        raise UnsafeCheckpointError(f"the sharded checkpoint's entry {fqn} is stored in {name!r}, outside its folder")
    if name not in sizes:
        try:
            st = os.lstat(folder / name)
        except OSError:
            raise MalformedRecordError(f"the sharded checkpoint's entry {fqn} is in {name}, which is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeCheckpointError(f"the sharded checkpoint's file {name} is not a regular file (a link, FIFO...)")
        sizes[name] = st.st_size
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, length))
    if not ok or offset < 0 or length < 0 or offset + length > sizes[name]:
        raise MalformedRecordError(
            f"the sharded checkpoint's entry {fqn} reads bytes {offset!r}+{length!r} of {name} ({sizes[name]} bytes)"
        )


class _Window(io.RawIOBase):
    """A read-only view of bytes [offset, offset + length) of a file, for checking one storage entry's archive
    without reading it whole."""

    def __init__(self, f: BinaryIO, offset: int, length: int) -> None:
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self.pos = max(0, {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence] + pos)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        self.f.seek(self.offset + self.pos)
        data = self.f.read(max(n, 0))
        self.pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read_metadata(path: Path) -> Any:
    from torch.distributed.checkpoint.metadata import Metadata

    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_METADATA_BYTES:
        raise UnsafeCheckpointError(f"{path} is not a regular file of at most 1 GiB: not reading it")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or garbled bytes raise anything from EOFError to TypeError
        raise MalformedRecordError(
            f"{path} is not torch.distributed.checkpoint metadata ({type(e).__name__})"
        ) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise UnsafeCheckpointError(f"{path} is not torch.distributed.checkpoint metadata: not loading it")
    if not isinstance(metadata.storage_data, dict):
        raise MalformedRecordError(f"{path} has no storage table")
    return metadata


def check_sharded_checkpoint(folder: str | os.PathLike) -> None:
    """Refuse a shard folder that would run code, change the process, or read outside itself when loaded.

    `meta.pt` goes through the project's safe reader; every `*.metadata` file (torch reads `__{rank}.metadata` when
    `.metadata` is missing) through `_MetadataUnpickler`; `.metadata` must be there. Every storage entry must name a
    regular file of the folder and a byte range inside it, every tensor and byte entry must have one, and every byte
    entry (optimizer hyper-parameters...), which torch.distributed.checkpoint unpickles without restriction, must
    load with `torch.load(weights_only=True)`.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

    folder = Path(folder)
    read_checkpoint(folder / "meta.pt")
    if not (folder / ".metadata").is_file():
        raise MalformedRecordError(f"{folder} has no .metadata file: not a complete sharded checkpoint")
    metadata_files = sorted(p for p in folder.iterdir() if p.name.endswith(".metadata"))
    sizes: Dict[str, int] = {}
    for path in metadata_files:
        metadata = _read_metadata(path)
        for index, info in metadata.storage_data.items():
            if not isinstance(index, MetadataIndex) or type(info).__name__ != "_StorageInfo":
                raise UnsafeCheckpointError(f"{path}'s storage table holds {type(info).__name__}, not storage entries")
            _check_storage(folder, index.fqn, info, sizes)
            if getattr(info, "transform_descriptors", None):
                raise UnsafeCheckpointError(f"the sharded checkpoint's entry {index.fqn} is stored transformed")
            with open(folder / info.relative_path, "rb") as f:  # torch.load inflates what an entry's zip holds
                check_archive(_Window(f, info.offset, info.length), f"the sharded checkpoint's entry {index.fqn}", True)
        for fqn, entry in metadata.state_dict_metadata.items():
            if isinstance(entry, TensorStorageMetadata):
                if not all(MetadataIndex(fqn, c.offsets) in metadata.storage_data for c in entry.chunks):
                    raise MalformedRecordError(f"{path}: the tensor {fqn} has a chunk with no storage entry")
                continue
            if not isinstance(entry, BytesStorageMetadata):
                raise UnsafeCheckpointError(f"{path}: the entry {fqn} is a {type(entry).__name__}")
            info = metadata.storage_data.get(MetadataIndex(fqn))
            if info is None:
                raise MalformedRecordError(f"{path}: the entry {fqn} has no storage entry")
            with open(folder / info.relative_path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
            try:
                torch.load(io.BytesIO(data), weights_only=True)
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(
                    f"the sharded checkpoint's entry {fqn} would run code when read "
                    f"({str(e).splitlines()[0][:200]}): refusing to load it"
                ) from None


# ---------------------------------------------------------------------------------------------------------------
# Run folders: restored paths and symbolic links


def _inside(path: str, folder: str) -> bool:
    """Whether `path` lies in `folder`, both as written (`..` resolved) and after following symbolic links. A
    `local://` or `file://` URL is a local path; other URLs (object stores) compare as text, `..` refused."""
    path, folder = local_path(path), local_path(folder)
    if "://" in folder or "://" in path:
        parts = path.split("://", 1)[-1].split("/")
        return path.startswith(folder.rstrip("/") + "/") and ".." not in parts
    literal = os.path.normpath(os.path.abspath(path))
    base = os.path.normpath(os.path.abspath(folder))
    if os.path.commonpath([literal, base]) != base or literal == base:
        return False
    real, real_base = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, real_base]) == real_base


def local_path(path: str) -> str:
    """`path` without a `local://` or `file://` scheme (fsspec's names for the local filesystem)."""
    for scheme in ("local://", "file://"):
        if path.startswith(scheme):
            return path[len(scheme) :]
    return path


def drop_foreign_paths(state: Dict[str, Any], folder: str) -> Tuple[Dict[str, Any], List[str]]:
    """A `ModelCheckpoint` state read from a checkpoint, keeping only paths inside `folder` (the callback's own
    checkpoint folder in this run): Lightning overwrites and deletes the paths it remembers. Returns the state and
    the paths dropped."""
    state, dropped = dict(state), []
    for key in ("best_model_path", "last_model_path", "kth_best_model_path"):
        value = state.get(key)
        if value and not (isinstance(value, str) and _inside(value, folder)):
            dropped.append(str(value))
            state[key] = ""
    best_k = state.get("best_k_models")
    if best_k is not None:
        kept = (
            {p: s for p, s in best_k.items() if isinstance(p, str) and _inside(p, folder)}
            if isinstance(best_k, Mapping)
            else {}
        )
        dropped += [str(p) for p in (best_k if isinstance(best_k, Mapping) else [best_k]) if p not in kept]
        state["best_k_models"] = kept
    return state, dropped


def check_output_folder(folder: str | os.PathLike, root: str | os.PathLike, recursive: bool = True) -> None:
    """Refuse to write into `folder` when it, or a symbolic link in it, leads outside `root` (the run's root as the
    user gave it): a downloaded run folder could otherwise redirect `config.yaml`, a checkpoint or an export onto
    any file the user can write. A `folder` outside `root` (a checkpoint `dirpath` the user chose) is its own root.
    Entries are checked recursively unless `recursive` is False (a root shared with other data)."""
    folder, root = os.path.abspath(folder), os.path.abspath(root)
    if os.path.commonpath([folder, root]) != root:
        root = folder
    real_root = os.path.realpath(root)

    def leaves(path: str) -> bool:
        return os.path.commonpath([os.path.realpath(path), real_root]) != real_root

    # the folder and every folder between it and the root
    here = folder
    while True:
        if os.path.lexists(here) and leaves(here):
            raise ConfigError(_link_message(here, root))
        if here == root or os.path.dirname(here) == here:
            break
        here = os.path.dirname(here)
    if not os.path.isdir(folder):
        return
    for base, dirs, files in os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]:
        for name in (*dirs, *files):
            path = os.path.join(base, name)
            if os.path.islink(path) and leaves(path):
                raise ConfigError(_link_message(path, root))


# What a run writes directly in its root when it has no logger (with a logger, these go to the logger's folder).
RUN_OUTPUTS = (
    "config.yaml", "hparams.yaml", "checkpoints", "reconstructions", "predictions.csv", "encoder.safetensors",
    "classifier.safetensors", "classifier_timm.safetensors",
)  # fmt: skip


def check_run_outputs(
    root: str | os.PathLike, logger_folders: List[str], checkpoint_folders: List[str], names: Sequence[str] = ()
) -> None:
    """Before the trainer exists (loggers create their folders and first files as it starts): refuse a run whose
    loggers' folders, whose configured checkpoint folders, or (without a logger, or with one writing in the root
    itself) whose root under a name the run writes there (`RUN_OUTPUTS` and `names`, such as the configured
    exports) hold a symbolic link leading outside the root (`check_output_folder`)."""
    root = os.path.abspath(root)
    in_root = not logger_folders or any(os.path.abspath(f) == root for f in logger_folders)
    for name in (*RUN_OUTPUTS, *names) if in_root else ():
        path = os.path.join(root, name)
        if os.path.lexists(path):
            check_output_folder(path, root)
    for folder in [*logger_folders, *checkpoint_folders]:
        check_output_folder(folder, root, recursive=os.path.abspath(folder) != root)


def _link_message(path: str, root: str) -> str:
    return (
        f"{path} is a symbolic link to {os.path.realpath(path)}, outside the run's folder {root}: the run would write "
        "there. Remove the link (a run folder from someone else may hold crafted links) or choose another "
        "--trainer.default_root_dir"
    )


# ---------------------------------------------------------------------------------------------------------------
# Run configs read by the evaluation tools

MAX_CONFIG_BYTES = 1 << 20


def read_small(path: str | os.PathLike, limit: int, follow_links: bool = True) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (a FIFO or a device would block or never end; a larger
    file is not ours), optionally without following a link. Raises OSError, or ValueError saying why."""
    flags = os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    with open(path, "rb", opener=lambda p, f: os.open(p, f | flags)) as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError("not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


def run_folder(src: str | os.PathLike) -> Optional[Path]:
    """The run folder of a weights file: the folder holding it, or the one above `checkpoints/`, where it holds a
    `config.yaml`; None otherwise (a file from elsewhere)."""
    path = Path(src).absolute()
    for folder in (path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder
    return None


def read_run_config(path: str | os.PathLike, sections: Mapping[str, type]) -> Dict[str, Dict[str, Any]]:
    """The `sections` (name -> the class whose arguments it holds, such as {"data": PretrainDataModule}) of a run's
    saved `config.yaml`, parsed as plain YAML (no tags, no objects) and checked as hyper-parameters are; missing
    sections are {}. The model section's encoder is bounded (`encoder_architecture`)."""
    import yaml

    path = Path(path)
    try:
        data = read_small(path, MAX_CONFIG_BYTES)
    except (ValueError, IsADirectoryError):
        raise ConfigError(f"{path} is not a regular file of at most 1 MiB: not a run's config.yaml") from None
    try:
        config = yaml.safe_load(data.decode())
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path} is not YAML ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(config, Mapping):
        raise ConfigError(f"{path} holds a {type(config).__name__}, not a run's configuration (a mapping)")
    out = {}
    for name, cls in sections.items():
        section = config.get(name) or {}
        where = f"{path} ({name})"
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where} is a {type(section).__name__}, not a mapping")
        section = {k: v for k, v in section.items() if v is not None}
        out[name] = _checked_arguments(section, cls, where, "", ConfigError)
    return out
