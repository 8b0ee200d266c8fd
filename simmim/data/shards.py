"""Sharded image sets: the images of a folder tree packed by `python -m simmim.shard` into litdata's chunk format
(`chunk-*.bin` files and litdata's `index.json`) plus our record (`shards.json`: the format, the sample count, the
class names, the images left out), in a local folder, in object storage (`s3://`, `gs://`, `azure://`, `r2://`) or
on any filesystem fsspec reads (`https://`, `sftp://`, ...: `simmim.data.stores`).

A sample is `{"key": its path in the source tree, "label": its class (-1: none), "image": the file's bytes}`: the
encoded file as it was (no re-encoding), decoded in the data-loader workers as a folder's files are.

A `ShardSet` reads samples by their position, through litdata's random access (a byte-range read of the sample from
its chunk, local or remote), so the training order, its seeds and its exact resume are the folder path's
(`simmim.seeding.ShardSampler`): nothing about the order comes from litdata.

Everything read back is untrusted: `shards.json` and `index.json` are read with a size bound and checked field by
field before litdata sees them (litdata's formats include a pickle serializer, which would run code; chunk names
could point outside the folder). litdata is handed a remote set's checked index instead of fetching it, and reads a
local set's own, which every process checks again as litdata loaded it, before any sample is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from simmim.checkpointing.untrusted import read_small
from simmim.data import stores
from simmim.data.index import write_json
from simmim.errors import DataFolderError

SHARDS_FILE = "shards.json"  # our record, beside litdata's index
INDEX_FILE = "index.json"  # litdata's index of the chunks
FORMAT, VERSION = "simmim-shards", 1
FIELDS = ("key", "label", "image")  # a sample's fields, in the order litdata records them
DATA_FORMAT = ["str", "int", "bytes"]  # litdata's serializers for them: no pickle
ITEM_LOADER = "PyTreeLoader"
CHUNK_NAME = re.compile(r"chunk-\d{1,9}-\d{1,9}\.bin")
CHUNK_FIELDS = {"chunk_bytes", "chunk_size", "dim", "filename"}
# The config fields litdata's writer records for the converter's samples, besides their format and tree spec.
CONFIG = {
    "chunk_size": None,
    "compression": None,
    "compression_batch_size": None,
    "compression_level": None,
    "encryption": None,
    "ipc_compression": None,
    "item_loader": ITEM_LOADER,
    "types": {"image": "bytes", "key": "str", "label": "int"},
}
MAX_INDEX_BYTES = 64 << 20  # index.json: about 100 bytes per chunk
MAX_SHARDS_BYTES = 256 << 20  # shards.json: class names and the images left out
MAX_CHUNK_SAMPLES = 1 << 24
MAX_KEY_CHARS = 4096
MAX_SAMPLE_BYTES = 1 << 30  # one encoded image file
MAX_CLASSES = 1 << 20


def data_spec() -> str:
    """The litdata tree spec of a sample (a dict of `FIELDS`), as litdata writes it into `index.json`."""
    from litdata.utilities._pytree import tree_flatten, treespec_dumps

    return treespec_dumps(tree_flatten({"key": "", "label": 0, "image": b""})[1])


def is_shard_root(root: Optional[str | os.PathLike]) -> bool:
    """Whether `--data.root` names shards: a URL (`s3://...`), a folder holding `shards.json` (a set) or
    `train/shards.json` (the two sets the converter writes for a tree with train/ and val/), or a Hugging Face
    dataset on disk (`simmim.data.tables`, read as shards)."""
    if root is None:
        return False
    from simmim.data.tables import is_table_root

    root = os.fspath(root)
    return (
        stores.scheme(root) is not None
        or any(os.path.lexists(os.path.join(root, *parts, SHARDS_FILE)) for parts in ((), ("train",)))
        or is_table_root(root)
    )


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if stores.scheme(root) else os.path.join(root, name)


def _fail(root: str, what: str) -> DataFolderError:
    return DataFolderError(
        f"--data.root {root}: {what}. A shard set is a folder written by `python -m simmim.shard SRC OUT` "
        "(or a copy of one in object storage)"
    )


def _read_record(root: str, name: str, limit: int, storage_options: Optional[Dict]) -> Any:
    """The JSON file `name` of a shard set, at most `limit` bytes, read without following a link."""
    try:
        if stores.scheme(root) is None:
            data = read_small(os.path.join(root, name), limit, follow_links=False)
        else:
            data = stores.read_bounded(_join(root, name), limit, storage_options)
        return json.loads(data)
    except (OSError, ValueError, RecursionError) as e:
        raise _fail(root, f"cannot read its {name} ({getattr(e, 'strerror', None) or e})") from None
    except Exception as e:  # a store's own errors (no such bucket, credentials)
        raise _fail(root, f"cannot read its {name} ({type(e).__name__}: {e})") from None


def _checked_record(root: str, record: Any) -> Tuple[int, List[str], int]:
    """(sample count, class names, samples without a class) of a `shards.json`, checked."""
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        raise _fail(root, f"its {SHARDS_FILE} is not a version-{VERSION} record of this project")
    count, classes = _count(record.get("count"), MAX_CHUNK_SAMPLES << 16), record.get("classes")
    if count is None:
        raise _fail(root, f"its {SHARDS_FILE} gives no valid sample count")
    if (
        not isinstance(classes, list)
        or len(classes) > MAX_CLASSES
        or not all(isinstance(c, str) and 0 < len(c) <= 255 for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise _fail(root, f"its {SHARDS_FILE} has a malformed class list")
    unlabelled = _count(record.get("unlabelled"), count, zero=True)
    if unlabelled is None:
        raise _fail(root, f"its {SHARDS_FILE} gives no valid count of samples without a class")
    return count, classes, unlabelled


def checked_index(root: str, config: Any, chunks: Any, spec: str) -> Tuple[List[str], np.ndarray, Dict[str, Any]]:
    """(chunk file names, samples per chunk, the index rebuilt from the checked fields alone) of litdata's index,
    refused unless it is exactly the format `python -m simmim.shard` writes: every config field known and as the
    converter writes it, every chunk a `chunk-<n>-<n>.bin` with its counts."""
    if not isinstance(config, dict):
        raise _fail(root, f"its {INDEX_FILE} has no config")
    expected = {**CONFIG, "data_format": DATA_FORMAT, "data_spec": spec}
    for field in ("data_format", "data_spec", *expected, "chunk_bytes", *config):  # all it writes, nothing else
        value = config.get(field)
        if field == "chunk_bytes" and _count(value, 1 << 40, zero=True) is None:
            raise _fail(root, f"its {INDEX_FILE} gives the chunk size {str(value)[:40]}")
        if field != "chunk_bytes" and (field not in expected or value != expected[field]):
            raise _fail(
                root, f"its {INDEX_FILE} records {str(field)[:40]} {str(value)[:80]!r}, not what the converter writes"
            )
    if not isinstance(chunks, list) or not chunks:
        raise _fail(root, f"its {INDEX_FILE} lists no chunks")
    names, sizes, clean = [], [], []
    for chunk in chunks:
        chunk = chunk if isinstance(chunk, dict) and set(chunk) <= CHUNK_FIELDS else {}
        name, size, size_bytes = chunk.get("filename"), chunk.get("chunk_size"), chunk.get("chunk_bytes")
        if not isinstance(name, str) or not CHUNK_NAME.fullmatch(name):
            raise _fail(root, f"its {INDEX_FILE} names a chunk {str(name)[:80]!r} (expected chunk-<n>-<n>.bin)")
        if _count(size, MAX_CHUNK_SAMPLES) is None or _count(size_bytes, 1 << 40) is None or chunk.get("dim"):
            raise _fail(root, f"its {INDEX_FILE} gives the chunk {name} malformed counts")
        names.append(name)
        sizes.append(size)
        clean.append({"chunk_bytes": size_bytes, "chunk_size": size, "dim": None, "filename": name})
    if len(set(names)) != len(names):
        raise _fail(root, f"its {INDEX_FILE} lists a chunk twice")
    return names, np.asarray(sizes, dtype=np.int64), {"chunks": clean, "config": dict(config)}


def _count(value: Any, limit: int, zero: bool = False) -> Optional[int]:
    """`value` if it is an int in [1, limit] ([0, limit] with `zero`), else None."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (0 if zero else 1) <= value <= limit
    return value if ok else None


