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
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from simmim.data.images import IMAGE_EXTENSIONS
from simmim.errors import DataFolderError

INDEX_VERSION = 1
MAX_FILES = 1 << 33  # 8.6e9 files: the bound on a count read back from a cache
MAX_PATH_BYTES = 4096  # one path in a list file
WALK_THREADS = 16  # folders listed side by side (a shared filesystem answers many requests at once)


def default_cache() -> Path:
    """Where indexes are kept unless told: `$XDG_CACHE_HOME/simmim/index` (`~/.cache/simmim/index`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "simmim" / "index"


def _key(source: Path) -> str:
    return hashlib.sha256(os.fsencode(source)).hexdigest()[:20]


def _sort_key(rel: str) -> Tuple[str, ...]:
    return tuple(rel.split("/"))  # the order of `sorted(Path...)`: part by part


def _scan(folder: Path, rel: str) -> Tuple[List[str], List[Tuple[str, int]], List[str]]:
    """One folder: (image files, (subfolder, its modification time) pairs, broken links), relative to the root."""
    files, subfolders, broken = [], [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir(follow_symlinks=False):  # a linked folder is not followed: it could lead anywhere
                subfolders.append((name, entry.stat(follow_symlinks=False).st_mtime_ns))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                if entry.is_file():
                    files.append(name)
                elif entry.is_symlink():
                    broken.append(name)
    return files, subfolders, broken


def walk(root: Path, threads: int = WALK_THREADS) -> Tuple[List[str], List[Tuple[str, int]]]:
    """Every image file below `root` (relative, `/`-separated, in `sorted(Path)` order) and every folder walked with
    its modification time (the root as ""). Folders are listed side by side, level by level."""
    files: List[str] = []
    folders: List[Tuple[str, int]] = [("", os.stat(root).st_mtime_ns)]
    level = [""]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        while level:
            found = list(pool.map(lambda rel: _scan(root / rel, rel), level))
            level = []
            for level_files, subfolders, broken in found:
                files += level_files
                folders += subfolders
                level += [name for name, _ in subfolders]
                for link in broken:
                    warnings.warn(
                        f"skipping {root / link}: a symbolic link whose target is missing or loops back", stacklevel=3
                    )
    files.sort(key=_sort_key)
    return files, folders


def _pack(strings: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Strings as one UTF-8 byte buffer and N+1 int64 offsets."""
    encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _write(folder: Path, files: Sequence[str], labels: np.ndarray, classes: List[str], meta: Dict) -> None:
    """The index's files in a fresh folder next to `folder`, then moved into place (a reader never sees half)."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names, offsets = _pack(files)
    names.tofile(tmp / "names.bin")
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "labels.npy", labels.astype(np.int32))
    (tmp / "meta.json").write_text(json.dumps({**meta, "version": INDEX_VERSION, "count": len(files),
                                               "classes": classes}))  # fmt: skip
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    try:
        tmp.rename(folder)
    except OSError:  # another process moved its own (identical) index in first
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _labels(files: Sequence[str], classes: List[str]) -> np.ndarray:
    """The class of each file: the position of its top-level folder among `classes`; -1 for a file in the root."""
    ids = {c: i for i, c in enumerate(classes)}
    return np.array([ids.get(f.split("/", 1)[0], -1) if "/" in f else -1 for f in files], dtype=np.int32)


def _folders_unchanged(root: Path, meta: Dict) -> bool:
    """Whether every folder the index walked still has the modification time it had."""
    names, times = meta.get("folders"), meta.get("folder_times")
    if not isinstance(names, list) or not isinstance(times, list) or len(names) != len(times):
        return False
    for rel, mtime in zip(names, times):
        try:
            if not isinstance(rel, str) or os.stat(root / rel, follow_symlinks=False).st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    return True


def _read_meta(folder: Path) -> Optional[Dict]:
    try:
        if (folder / "meta.json").stat().st_size > 1 << 30:
            return None
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("version") == INDEX_VERSION else None


def folder_index(
    root: str | os.PathLike, cache: Optional[str | os.PathLike] = None, reindex: bool = False
) -> FileIndex:
    """The index of the image tree `root` (`FileIndex`), from the cache when every folder it walked is unchanged,
    else walked and written. Raises `DataFolderError` for a missing folder or one without images."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataFolderError(f"--data.root {root}: image folder not found (set it to a folder of images)")
    folder = Path(cache or default_cache()) / _key(root)
    meta = None if reindex else _read_meta(folder)
    if meta is not None and meta.get("root") == str(root) and meta.get("source") == "walk":
        if _folders_unchanged(root, meta):
            return FileIndex(folder)
    files, folders = walk(root)
    if not files:
        raise DataFolderError(f"--data.root: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    classes = sorted(name for name, _ in folders if name and "/" not in name)
    meta = {"root": str(root), "source": "walk", "folders": [n for n, _ in folders],
            "folder_times": [t for _, t in folders]}  # fmt: skip
    _write(folder, files, _labels(files, classes), classes, meta)
    return FileIndex(folder)


def _list_entries(path: Path) -> Iterator[Tuple[int, str, Optional[str]]]:
    """(line number, path, class name or None) of each line of a file list: `path` or `path<TAB>class`."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            if len(line) > MAX_PATH_BYTES:
                raise DataFolderError(f"--data.index {path}, line {number}: longer than {MAX_PATH_BYTES} bytes")
            fields = line.decode("utf-8", "surrogateescape").split("\t")
            if len(fields) > 2:
                raise DataFolderError(
                    f"--data.index {path}, line {number}: {len(fields)} tab-separated fields; a line is a path, or a "
                    "path, a tab and a class name"
                )
            yield number, fields[0], fields[1] if len(fields) == 2 else None


def index_from_list(
    root: str | os.PathLike, list_file: str | os.PathLike, cache: Optional[str | os.PathLike] = None,
    reindex: bool = False,
) -> FileIndex:  # fmt: skip
    """The index of the files `list_file` names (one per line, relative to `root`; `path<TAB>class` labels it),
    without walking the tree: rebuilt when the list's size or modification time changes. A path that is absolute
    or leaves `root` (`..`) is refused with its line number; whether the files exist is found as they are read."""
    root, list_file = Path(root).resolve(), Path(list_file).resolve()
    if not list_file.is_file():
        raise DataFolderError(f"--data.index {list_file}: file list not found")
    stat = list_file.stat()
    folder = Path(cache or default_cache()) / _key(Path(f"{root}\0{list_file}"))
    meta = None if reindex else _read_meta(folder)
    signature = [str(list_file), stat.st_size, stat.st_mtime_ns]
    if meta is not None and meta.get("root") == str(root) and meta.get("list") == signature:
        return FileIndex(folder)
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
    _write(folder, files, labels, classes, {"root": str(root), "source": "list", "list": signature})
    return FileIndex(folder)


def _inside(rel: str) -> bool:
    return bool(rel) and not rel.startswith("/") and ".." not in rel.split("/") and "\0" not in rel


class FileIndex(Sequence[str]):
    """A read-only, memory-mapped view of an index: `index[i]` is the i-th file's path (a `str`), `index.label(i)` its
    class (-1 for none), `index.classes` the class names. `subset(name, positions)` is a view of some of its files
    (a split), its positions kept in a file of the index too. Pickled (to data-loader workers started by
    forkserver or spawn) as its folder and the subset's name: each process maps the same files."""

    def __init__(self, folder: str | os.PathLike, subset: Optional[str] = None) -> None:
        self.folder, self.subset_name = Path(folder), subset
        self._open()

    def _open(self) -> None:
        meta = _read_meta(self.folder)
        if meta is None:
            raise DataFolderError(f"{self.folder}: not a file index of this version (delete it to rebuild it)")
        count, root, classes = meta.get("count"), meta.get("root"), meta.get("classes")
        if not (isinstance(count, int) and 0 < count < MAX_FILES and isinstance(root, str)):
            raise DataFolderError(f"{self.folder}/meta.json: malformed (delete the folder to rebuild the index)")
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise DataFolderError(f"{self.folder}/meta.json: malformed classes (delete the folder to rebuild it)")
        self.root, self.classes, self.count = root, classes, count
        size = (self.folder / "names.bin").stat().st_size
        self.names = np.memmap(self.folder / "names.bin", dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self.offsets = np.load(self.folder / "offsets.npy", mmap_mode="r", allow_pickle=False)
        self.labels = np.load(self.folder / "labels.npy", mmap_mode="r", allow_pickle=False)
        ok = (
            self.offsets.dtype == np.int64 and self.offsets.shape == (count + 1,) and self.labels.shape == (count,)
            and self.labels.dtype == np.int32 and self.offsets[0] == 0 and self.offsets[-1] == size
            and bool(np.all(np.diff(self.offsets) > 0))
            and bool(np.all((self.labels >= -1) & (self.labels < max(1, len(classes)))))
        )  # fmt: skip
        if not ok:
            raise DataFolderError(f"{self.folder}: the index's arrays do not agree (delete the folder to rebuild it)")
        self.positions = None
        if self.subset_name is not None:
            positions = np.load(self.folder / f"subset-{self.subset_name}.npy", mmap_mode="r", allow_pickle=False)
            if positions.dtype != np.int64 or positions.ndim != 1 or (len(positions) and (
                    positions.min() < 0 or positions.max() >= count)):  # fmt: skip
                raise DataFolderError(f"{self.folder}: subset {self.subset_name} is malformed (delete the folder)")
            self.positions = positions

    def __getstate__(self) -> Dict:
        return {"folder": str(self.folder), "subset": self.subset_name}

    def __setstate__(self, state: Dict) -> None:
        self.folder, self.subset_name = Path(state["folder"]), state["subset"]
        self._open()

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

    def all_labels(self) -> np.ndarray:
        """The labels of this view's files, as one array."""
        return np.asarray(self.labels if self.positions is None else self.labels[self.positions])

    def subset(self, positions: np.ndarray) -> FileIndex:
        """A view of the files at `positions` (of this view), kept in the index folder as `subset-<digest>.npy`,
        named by its content: every rank and run that asks for the same subset shares one file."""
        whole = np.ascontiguousarray(positions, dtype=np.int64)
        if self.positions is not None:
            whole = np.ascontiguousarray(np.asarray(self.positions)[whole])
        name = hashlib.sha256(whole.tobytes()).hexdigest()[:24]
        path = self.folder / f"subset-{name}.npy"
        if not path.is_file():
            tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npy")
            np.save(tmp, whole)
            os.replace(tmp, path)  # the same content from every rank: whichever lands last
        return FileIndex(self.folder, name)
