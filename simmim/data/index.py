"""The file index of an image folder: every image's path (relative to the folder) in one byte buffer with offsets,
and the class of each (its top-level folder), in files that every rank and data-loader worker memory-maps. A worker
then holds no Python object per file, so it adds no memory whatever the dataset's size.

An index is built once (in `prepare_data`: rank 0 of each node) by a directory walk that lists folders side by side
on threads, and kept in a cache folder named after the tree's absolute path. It is reused while every folder it
walked keeps its modification time (a file added, removed or renamed changes its folder's time; a file rewritten in
place does not, and need not: the index holds names only); `reindex=True` (`--data.reindex true`) rebuilds it.
A user who already has a file list gives it instead (`index_from_list`, `--data.index FILE`): the tree is never
walked, and the index is rebuilt when the list changes.

The cache is read back as untrusted input: its files are checked and bounded before use, and a path it holds must
stay inside the tree (no absolute path, no `..`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from simmim.checkpointing.untrusted import read_small
from simmim.data.images import IMAGE_EXTENSIONS, folder_not_found, no_images
from simmim.errors import DataFolderError

INDEX_VERSION = 1
MAX_FILES = 1 << 33  # 8.6e9 files: the bound on a count read back from a cache
MAX_PATH_BYTES = 4096  # one path in a list file
WALK_THREADS = 16  # folders listed side by side (a shared filesystem answers many requests at once)
MAX_META_BYTES = 16 << 20  # meta.json: the class names and a few numbers, read by every process
MAX_FOLDERS_BYTES = 1 << 30  # folders.json: every folder walked and its time, read by the freshness check only
RACY_NS = 2 * 10**9  # a folder changed this close to its walk is walked again at the next start
CHECK_CHUNK = 1 << 20  # entries checked at a time (bounded temporaries in every process that opens an index)


def default_cache() -> Path:
    """Where indexes are kept unless told: `$XDG_CACHE_HOME/simmim/index` (`~/.cache/simmim/index`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "simmim" / "index"


def _key(source: Path) -> str:
    return hashlib.sha256(os.fsencode(source)).hexdigest()[:20]


def _sort_key(rel: str) -> Tuple[str, ...]:
    return tuple(rel.split("/"))  # the order of `sorted(Path...)`: part by part


def _scan(folder: Path, rel: str) -> Tuple[List[str], List[Tuple[str, int]], List[str]]:
    """One folder: (image files, (subfolder, its modification time) pairs, what was passed over), relative to the
    root. What cannot be read (a folder without permission, a link that leads nowhere or loops) is passed over and
    said in the third list."""
    files: List[str] = []
    subfolders: List[Tuple[str, int]] = []
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        return files, subfolders, [f"skipping the folder {folder}: {e.strerror or e}"]
    problems = []
    for entry in entries:
        name = f"{rel}/{entry.name}" if rel else entry.name
        try:
            if entry.is_dir(follow_symlinks=False):  # a linked folder is not followed: it could lead anywhere
                subfolders.append((name, entry.stat(follow_symlinks=False).st_mtime_ns))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                if entry.is_file():
                    files.append(name)
                elif entry.is_symlink():
                    problems.append(
                        f"skipping {folder / entry.name}: a symbolic link whose target is missing or loops back"
                    )
        except OSError as e:
            problems.append(f"skipping {folder / entry.name}: {e.strerror or e}")
    return files, subfolders, problems


def walk(root: Path, threads: int = WALK_THREADS) -> Tuple[List[str], List[Tuple[str, int]], List[str]]:
    """Every image file below `root` (relative, `/`-separated, in `sorted(Path)` order), every folder walked with
    its modification time (the root as ""), and what was passed over. Folders are listed side by side, level by
    level."""
    files: List[str] = []
    folders: List[Tuple[str, int]] = [("", os.stat(root).st_mtime_ns)]
    problems: List[str] = []
    level = [""]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        while level:
            found = list(pool.map(lambda rel: _scan(root / rel, rel), level))
            level = []
            for level_files, subfolders, passed_over in found:
                files += level_files
                folders += subfolders
                problems += passed_over
                level += [name for name, _ in subfolders]
    files.sort(key=_sort_key)
    return files, folders, problems


def _pack(strings: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Strings as one UTF-8 byte buffer and N+1 int64 offsets."""
    encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _unique() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"


def write_json(path: Path, value: Any) -> None:
    """`value` as JSON into `path`, atomically: written beside it under a hidden name no other process uses
    (`.<name>.<host>-<pid>-<uuid>.tmp`), then renamed over it, so that a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{_unique()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _write(
    key: Path, files: Sequence[str], labels: np.ndarray, classes: List[str], meta: Dict, extra: Optional[Dict] = None
) -> FileIndex:
    """A new build of the index under `key/<build>/`, then `key/current` pointed at it (both moves are atomic:
    a reader sees the old build or the new one, never half). A build is never changed or removed afterwards, so a
    run reading it keeps working while another rebuilds."""
    build = _unique()
    try:
        key.mkdir(parents=True, exist_ok=True)
        tmp = key / f"{build}.tmp"
        tmp.mkdir()
        names, offsets = _pack(files)
        names.tofile(tmp / "names.bin")
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "labels.npy", labels.astype(np.int32))
        meta = {**meta, "version": INDEX_VERSION, "build": build, "count": len(files), "classes": classes}
        (tmp / "meta.json").write_text(json.dumps(meta))
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content))
        tmp.rename(key / build)
        pointer = key / f"current.{build}.tmp"
        pointer.write_text(build)
        os.replace(pointer, key / "current")
    except OSError as e:
        raise DataFolderError(
            f"cannot write the file index under {key}: {e.strerror or e}; give a writable folder with "
            "--data.index_cache (the training commands) or the XDG_CACHE_HOME variable (every command)"
        ) from None
    return FileIndex(key / build)


