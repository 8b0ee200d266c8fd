"""Hugging Face datasets on disk, read as shard sets: parquet files (as the Hub serves `imagenet-1k`) and Arrow
files (what `Dataset.save_to_disk` writes, and what `load_dataset` keeps in its cache). Both hold an `image` column
of `{bytes, path}` structs, or of bytes, and an optional integer `label` column, the class names in the files'
Hugging Face metadata.

`TableSet` is a `simmim.data.shards.ShardSet` whose chunks are the files' row groups (parquet) or record batches
(Arrow), so the training order, its seeds, its exact resume and the whole-chunk splits are the shard set's.

Where the files are (`table_files`): `*.parquet` in a folder or its `data/`, or `*.arrow` in a folder; a file's
split is its name's `train` or `validation` (`val`) part (`train-00000-of-00004.parquet`,
`imagenet-1k-validation-00000-of-00002.arrow`), or its folder's (`train/`, `validation/`, as
`DatasetDict.save_to_disk` lays them out). Every file is untrusted: its schema must be the layout above, its metadata
is bounded and checked, an image column holds bytes (and paths) only, a row group or record batch is bounded before
it is used, an Arrow batch is read only uncompressed and in the IPC version `pyarrow` writes (checked from its header
before it is decoded) and is validated in full. The
sampler (`simmim.seeding.ShardSampler`) shuffles samples within windows of 4 chunks, so each process keeps the last
`GROUPS_KEPT` chunks it read (two windows): every chunk is read about once per epoch and process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from simmim.data.shards import MAX_CHUNK_SAMPLES, MAX_CLASSES, MAX_SAMPLE_BYTES, ShardSet, ShardSplit
from simmim.errors import DataFolderError

MAX_GROUP_BYTES = 512 << 20  # a row group's or record batch's images (parquet: counted as they are decoded)
MAX_ROWS = 1 << 27  # rows of a set: its labels are held in memory, 8 bytes each
READ_BATCH = 16  # parquet rows decoded at a time while a row group is read
MAX_METADATA_BYTES = 16 << 20  # the Hugging Face metadata of a file (its class names)
GROUPS_KEPT = 8  # per process: two of the sampler's 4-chunk windows (Hugging Face writes 100 images a group)
SPLITS = {"train": ("train",), "val": ("validation", "val")}
SUFFIXES = (".parquet", ".arrow")


class Group(NamedTuple):
    """A chunk of a table file: where it is (a parquet row group's number, an Arrow message's byte offset), its
    rows and its size in bytes (as the file states it)."""

    where: int
    rows: int
    nbytes: int


def table_files(root: str | os.PathLike) -> List[Path]:
    """The table files of `root`, sorted: a `.parquet` or `.arrow` file itself, else the `*.parquet` files of
    `root` or `root/data`, else its `*.arrow` files, else those of its split folders (`train/`, `validation/`,
    `val/`); [] when it holds none."""
    root = Path(root)
    if root.is_file():
        return [root] if root.suffix in SUFFIXES else []
    folders = [root, root / "data"] + [root / name for names in SPLITS.values() for name in names]
    found: Dict[str, List[Path]] = {suffix: [] for suffix in SUFFIXES}
    for folder in folders:  # each listed once, for both suffixes (a folder of images may hold millions of files)
        if folder.is_dir():
            names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(SUFFIXES) and e.name[0] != ".")
            for path in (folder / name for name in names):
                if path.is_file():
                    found[path.suffix].append(path)
    return next((found[suffix] for suffix in SUFFIXES if found[suffix]), [])


def is_table_root(root: Optional[str | os.PathLike]) -> bool:
    """Whether `root` is a table set: its first table file has an `image` column (a stray `metadata.parquet`
    beside a folder's images leaves it a folder of images)."""
    if root is None or "://" in os.fspath(root):
        return False
    files = table_files(root)
    if not files:
        return False
    try:
        return "image" in _format_of(files[0]).schema(files[0]).names
    except Exception:  # noqa: BLE001 (not a table: `TableSet` says so when asked to read it)
        return True


def _fail(root: Any, what: str) -> DataFolderError:
    return DataFolderError(
        f"--data.root {root}: {what}. A Hugging Face dataset on disk is a folder of .parquet or .arrow files with an "
        "image column (bytes, or {bytes, path} structs) and an optional integer label column, as imagenet-1k"
    )


def _class_names(root: Any, schema: Any) -> Optional[List[str]]:
    """The label names of a file's Hugging Face metadata (`features.label.names`), checked; None without them."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    if len(raw) > MAX_METADATA_BYTES:
        raise _fail(root, f"its Hugging Face metadata is larger than {MAX_METADATA_BYTES} bytes")
    try:
        meta = json.loads(raw)
        features = meta.get("info", {}).get("features", {}) if isinstance(meta, dict) else {}
        names = features.get("label", {}).get("names") if isinstance(features, dict) else None
    except (ValueError, AttributeError, RecursionError):
        raise _fail(root, "its Hugging Face metadata is not JSON") from None
    if names is None:
        return None
    if not (isinstance(names, list) and len(names) <= MAX_CLASSES and all(isinstance(n, str) for n in names)):
        raise _fail(root, "its Hugging Face metadata has a malformed list of label names")
    return names


def _image_column(root: Any, schema: Any) -> bool:
    """Whether the `image` column holds `{bytes, path}` structs (else bytes), checked: exactly those fields (the
    path optional), bytes binary and the path a string, so that nothing else in a row is ever turned into Python
    objects (a list of a billion nulls takes a few bytes in a file)."""
    import pyarrow as pa

    if "image" not in schema.names:
        raise _fail(root, f"its files have no image column (columns: {schema.names[:8]})")
    kind = schema.field("image").type
    binary = (pa.types.is_binary, pa.types.is_large_binary)
    if any(test(kind) for test in binary):
        return False
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
        path = fields.get("path", pa.string())
        if (
            set(fields) <= {"bytes", "path"}
            and any(test(fields["bytes"]) for test in binary)
            and (pa.types.is_string(path) or pa.types.is_large_string(path))
        ):
            return True
    raise _fail(root, f"its image column is {str(kind)[:200]}, not bytes or {{bytes, path}} structs")


def _check_schema(root: Any, schema: Any, path: str) -> None:
    """A file's columns: an image column (`_image_column`) and, if any, an integer label column."""
    import pyarrow as pa

    _image_column(root, schema)
    if "label" in schema.names and not pa.types.is_integer(schema.field("label").type):
        raise _fail(root, f"the label column of {path} is {schema.field('label').type}, not integers")


def _labels_of(column: Any) -> np.ndarray:
    """A label column's values, -1 where null."""
    values = column.to_numpy(zero_copy_only=False)
    return np.where(np.asarray(column.is_null()), -1, values).astype(np.int64)


class ParquetFormat:
    """Parquet files: chunks are row groups, read through pyarrow's reader `READ_BATCH` rows at a time, the bytes
    counted as they are decoded (what a file says of its sizes is not trusted)."""

    @staticmethod
    def schema(path: str | os.PathLike) -> Any:
        import pyarrow.parquet as pq

        return pq.read_schema(path)

    @staticmethod
    def scan(root: Any, path: str) -> Tuple[Any, List[Group], Optional[np.ndarray]]:
        """(schema, row groups, labels or None) of a file, its schema checked."""
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 (pyarrow's own errors for a file that is not parquet)
            raise _fail(root, f"cannot read {path} ({type(e).__name__}: {e})") from None
        schema = meta.schema_arrow
        _check_schema(root, schema, path)
        if meta.metadata.num_rows > MAX_ROWS:
            raise _fail(root, f"it holds more than {MAX_ROWS} rows")
        groups = [Group(rg, meta.metadata.row_group(rg).num_rows, meta.metadata.row_group(rg).total_byte_size)
                  for rg in range(meta.metadata.num_row_groups)]  # fmt: skip
        labels = _labels_of(meta.read(columns=["label"]).column("label")) if "label" in schema.names else None
        return schema, groups, labels

    @staticmethod
    def read(root: Any, path: str, group: Group, name: str, handles: Dict) -> list:
        """The image column of a row group, as a list."""
        import pyarrow.parquet as pq

        values, size = [], 0
        reader = pq.ParquetFile(path)
        for batch in reader.iter_batches(batch_size=READ_BATCH, row_groups=[group.where], columns=["image"]):
            size += batch.nbytes
            if size > MAX_GROUP_BYTES:
                raise _fail(root, f"the row group {name} decodes to more than {MAX_GROUP_BYTES} bytes")
            values.extend(batch.column(0).to_pylist())
        return values


def _flatbuffer_field(buf: bytes, table: int, field: int) -> Optional[int]:
    """Where field number `field` of the flatbuffer table at `table` lies in `buf`, or None where it is absent;
    every offset checked to lie inside `buf`."""

    def read(pos: int, size: int, signed: bool = False) -> int:
        if pos < 0 or pos + size > len(buf):
            raise ValueError("an offset outside the message's metadata")
        return int.from_bytes(buf[pos : pos + size], "little", signed=signed)

    vtable = table - read(table, 4, signed=True)
    slot = 4 + 2 * field
    if slot + 2 > read(vtable, 2):
        return None
    offset = read(vtable + slot, 2)
    return table + offset if offset else None


def _batch_header(metadata: bytes) -> Tuple[int, bool]:
    """(rows, compressed) of an Arrow IPC record-batch message, read from its flatbuffer metadata before anything
    is decoded (Arrow's `Message.fbs`: Message.version is field 0, .header 2, .custom_metadata 4; RecordBatch.length
    field 0, .compression 3). Only version 5 messages without custom metadata are read, as `pyarrow` (and so
    `datasets`) writes them: version 4 streams marked their compression in the custom metadata instead."""
    root = int.from_bytes(metadata[:4], "little")
    version = _flatbuffer_field(metadata, root, 0)
    if version is None or int.from_bytes(metadata[version : version + 2], "little") != 4:
        raise ValueError("a message of another IPC version than 5")
    if _flatbuffer_field(metadata, root, 4) is not None:
        raise ValueError("a message with custom metadata")
    kind, header = _flatbuffer_field(metadata, root, 1), _flatbuffer_field(metadata, root, 2)
    if kind is None or header is None or kind >= len(metadata) or metadata[kind] != 3:
        raise ValueError("a message that is not a record batch")
    batch = header + int.from_bytes(metadata[header : header + 4], "little")
    length = _flatbuffer_field(metadata, batch, 0)
    rows = int.from_bytes(metadata[length : length + 8], "little", signed=True) if length is not None else 0
    return rows, _flatbuffer_field(metadata, batch, 3) is not None


class ArrowFormat:
    """Arrow IPC stream files, as `datasets` writes them: chunks are record batches. A file is scanned from a
    memory map (nothing copied, nothing allocated by what a message claims), then closed; a chunk is read later as
    the byte range its message took (no file stays open: a set of 10,000 files needs no 10,000 descriptors, and a
    file truncated meanwhile is an error, not a SIGBUS). A batch's header is read before the batch: its rows and its
    size are bounded, and a compressed batch (which would be inflated to a size it states itself) is refused; the
    batch is then validated in full, so no offset in it points outside its buffers."""

    @staticmethod
    def _open(path: str) -> Tuple[Any, Any]:
        """(memory map, schema) of a file."""
        import pyarrow as pa

        source = pa.memory_map(path)
        try:
            message = pa.ipc.read_message(source)
            if message.type != "schema":
                raise ValueError(f"its first message is a {message.type}, not the schema")
            return source, pa.ipc.read_schema(message)
        except BaseException:
            source.close()
            raise

    @staticmethod
    def schema(path: str | os.PathLike) -> Any:
        source, schema = ArrowFormat._open(os.fspath(path))
        source.close()
        return schema

    @staticmethod
    def _batch(root: Any, path: str, source: Any, schema: Any, at: int) -> Optional[Tuple[Any, int]]:
        """(the next record batch of `source`, the bytes its message takes), checked; None at the stream's end.
        `at`: where the message starts in the file (for the messages)."""
        import pyarrow as pa

        where = f"{path} at byte {at}"
        start = source.tell()
        try:
            message = pa.ipc.read_message(source)
        except EOFError:
            return None
        except Exception as e:  # noqa: BLE001 (pyarrow's errors for a damaged stream)
            raise _fail(root, f"cannot read {where} ({type(e).__name__}: {e})") from None
        if message.type != "record batch":
            raise _fail(root, f"{where} holds a {message.type} message; only record batches are read")
        try:
            rows, compressed = _batch_header(message.metadata.to_pybytes())
        except ValueError as e:
            raise _fail(root, f"the record batch of {where} is not read: {e}") from None
        size = source.tell() - start
        if compressed:
            raise _fail(root, f"the record batch of {where} is compressed; write it uncompressed, as `datasets` does")
        if not 0 <= rows <= MAX_CHUNK_SAMPLES or size > MAX_GROUP_BYTES:
            raise _fail(root, f"the record batch of {where} holds {rows} rows in {size} bytes: too many")
        try:
            batch = pa.ipc.read_record_batch(message, schema)
            batch.validate(full=True)
        except Exception as e:  # noqa: BLE001 (pyarrow's errors for a crafted batch)
            raise _fail(root, f"the record batch of {where} is damaged ({type(e).__name__}: {e})") from None
        return batch, size

    @staticmethod
    def scan(root: Any, path: str) -> Tuple[Any, List[Group], Optional[np.ndarray]]:
        """(schema, record batches, labels or None) of a file, its schema checked."""
        try:
            source, schema = ArrowFormat._open(path)
        except Exception as e:  # noqa: BLE001 (pyarrow's own errors for a file that is not an Arrow stream)
            raise _fail(root, f"cannot read {path} as an Arrow stream ({type(e).__name__}: {e})") from None
        with source:
            _check_schema(root, schema, path)
            labelled = "label" in schema.names
            groups, labels, rows = [], [np.zeros(0, np.int64)], 0
            while True:
                where = source.tell()
                read = ArrowFormat._batch(root, path, source, schema, where)
                if read is None:
                    break
                batch, size = read
                rows += batch.num_rows
                if rows > MAX_ROWS:
                    raise _fail(root, f"it holds more than {MAX_ROWS} rows")
                groups.append(Group(where, batch.num_rows, size))
                if labelled:
                    labels.append(_labels_of(batch.column("label")))
        return schema, groups, np.concatenate(labels) if labelled else None

    @staticmethod
    def read(root: Any, path: str, group: Group, name: str, handles: Dict) -> list:
        """The image column of the record batch `group`, as a list: the bytes its message took when the set was
        scanned, read and checked again (the file's schema is kept in `handles`)."""
        import pyarrow as pa

        if path not in handles:
            handles[path] = ArrowFormat.schema(path)
        with open(path, "rb") as f:
            f.seek(group.where)
            data = f.read(group.nbytes)
        read = None
        if len(data) == group.nbytes:
            read = ArrowFormat._batch(root, path, pa.BufferReader(data), handles[path], group.where)
        if read is None or read[0].num_rows != group.rows or read[1] != group.nbytes:
            raise _fail(root, f"the record batch {name} is not what it was when the set was opened")
        return read[0].column("image").to_pylist()


FORMATS = {".parquet": ParquetFormat, ".arrow": ArrowFormat}


def _format_of(path: Path) -> Any:
    return FORMATS[Path(path).suffix]


class TableSet(ShardSet):
    """The table files `files` (of `root`, all parquet or all Arrow) as one set, read by row: a `ShardSet` whose
    chunks are row groups or record batches."""

    def __init__(self, root: str | os.PathLike, files: Optional[List[Path]] = None) -> None:
        self.root = os.fspath(root)
        self.paths = [os.path.abspath(p) for p in (files if files is not None else table_files(root))]
        if not self.paths:
            raise _fail(self.root, "it holds no .parquet or .arrow files")
        if len({Path(p).suffix for p in self.paths}) > 1:
            raise _fail(self.root, "it mixes .parquet and .arrow files")
        self.format = _format_of(Path(self.paths[0]))
        names, record, labels, classes, structs = [], [], [], None, None
        for file, path in enumerate(self.paths):
            if not os.path.isfile(path):  # a link is followed (the Hub's cache links its files), to a file only
                raise _fail(self.root, f"{path} is not a regular file")
            schema, groups, file_labels = self.format.scan(self.root, path)
            file_structs = _image_column(self.root, schema)
            if structs is not None and file_structs != structs:
                raise _fail(self.root, f"{path} stores its images otherwise than the files before it")
            structs = file_structs
            file_classes = _class_names(self.root, schema)
            if classes is not None and file_classes is not None and file_classes != classes:
                raise _fail(self.root, f"{path} names other classes than the files before it")
            classes = classes if file_classes is None else file_classes
            if sum(len(x) for x in labels) + sum(g.rows for g in groups) > MAX_ROWS:
                raise _fail(self.root, f"it holds more than {MAX_ROWS} rows")
            for n, group in enumerate(groups):
                if group.rows > MAX_CHUNK_SAMPLES:
                    raise _fail(self.root, f"a chunk of {path} holds {group.rows} rows")
                if group.rows:
                    names.append(f"{os.path.basename(path)}#{n}")
                    record.append((file, group))
            rows = sum(g.rows for g in groups)
            labels.append(np.full(rows, -1, np.int64) if file_labels is None else file_labels)
        self.structs = structs
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.groups = record
        top = int(self.labels.max()) if len(self.labels) else -1
        if top >= MAX_CLASSES:
            raise _fail(self.root, f"a label is {top}: more than {MAX_CLASSES} classes")
        if classes is not None and len(set(classes)) != len(classes):
            raise _fail(self.root, "its Hugging Face metadata names a class twice")
        self.inferred_classes = classes is None
        if classes is None and top >= 0:
            classes = [str(c) for c in range(top + 1)]
        self.classes = classes or []
        if top >= len(self.classes):
            raise _fail(self.root, f"a label is {top}, but the files name {len(self.classes)} classes")
        self.unlabelled = int((self.labels < 0).sum())
        self.storage_options, self.cache, self.index_folder = {}, "", None
        self._set_chunks(names, [g.rows for _, g in record], [g.nbytes for _, g in record])
        # what identifies the set wherever it is copied: names, sizes, chunks, labels, classes (no times)
        stats = [(os.path.basename(p), os.path.getsize(p)) for p in self.paths]
        h = hashlib.sha256(json.dumps([stats, [(f, *g) for f, g in record], self.classes]).encode())
        h.update(self.labels.tobytes())
        self.digest = h.hexdigest()[:20]
        self.groups_read = 0  # by this process: what the cache saves

    def _open(self) -> Tuple[OrderedDict, Dict]:
        """This process's chunks, the last `GROUPS_KEPT` read (chunk id -> its image column, a list), and what it
        keeps of the files (an Arrow file's schema)."""
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader, self._reader_pid, self._last = (OrderedDict(), {}), os.getpid(), None
        return self._reader

    def _group(self, chunk: int) -> list:
        kept, handles = self._open()
        if chunk in kept:
            kept.move_to_end(chunk)
            return kept[chunk]
        file, group = self.groups[chunk]
        kept[chunk] = self.format.read(self.root, self.paths[file], group, self.chunk_names[chunk], handles)
        self.groups_read += 1
        while len(kept) > GROUPS_KEPT:
            kept.popitem(last=False)
        return kept[chunk]

    def read(self, i: int) -> Tuple[str, int, bytes, str]:
        """(key, label, encoded image, chunk) of sample `i`; its chunk is read whole, once per visit."""
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        chunk, whole = self._locate(int(i))
        value = self._group(chunk)[whole - int(self.starts[chunk])]
        data, key = (value.get("bytes"), value.get("path")) if self.structs and value else (value, None)
        if not isinstance(data, bytes) or len(data) > MAX_SAMPLE_BYTES:
            raise _fail(self.root, f"the row {whole} ({self.chunk_names[chunk]}) holds no image bytes, or too many")
        key = key if isinstance(key, str) and len(key) <= 4096 else f"row {whole}"
        self._last = (i, (key, int(self.labels[whole]), data, self.chunk_names[chunk]))
        return self._last[1]

    def label(self, i: int) -> int:
        return int(self.labels[self._locate(int(i))[1]])


SPLIT_OF_WORD = {word: split for split, words in SPLITS.items() for word in words}  # "validation" -> "val"
SPLIT_NAME = re.compile(
    rf"(?:^|[-_.])({'|'.join(SPLIT_OF_WORD)})(?:-\d+-of-\d+(?:-[0-9a-f]+)?)?"
    rf"(?:{'|'.join(re.escape(s) for s in SUFFIXES)})$"
)


def split_of(path: Path) -> Optional[str]:
    """'train' or 'val' when a table file's folder or the end of its name says so: the split's word just before its
    shard numbering or the suffix (`train-00000-of-00004.parquet`, `imagenet-1k-validation-00001-of-00002.arrow`,
    `my-train-set-validation.arrow`, `validation/data-00000-of-00001.arrow`), else None."""
    if path.parent.name in SPLIT_OF_WORD:
        return SPLIT_OF_WORD[path.parent.name]
    found = SPLIT_NAME.search(path.name)
    return None if found is None else SPLIT_OF_WORD[found.group(1)]


def open_table_split(root: str | os.PathLike) -> ShardSplit:
    """The table set at `root`, or its training and validation files as two sets."""
    files = table_files(root)
    split = {name: [f for f in files if split_of(f) == name] for name in SPLITS}
    if split["train"] and split["val"]:
        train, val = TableSet(root, split["train"]), TableSet(root, split["val"])
        if train.inferred_classes and val.inferred_classes:  # numbered classes: as many on both sides
            train.classes = val.classes = max(train.classes, val.classes, key=len)
        return ShardSplit(train, val)
    if split["train"]:
        return ShardSplit(TableSet(root, split["train"]), None)
    return ShardSplit(TableSet(root, files), None)
