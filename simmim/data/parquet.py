"""Hugging Face datasets saved as parquet files (`imagenet-1k`'s layout: an `image` column of `{bytes, path}`
structs, or of bytes, and an optional integer `label` column, the class names in the files' Hugging Face
metadata), read as a shard set: `ParquetSet` is a `simmim.data.shards.ShardSet` whose chunks are the files' row
groups, so the training order, its seeds, its exact resume and the whole-chunk splits are the shard set's.

A folder of `*.parquet` files (or of `data/*.parquet`, as the Hub lays them out) is a set; files named `train-*`
and `validation-*` (or `val-*`) make the two sets of a labelled stage. Every file is untrusted: its schema must be
the layout above, its metadata is bounded and checked, a row group is bounded before it is read. The sampler
(`simmim.seeding.ShardSampler`) shuffles samples within windows of 4 chunks, so each process keeps the last
`ROW_GROUPS_KEPT` row groups it read (two windows): every row group is read about once per epoch and process.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np

from simmim.data.shards import MAX_CHUNK_SAMPLES, MAX_CLASSES, MAX_SAMPLE_BYTES, ShardSet, ShardSplit
from simmim.errors import DataFolderError

MAX_ROW_GROUP_BYTES = 512 << 20  # a row group's images, decoded from the file (counted while it is read)
MAX_ROWS = 1 << 27  # rows of a set: its labels are held in memory, 8 bytes each
READ_BATCH = 16  # rows decoded at a time while a row group is read
MAX_METADATA_BYTES = 16 << 20  # the Hugging Face metadata of a file (its class names)
ROW_GROUPS_KEPT = 8  # per process: two of the sampler's 4-chunk windows (Hugging Face writes 100 images a group)
SPLITS = {"train": ("train",), "val": ("validation", "val")}


def parquet_files(root: str | os.PathLike) -> List[Path]:
    """The `*.parquet` files of `root` (or of `root/data`), sorted; [] when it holds none."""
    root = Path(root)
    if root.is_file() and root.suffix == ".parquet":
        return [root]
    for folder in (root, root / "data"):
        files = sorted(p for p in folder.glob("*.parquet") if p.is_file()) if folder.is_dir() else []
        if files:
            return files
    return []


def is_parquet_root(root: Optional[str | os.PathLike]) -> bool:
    """Whether `root` is a parquet set: its first parquet file has an `image` column (a stray `metadata.parquet`
    beside a folder's images leaves it a folder of images)."""
    if root is None or "://" in os.fspath(root):
        return False
    files = parquet_files(root)
    if not files:
        return False
    import pyarrow.parquet as pq

    try:
        return "image" in pq.read_schema(files[0]).names
    except Exception:  # noqa: BLE001 (not parquet: `ParquetSet` says so when asked to read it)
        return True


def _fail(root: Any, what: str) -> DataFolderError:
    return DataFolderError(
        f"--data.root {root}: {what}. A parquet set is a folder of .parquet files with an image column (bytes, or "
        "Hugging Face's {bytes, path} structs) and an optional integer label column, as imagenet-1k on the Hub"
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


def _image_column(root: Any, schema: Any) -> Tuple[str, bool]:
    """(the image column's name, whether it holds {bytes, path} structs), checked."""
    import pyarrow as pa

    if "image" not in schema.names:
        raise _fail(root, f"its files have no image column (columns: {schema.names[:8]})")
    kind = schema.field("image").type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "image", False
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        inner = kind.field("bytes").type
        if pa.types.is_binary(inner) or pa.types.is_large_binary(inner):
            return "image", True
    raise _fail(root, f"its image column is {kind}, not bytes or {{bytes, path}} structs")


class ParquetSet(ShardSet):
    """The parquet files `files` (of `root`) as one set, read by row: a `ShardSet` whose chunks are row groups."""

    def __init__(self, root: str | os.PathLike, files: Optional[List[Path]] = None) -> None:
        import pyarrow.parquet as pq

        self.root = os.fspath(root)
        self.paths = [os.path.abspath(p) for p in (files if files is not None else parquet_files(root))]
        if not self.paths:
            raise _fail(self.root, "it holds no .parquet files")
        names, sizes, record, labels, classes = [], [], [], [], None
        for path in self.paths:
            try:
                meta = pq.ParquetFile(path)
            except Exception as e:  # noqa: BLE001 (pyarrow's own errors for a file that is not parquet)
                raise _fail(self.root, f"cannot read {path} ({type(e).__name__}: {e})") from None
            schema = meta.schema_arrow
            column = _image_column(self.root, schema)
            if getattr(self, "column", None) is not None and (self.column, self.structs) != column:
                raise _fail(self.root, f"{path} stores its images otherwise than the files before it")
            self.column, self.structs = column
            file_classes = _class_names(self.root, schema)
            if classes is not None and file_classes is not None and file_classes != classes:
                raise _fail(self.root, f"{path} names other classes than the files before it")
            classes = classes if file_classes is None else file_classes
            if sum(sizes) + meta.metadata.num_rows > MAX_ROWS:
                raise _fail(self.root, f"it holds more than {MAX_ROWS} rows")
            for rg in range(meta.metadata.num_row_groups):
                group = meta.metadata.row_group(rg)
                if group.num_rows > MAX_CHUNK_SAMPLES:
                    raise _fail(self.root, f"a row group of {path} holds {group.num_rows} rows")
                if group.num_rows:
                    names.append(f"{os.path.basename(path)}#{rg}")
                    sizes.append(group.num_rows)
                    record.append((path, rg, group.num_rows, group.total_byte_size))
            labels.append(self._labels(meta, path))
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.groups = [(self.paths.index(p), rg) for p, rg, _, _ in record]
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
        self.chunk_names, self.sizes = names, np.asarray(sizes, dtype=np.int64)
        self.chunk_bytes = np.asarray([b for *_, b in record], dtype=np.int64)
        # what identifies the set wherever it is copied: names, sizes, row groups, labels, classes (no times)
        stats = [(os.path.basename(p), os.path.getsize(p)) for p in self.paths]
        h = hashlib.sha256(json.dumps([stats, [r[1:] for r in record], self.classes]).encode())
        h.update(self.labels.tobytes())
        self.digest = h.hexdigest()[:20]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self.chunks = np.arange(len(self.sizes))
        self._bounds = self.starts
        self._reader, self._reader_pid, self._last = None, None, None
        self.row_groups_read = 0  # by this process: what the cache saves

    def _labels(self, meta: Any, path: str) -> np.ndarray:
        """A file's labels (-1 where there is none), from its integer `label` column; all -1 without one. `meta`:
        the file, opened."""
        import pyarrow as pa

        schema = meta.schema_arrow
        if "label" not in schema.names:
            return np.full(meta.metadata.num_rows, -1, np.int64)
        if not pa.types.is_integer(schema.field("label").type):
            raise _fail(self.root, f"the label column of {path} is {schema.field('label').type}, not integers")
        column = meta.read(columns=["label"]).column("label")
        values = column.to_numpy(zero_copy_only=False)
        return np.where(np.asarray(column.is_null()), -1, values).astype(np.int64)

    def _open(self) -> OrderedDict[int, list]:
        """This process's row groups, the last `ROW_GROUPS_KEPT` read: chunk id -> its image column (a list)."""
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader, self._reader_pid, self._last = OrderedDict(), os.getpid(), None
        return self._reader

    def _row_group(self, chunk: int) -> list:
        groups = self._open()
        if chunk in groups:
            groups.move_to_end(chunk)
            return groups[chunk]
        import pyarrow.parquet as pq

        file, rg = self.groups[chunk]
        values, size = [], 0
        reader = pq.ParquetFile(self.paths[file])
        for batch in reader.iter_batches(batch_size=READ_BATCH, row_groups=[rg], columns=[self.column]):
            size += batch.nbytes  # counted as it is decoded: what the file says of itself is not trusted
            if size > MAX_ROW_GROUP_BYTES:
                raise _fail(
                    self.root,
                    f"the row group {self.chunk_names[chunk]} decodes to more than {MAX_ROW_GROUP_BYTES} bytes",
                )
            values.extend(batch.column(0).to_pylist())
        groups[chunk] = values
        self.row_groups_read += 1
        while len(groups) > ROW_GROUPS_KEPT:
            groups.popitem(last=False)
        return groups[chunk]

    def read(self, i: int) -> Tuple[str, int, bytes, str]:
        """(key, label, encoded image, row group) of sample `i`; the row group is read whole, once per visit."""
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        chunk, whole = self._locate(int(i))
        value = self._row_group(chunk)[whole - int(self.starts[chunk])]
        data, key = (value.get("bytes"), value.get("path")) if self.structs and value else (value, None)
        if not isinstance(data, bytes) or len(data) > MAX_SAMPLE_BYTES:
            raise _fail(self.root, f"the row {whole} ({self.chunk_names[chunk]}) holds no image bytes, or too many")
        key = key if isinstance(key, str) and len(key) <= 4096 else f"row {whole}"
        self._last = (i, (key, int(self.labels[whole]), data, self.chunk_names[chunk]))
        return self._last[1]

    def label(self, i: int) -> int:
        return int(self.labels[self._locate(int(i))[1]])


def open_parquet_split(root: str | os.PathLike) -> ShardSplit:
    """The parquet set at `root`, or its `train-*` and `validation-*` (`val-*`) files as two sets."""
    files = parquet_files(root)
    split = {name: [f for f in files if f.name.startswith(tuple(f"{p}-" for p in prefixes))]
             for name, prefixes in SPLITS.items()}  # fmt: skip
    if split["train"] and split["val"]:
        train, val = ParquetSet(root, split["train"]), ParquetSet(root, split["val"])
        if train.inferred_classes and val.inferred_classes:  # numbered classes: as many on both sides
            train.classes = val.classes = max(train.classes, val.classes, key=len)
        return ShardSplit(train, val)
    if split["train"]:
        return ShardSplit(ParquetSet(root, split["train"]), None)
    return ShardSplit(ParquetSet(root, files), None)