def _labels(files: Sequence[str], classes: List[str]) -> np.ndarray:
    """The class of each file: the position of its top-level folder among `classes`; -1 for a file in the root."""
    ids = {c: i for i, c in enumerate(classes)}
    return np.array([ids.get(f.split("/", 1)[0], -1) if "/" in f else -1 for f in files], dtype=np.int32)


def _folders_unchanged(root: Path, folder: Path, meta: Dict) -> bool:
    """Whether every folder the index walked still has the modification time it had, and none had changed so
    close to the walk that a change in the same clock tick could have gone unseen (then the next start walks)."""
    folders = read_json(folder / "folders.json", MAX_FOLDERS_BYTES)
    if not isinstance(folders, dict) or meta.get("complete") is not True:
        return False  # something was passed over: walked again, and warned about again
    names, times, walked = folders.get("folders"), folders.get("folder_times"), meta.get("walked_at")
    if not isinstance(names, list) or not isinstance(times, list) or len(names) != len(times):
        return False
    if not isinstance(walked, int) or any(not isinstance(t, int) or t >= walked - RACY_NS for t in times):
        return False
    for rel, mtime in zip(names, times):
        try:
            if not isinstance(rel, str) or os.stat(root / rel, follow_symlinks=False).st_mtime_ns != mtime:
                return False
        except (OSError, ValueError):
            return False
    return True


def _read_small(path: Path, limit: int) -> Optional[bytes]:
    """`read_small`, or None where it fails."""
    try:
        return read_small(path, limit)
    except (OSError, ValueError):
        return None


def read_json(path: Path, limit: int) -> Any:
    """The JSON value of a regular file of at most `limit` bytes, else None (unreadable, too large, malformed)."""
    data = _read_small(path, limit)
    try:
        return None if data is None else json.loads(data)
    except (ValueError, RecursionError):
        return None


def _read_meta(folder: Path) -> Optional[Dict]:
    meta = read_json(folder / "meta.json", MAX_META_BYTES)
    return meta if isinstance(meta, dict) and meta.get("version") == INDEX_VERSION else None


def _current(key: Path) -> Optional[Tuple[Path, Dict]]:
    """The build `key/current` points at and its meta, or None (no index yet, or unreadable: then rebuilt)."""
    data = _read_small(key / "current", 200)
    build = data.decode("ascii", "replace").strip() if data is not None else ""
    if not build or "/" in build or build.startswith(".") or "\ufffd" in build:
        return None
    meta = _read_meta(key / build)
    return None if meta is None or meta.get("build") != build else (key / build, meta)


def _root_folder(root: str | os.PathLike) -> Path:
    root = Path(root).resolve()
    if not root.is_dir():
        raise folder_not_found(root)
    return root