class ShardSet(Sequence[str]):
    """A shard set, or a view of some of its chunks (`chunk_view`), read sample by sample.

    Pickled into data-loader workers as its root, options and a few numbers per chunk; each process opens litdata's
    reader on its first read and checks what litdata loaded before reading.

    Args:
        root: A folder written by `python -m simmim.shard`, or its URL in object storage.
        cache: Where a remote set's checked index is kept for litdata; default `$XDG_CACHE_HOME/simmim/shards`.
        storage_options: Passed to litdata's readers (for example `{"endpoint_url": ...}` for an S3-compatible
            store; `AWS_ENDPOINT_URL` and the other `AWS_*` variables work too).
    """

    def __init__(
        self, root: str | os.PathLike, cache: Optional[str] = None, storage_options: Optional[Dict] = None
    ) -> None:
        root = os.fspath(root)
        scheme = stores.scheme(root)
        if scheme is not None:
            root = scheme + root[len(scheme) :]  # litdata matches stores by lower-case prefix
            if stores.unusable(root):
                raise _fail(root, stores.unusable(root))
        if scheme is None:
            if not os.path.isdir(root):
                raise _fail(root, "not a folder")
            root = os.path.abspath(root)
        self.root, self.storage_options = root, dict(storage_options or {})
        self.cache = os.fspath(cache) if cache is not None else os.fspath(default_shard_cache())
        record = _read_record(root, SHARDS_FILE, MAX_SHARDS_BYTES, storage_options)
        count, self.classes, self.unlabelled = _checked_record(root, record)
        index = _read_record(root, INDEX_FILE, MAX_INDEX_BYTES, storage_options)
        if not isinstance(index, dict):
            raise _fail(root, f"its {INDEX_FILE} is not a JSON object")
        self.chunk_names, self.sizes, checked = checked_index(
            root, index.get("config"), index.get("chunks"), data_spec()
        )
        if int(self.sizes.sum()) != count:
            raise _fail(root, f"its {INDEX_FILE} holds {int(self.sizes.sum())} samples, its {SHARDS_FILE} {count}")
        # what identifies the set: its checked index (chunk names, sample counts, byte sizes) and its classes
        self.digest = hashlib.sha256(json.dumps([checked, self.classes], sort_keys=True).encode()).hexdigest()[:20]
        self.index_folder = None if scheme is None else _local_index(self.cache, checked)
        for name in self.chunk_names if scheme is None else ():  # a link could lead anywhere
            try:
                regular = stat.S_ISREG(os.lstat(os.path.join(root, name)).st_mode)
            except OSError as e:
                raise _fail(root, f"cannot read its chunk {name} ({e.strerror or e})") from None
            if not regular:
                raise _fail(root, f"its chunk {name} is not a regular file")
        self._set_chunks(self.chunk_names, self.sizes, [c["chunk_bytes"] for c in checked["chunks"]])

    def _set_chunks(self, names: List[str], sizes: Sequence[int], nbytes: Sequence[int]) -> None:
        """The set's chunks (names, sample counts, byte sizes), all of them in this view, and no reader open yet."""
        self.chunk_names = names
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.chunk_bytes = np.asarray(nbytes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self.chunks = np.arange(len(self.sizes))  # the chunks of this view
        self._bounds = self.starts
        self._reader, self._reader_pid = None, None
        self._last: Optional[Tuple[int, Tuple[str, int, bytes, str]]] = None

    def chunk_view(self, chunks: np.ndarray) -> ShardSet:
        """The samples of the chunks `chunks` (sorted ids), in their order."""
        view = object.__new__(type(self))  # a subclass (tables) reads its own way
        view.__dict__.update(self.__dict__)
        view.chunks = np.sort(np.asarray(chunks, dtype=np.int64))
        view._bounds = np.concatenate([[0], np.cumsum(self.sizes[view.chunks])])
        view._reader, view._reader_pid, view._last = None, None, None
        return view

    @property
    def chunk_sizes(self) -> np.ndarray:
        """Samples per chunk of this view, in order: what `simmim.seeding.ShardSampler` shuffles by."""
        return self.sizes[self.chunks]

    def __getstate__(self) -> Dict:
        return {**self.__dict__, "_reader": None, "_last": None}

    def __len__(self) -> int:
        return int(self._bounds[-1])

    def _locate(self, i: int) -> Tuple[int, int]:
        """(chunk id, position in the whole set) of this view's sample `i`."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        c = int(np.searchsorted(self._bounds, i, side="right")) - 1
        chunk = int(self.chunks[c])
        return chunk, int(self.starts[chunk]) + i - int(self._bounds[c])

    def _open(self):
        """litdata's reader of this process (a reader a forked worker inherited is not shared: it opens its own)."""
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader, self._reader_pid, self._last = _open_reader(self), os.getpid(), None
        return self._reader

    def read(self, i: int) -> Tuple[str, int, bytes, str]:
        """(key, label, encoded image, chunk file) of sample `i`. The last sample read is kept, so that its image and
        its label are read once."""
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        chunk, whole = self._locate(int(i))
        sample = self._open()[whole]
        if not isinstance(sample, dict) or set(sample) != set(FIELDS):
            raise _fail(self.root, f"the sample {whole} in {self.chunk_names[chunk]} is malformed")
        key, label, image = sample["key"], sample["label"], sample["image"]
        if not isinstance(key, str) or len(key) > MAX_KEY_CHARS or not isinstance(image, (bytes, memoryview)):
            raise _fail(self.root, f"the sample {whole} in {self.chunk_names[chunk]} is malformed")
        if not isinstance(label, int) or not -1 <= label < len(self.classes):
            raise _fail(self.root, f"the sample {key!r} in {self.chunk_names[chunk]} has the class {label}")
        self._last = (i, (key, label, bytes(image), self.chunk_names[chunk]))
        return self._last[1]

    def name(self, key: str, chunk: str) -> str:
        return f"{self.root} key {key!r} (in {chunk})"

    def decode(self, i: int, fmt=None) -> np.ndarray:
        """Sample `i` decoded as uint8 (H, W, 3) RGB, or as the pixels of a `PixelFormat` `fmt`
        (`simmim.data.images.decode_bytes`); `UnreadableImageError` names its set, key and chunk."""
        from simmim.data.images import decode_bytes

        key, _, image, chunk = self.read(i)
        return decode_bytes(np.frombuffer(image, dtype=np.uint8), self.name(key, chunk), fmt)

    def __getitem__(self, i):  # type: ignore[override]
        """Sample `i` as a `ShardItem`: a name that decodes itself, without reading it."""
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        return ShardItem(self, i % len(self))

    def label(self, i: int) -> int:
        return self.read(i)[1]

    def fingerprint(self) -> Tuple[int, int, str]:
        """(samples and chunks of this view, the whole set's `digest`): equal on ranks that opened the same set."""
        return len(self), len(self.chunks), self.digest

    def pick_chunks(self, fraction: float, seed: int, at_least_one: bool = False) -> Tuple[ShardSet, ShardSet]:
        """(picked, rest) views: `round(fraction * chunks)` whole chunks drawn with `seed` (a fixed draw), and the
        others. The converter wrote the files in a random order, so any chunk is a sample of the whole set."""
        order = np.random.default_rng(seed).permutation(len(self.chunks))
        n = int(round(len(order) * fraction))
        n = max(1, n) if at_least_one else n
        return self.chunk_view(self.chunks[order[:n]]), self.chunk_view(self.chunks[order[n:]])

    def val_split(self, fraction: float) -> Tuple[ShardSet, ShardSet]:
        """(train, val) views: `fraction` of the chunks (`pick_chunks`, seed 0) for validation, the rest for
        training."""
        val, train = self.pick_chunks(fraction, seed=0)
        return train, val


class ShardItem(str):
    """Sample `i` of a shard set (or view), as a name (`<root>#<position in the whole set>`) that decodes itself
    (`decode()`): what a list of files holds where a shard set stands in for a folder (the evaluation tools' lists)."""

    def __new__(cls, shards: ShardSet, i: int) -> ShardItem:
        item = super().__new__(cls, f"{shards.root}#{shards._locate(i)[1]}")
        item.shards, item.i = shards, i
        return item

    def __reduce__(self):
        return ShardItem, (self.shards, self.i)

    def decode(self, fmt=None) -> np.ndarray:
        return self.shards.decode(self.i, fmt)


class ShardSplit(NamedTuple):
    """The shards under a root: one set (`val` None), or the two sets `root/train` and `root/val`."""

    train: ShardSet
    val: Optional[ShardSet]

    def fingerprint(self) -> Tuple:
        return self.train.fingerprint(), None if self.val is None else self.val.fingerprint()


def open_shard_split(
    root: str | os.PathLike, cache: Optional[str] = None, storage_options: Optional[Dict] = None
) -> ShardSplit:
    """The shard set at `root`, or the sets `root/train` and `root/val` when `root` holds those; a Hugging Face
    dataset on disk as `simmim.data.tables.open_table_split` reads it."""
    from simmim.data.tables import is_table_root, open_table_split

    root = os.fspath(root)
    if is_table_root(root):
        return open_table_split(root)
    try:
        return ShardSplit(ShardSet(root, cache, storage_options), None)
    except DataFolderError as first:
        try:
            train = ShardSet(_join(root, "train"), cache, storage_options)
            return ShardSplit(train, ShardSet(_join(root, "val"), cache, storage_options))
        except DataFolderError:
            raise first from None


def labelled_shards(
    root: str,
    val_fraction: float,
    label_fraction: float = 1.0,
    option: str = "--data.root",
    shards_of: Optional[Callable[[str], ShardSplit]] = None,
) -> Tuple[ShardSet, ShardSet, List[str]]:
    """(train, val, classes) of labelled shards, as `simmim.data.folders.labelled_split` gives them for a folder:
    `root/train` and `root/val`, or one set split by `val_fraction` in whole chunks (`ShardSet.val_split`);
    `label_fraction` < 1 keeps that fraction of the training chunks. Every sample needs a class. The sets are
    opened by `shards_of(root)` (default: `open_shard_split`)."""
    train, val = (shards_of or open_shard_split)(root)
    for shards in (train, val):
        if shards is not None and not shards.classes:
            raise DataFolderError(
                f"{option} {shards.root}: these shards hold no classes (converted from a folder without class "
                "folders): a labelled stage needs <source>/<class>/<images>"
            )
        if shards is not None and shards.unlabelled:
            raise DataFolderError(
                f"{option} {shards.root}: {shards.unlabelled} of its images have no class (they were directly in "
                "the converted folder): convert a folder whose images are all in class folders"
            )
    if val is None:
        train, val = train.val_split(val_fraction)
    elif train.classes != val.classes:
        raise DataFolderError(f"{option} {root}: the classes of its train/ and val/ shards differ")
    if label_fraction < 1.0:
        train = train.pick_chunks(label_fraction, seed=1, at_least_one=True)[0]
    return train, val, train.classes


def open_images(root: str | os.PathLike) -> Sequence:
    """The images under `root` for the evaluation tools: a shard set (`ShardSet`, whose items decode themselves)
    or a folder's file index (`simmim.data.index.folder_index`, of paths)."""
    from simmim.data.index import folder_index

    return open_shard_split(root).train if is_shard_root(root) else folder_index(root)


def _local_index(cache: str, index: Dict[str, Any]) -> str:
    """The checked index of a remote set, written as `index.json` into a folder of `cache` named after its content,
    where litdata reads it instead of fetching the remote one (which it would trust: its `updated_at` becomes a
    folder name, and it is parsed whatever its size). Returns the folder."""
    body = json.dumps(index, sort_keys=True)
    digest = hashlib.sha256(body.encode()).hexdigest()[:20]
    folder = Path(cache) / "checked" / digest
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / INDEX_FILE, {**index, "updated_at": digest})  # written anew: nothing in the cache is trusted
    return os.fspath(folder)