def folder_index(
    root: str | os.PathLike, cache: Optional[str | os.PathLike] = None, reindex: bool = False, fresh: bool = True
) -> FileIndex:
    """The index of the image tree `root` (`FileIndex`): the cached build when every folder it walked is unchanged
    (`fresh`; without it, whatever build is current: what `setup` opens after `prepare_data` built it), else walked
    and written. Raises `DataFolderError` for a missing folder or one without images."""
    root = _root_folder(root)
    key = Path(cache or default_cache()) / _key(root)
    current = None if reindex else _current(key)
    if current is not None and current[1].get("root") == str(root) and current[1].get("source") == "walk":
        if not fresh or _folders_unchanged(root, current[0], current[1]):
            return FileIndex(current[0])
    walked_at = time.time_ns()
    files, folders, passed_over = walk(root)
    for message in passed_over:  # an index that passed something over is not reused: the next start looks again
        warnings.warn(message, stacklevel=2)
    if not files:
        raise no_images(root)
    classes = sorted(name for name, _ in folders if name and "/" not in name)
    meta = {"root": str(root), "source": "walk", "walked_at": walked_at, "complete": not passed_over}
    extra = {"folders.json": {"folders": [n for n, _ in folders], "folder_times": [t for _, t in folders]}}
    return _write(key, files, _labels(files, classes), classes, meta, extra)


def open_index(
    root: str | os.PathLike,
    list_file: Optional[str | os.PathLike] = None,
    cache: Optional[str | os.PathLike] = None,
    reindex: bool = False,
    fresh: bool = True,
) -> FileIndex:
    """The index the data modules read: of the file list `list_file` (`--data.index`, `index_from_list`) when
    given, else of the tree `root` (`folder_index`)."""
    if list_file is not None:
        return index_from_list(root, list_file, cache, reindex)
    return folder_index(root, cache, reindex, fresh=fresh)


def _list_entries(path: Path) -> Iterator[Tuple[int, str, Optional[str]]]:
    """(line number, path, class name or None) of each line of a file list: `path` or `path<TAB>class`."""
    with open(path, "rb") as f:
        number = 0
        while True:
            raw = f.readline(MAX_PATH_BYTES + 2)  # bounded: a line without end is not read whole
            if not raw:
                return
            number += 1
            line = raw.rstrip(b"\r\n")
            if len(line) > MAX_PATH_BYTES:
                raise DataFolderError(f"--data.index {path}, line {number}: longer than {MAX_PATH_BYTES} bytes")
            if not line.strip():
                continue
            fields = line.decode("utf-8", "surrogateescape").split("\t")
            if len(fields) > 2:
                raise DataFolderError(
                    f"--data.index {path}, line {number}: {len(fields)} tab-separated fields; a line is a path, or a "
                    "path, a tab and a class name"
                )
            if len(fields) == 2 and not fields[1].strip():
                raise DataFolderError(f"--data.index {path}, line {number}: a tab with no class after it")
            yield number, fields[0], fields[1] if len(fields) == 2 else None


def index_from_list(
    root: str | os.PathLike, list_file: str | os.PathLike, cache: Optional[str | os.PathLike] = None,
    reindex: bool = False,
) -> FileIndex:  # fmt: skip
    """The index of the files `list_file` names (one per line, relative to `root`; `path<TAB>class` labels it),
    without walking the tree: rebuilt when the list's content (its SHA-256) changes. A path that is absolute
    or leaves `root` (`..`) is refused with its line number; whether the files exist is found as they are read."""
    root, list_file = _root_folder(root), Path(list_file).resolve()
    if not list_file.is_file():
        raise DataFolderError(f"--data.index {list_file}: file list not found")
    key = Path(cache or default_cache()) / _key(Path(f"{root}\0{list_file}"))
    current = None if reindex else _current(key)
    signature = [str(list_file), _file_digest(list_file)]
    if current is not None and current[1].get("root") == str(root) and current[1].get("list") == signature:
        return FileIndex(current[0])
    files, names = [], []
    for number, rel, label in _list_entries(list_file):
        rel = rel.replace(os.sep, "/")
        if not _inside(rel):
            raise DataFolderError(
                f"--data.index {list_file}, line {number}: {rel!r} is absolute or leaves --data.root: give paths "
                "relative to --data.root, inside it"
            )
        files.append(rel)
        names.append(label)
    if not files:
        raise DataFolderError(f"--data.index {list_file}: no paths in the list")
    labelled = [n for n in names if n is not None]
    if labelled and len(labelled) != len(names):
        raise DataFolderError(f"--data.index {list_file}: some lines have a class and some do not; give all or none")
    classes = sorted(set(labelled))
    ids = {c: i for i, c in enumerate(classes)}
    labels = np.array([ids[n] for n in names], dtype=np.int32) if labelled else np.full(len(files), -1, np.int32)
    return _write(key, files, labels, classes, {"root": str(root), "source": "list", "list": signature})