def default_shard_cache() -> Path:
    """Where the checked indexes of remote shard sets are kept unless told: `$XDG_CACHE_HOME/simmim/shards`."""
    from simmim.data.index import default_cache

    return default_cache().parent / "shards"


def _open_reader(shards: ShardSet):
    """litdata's dataset over `shards.root` for random access, checked against the index this set was opened with
    before any sample is read."""
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # never ask PyPI for a newer version
    from litdata import StreamingDataset

    class CheckedDataset(StreamingDataset):
        def _create_cache(self, worker_env):
            cache = super()._create_cache(worker_env)
            config = cache._reader.config
            spec = config.config.get("data_spec")
            from litdata.utilities._pytree import treespec_dumps

            loaded = dict(config.config, data_spec=treespec_dumps(spec) if spec is not None else None)
            names, sizes, _ = checked_index(shards.root, loaded, config._chunks, data_spec())
            if names != shards.chunk_names or not np.array_equal(sizes, shards.sizes):
                raise _fail(shards.root, f"its {INDEX_FILE} changed while the run read it")
            read_range = config.download_chunk_bytes_from_index  # a remote read of part of a chunk

            def bounded(chunk: int, offset: int, length: int) -> bytes:
                """A range within the chunk, and at most one image file's bound: the offsets come from the chunk."""
                if not (
                    0 <= offset and 0 <= length <= MAX_SAMPLE_BYTES and offset + length <= shards.chunk_bytes[chunk]
                ):
                    raise _fail(
                        shards.root,
                        f"its chunk {shards.chunk_names[chunk]} gives a sample {length} bytes at {offset}, outside its "
                        f"{shards.chunk_bytes[chunk]} bytes or over {MAX_SAMPLE_BYTES} (a damaged or crafted chunk)",
                    )
                return read_range(chunk, offset, length)

            config.download_chunk_bytes_from_index = bounded
            return cache

    from litdata.streaming.resolver import Dir

    if shards.index_folder is not None:
        stores.use_store(stores.scheme(shards.root))  # in this process: litdata's registry is per process
    # A remote set: litdata's local folder is the one holding the checked index, so it never fetches the remote
    # index (it reads the samples from the URL).
    source = shards.root if shards.index_folder is None else Dir(path=shards.index_folder, url=shards.root)
    dataset = CheckedDataset(
        source,
        storage_options=shards.storage_options,
        batch_decode=0,  # one item per read: its batched decoding reads a window of items per random access
    )
    return dataset  # its reader opens, and is checked, at the first read