def _file_digest(path: Path) -> str:
    """The SHA-256 of a file's content (a list is recognised by what it says, not by its time)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _chunks(array: np.ndarray) -> Iterator[np.ndarray]:
    """`array` a bounded piece at a time, contiguous (every check and digest of an index reads it this way, so a
    process opening a large index makes no array-sized temporary)."""
    for start in range(0, len(array), CHECK_CHUNK):
        yield np.ascontiguousarray(array[start : start + CHECK_CHUNK])


def _array_digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        for chunk in _chunks(array):
            digest.update(chunk.tobytes())
    return digest.hexdigest()[:24]


def _inside(rel: str) -> bool:
    return bool(rel) and not rel.startswith("/") and ".." not in rel.split("/") and "\0" not in rel


class FileIndex(Sequence[str]):
    """A read-only, memory-mapped view of one build of an index: `index[i]` is the i-th file's path (a `str`),
    `index.label(i)` its class (-1 for none), `index.classes` the class names. `subset(positions)` is a view of some
    of its files (a split), its positions kept in a file of the build too. Pickled (to data-loader workers started
    by forkserver or spawn) as the build's folder, root, count and subset: each process maps the same files and
    checks that they are still what the pickling process read."""

    def __init__(self, folder: str | os.PathLike, subset: Optional[str] = None) -> None:
        self.folder, self.subset_name = Path(folder), subset
        self._open()

    def _fail(self, what: str) -> DataFolderError:
        return DataFolderError(f"file index {self.folder}: {what} (delete the folder to rebuild the index)")

    def _open(self) -> None:
        meta = _read_meta(self.folder)
        if meta is None:
            raise self._fail("not a readable index of this version")
        count, root, classes, build = meta.get("count"), meta.get("root"), meta.get("classes"), meta.get("build")
        if not (type(count) is int and 0 < count < MAX_FILES and isinstance(root, str) and isinstance(build, str)):
            raise self._fail("malformed meta.json")
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise self._fail("malformed classes in meta.json")
        self.root, self.classes, self.count, self.build = root, classes, count, build
        try:
            size = (self.folder / "names.bin").stat().st_size
            self.names = (
                np.memmap(self.folder / "names.bin", dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
            )
            self.offsets = np.load(self.folder / "offsets.npy", mmap_mode="r", allow_pickle=False)
            self.labels = np.load(self.folder / "labels.npy", mmap_mode="r", allow_pickle=False)
            positions = None
            if self.subset_name is not None:
                path = self.folder / f"subset-{self.subset_name}.npy"
                positions = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise self._fail(f"unreadable ({type(e).__name__}: {str(e)[:120]})") from None
        if not all(isinstance(a, np.ndarray) for a in (self.offsets, self.labels, positions) if a is not None):
            raise self._fail("unreadable (an array file that is not one array)")
        shapes = (
            self.offsets.dtype == np.int64 and self.offsets.shape == (count + 1,) and self.labels.dtype == np.int32
            and self.labels.shape == (count,) and self.offsets[0] == 0 and self.offsets[-1] == size
        )  # fmt: skip
        if not shapes or not self._entries_agree(len(classes)):
            raise self._fail("its arrays do not agree")
        self.positions = None
        if positions is not None:
            if positions.dtype != np.int64 or positions.ndim != 1 or not self._positions_agree(positions):
                raise self._fail(f"subset {self.subset_name} is malformed or not what its name says")
            self.positions = positions

    def _entries_agree(self, num_classes: int) -> bool:
        """Offsets rising, labels within the classes: checked a chunk at a time (bounded temporaries)."""
        for start in range(0, self.count, CHECK_CHUNK):
            offsets = np.asarray(self.offsets[start : start + CHECK_CHUNK + 1])
            labels = np.asarray(self.labels[start : start + CHECK_CHUNK])
            if not (np.all(offsets[1:] > offsets[:-1]) and np.all((labels >= -1) & (labels < num_classes))):
                return False
        return True

    def _positions_agree(self, positions: np.ndarray) -> bool:
        """Within the index, and the content its name (a digest) says."""
        if any(len(chunk) and (chunk.min() < 0 or chunk.max() >= self.count) for chunk in _chunks(positions)):
            return False
        return _array_digest(positions) == self.subset_name

    def fingerprint(self) -> Tuple[int, int, str]:
        """(count, names' size, a digest of the offsets, labels and names): equal for two builds of the same files.
        Worked out once per object (a pass over the whole index)."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = self.count, int(self.offsets[-1]), _array_digest(self.offsets, self.labels, self.names)
        return self._fingerprint

    def __getstate__(self) -> Dict:
        return {"folder": str(self.folder), "subset": self.subset_name, "root": self.root, "count": self.count,
                "build": self.build}  # fmt: skip

    def __setstate__(self, state: Dict) -> None:
        self.folder, self.subset_name = Path(state["folder"]), state["subset"]
        self._open()
        if (self.root, self.count, self.build) != (state["root"], state["count"], state["build"]):
            raise self._fail("it is not the index the run opened")

    def __len__(self) -> int:
        return self.count if self.positions is None else len(self.positions)

    def position(self, i: int) -> int:
        """The i-th file's position in the whole index."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"file {i} of an index of {len(self)}")
        i = i % len(self)
        return i if self.positions is None else int(self.positions[i])

    def relative(self, i: int) -> str:
        j = self.position(i)
        rel = bytes(self.names[self.offsets[j] : self.offsets[j + 1]]).decode("utf-8", "surrogateescape")
        if not _inside(rel):
            raise DataFolderError(f"{self.folder}: entry {j} ({rel[:80]!r}) leaves the tree (delete the folder)")
        return rel

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return os.path.join(self.root, self.relative(int(i)))

    def label(self, i: int) -> int:
        return int(self.labels[self.position(i)])

    def label_array(self) -> np.ndarray:
        """The classes of this view's files, in order, as one array (a temporary: 4 bytes a file)."""
        return np.asarray(self.labels if self.positions is None else self.labels[np.asarray(self.positions)])

    def subset(self, positions: np.ndarray) -> FileIndex:
        """A view of the files at `positions` (of this view), kept in the index folder as `subset-<digest>.npy`,
        named by its content: every rank and run that asks for the same subset shares one file."""
        whole = np.ascontiguousarray(positions, dtype=np.int64)
        if self.positions is not None:
            whole = np.ascontiguousarray(np.asarray(self.positions)[whole])
        name = _array_digest(whole)
        path = self.folder / f"subset-{name}.npy"
        if not path.is_file():
            tmp = path.with_name(f"{path.stem}.{_unique()}.tmp.npy")
            try:
                np.save(tmp, whole)
                os.replace(tmp, path)  # the same content from every rank: whichever lands last
            except OSError as e:
                raise self._fail(f"cannot write a split: {e.strerror or e}") from None
        return FileIndex(self.folder, name)


class Labels(Sequence[int]):
    """The classes of a set's files, in its order, through its `label(i)`: a `FileIndex` view's from the mapped
    labels (nothing per file in Python, and nothing a forked worker copies), a shard set's from its samples (read
    with the image, once). What a labelled dataset indexes beside its files."""

    def __init__(self, files: Any) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.files.label(int(i))


def agreed_index(trainer: Any, open_index: Callable[[], FileIndex], root: Any) -> FileIndex:
    """`open_index()` on every rank of `trainer` (duck-typed: `world_size`, `global_rank`, `strategy`), which must
    find the same files: every node's rank 0 built its own index in `prepare_data`, so a tree that changed while the
    nodes walked it, or nodes that see different trees, would otherwise train on different files. Ranks that
    disagree, or one that cannot open its index, stop every rank together with the reason."""
    if trainer is None or trainer.world_size == 1:
        return open_index()
    files, problem = None, None
    try:
        files = open_index()
    except DataFolderError as e:
        problem = e
    mine = files.fingerprint() if files is not None else None
    theirs = trainer.strategy.broadcast(mine, src=0)  # every rank takes part, whatever it found
    same = problem is None and theirs == mine
    if not trainer.strategy.reduce_boolean_decision(same, all=True):
        raise problem or DataFolderError(
            f"the ranks indexed different files under {root} (rank {trainer.global_rank} or another could not open "
            "its index, or found other files): the folder changed while the nodes listed it, or they see different "
            "folders; start again once it is complete, or give every node the same --data.index list"
        )
    assert files is not None
    return files
