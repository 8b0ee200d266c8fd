"""Where shard sets are read from: a local folder; the object stores litdata reads itself (`s3://`, `gs://`,
`azure://`, `r2://`); or any other filesystem fsspec knows (`https://`, `sftp://`, `hdfs://`, `webdav://`, `gcs://`
through gcsfs, `abfs://` through adlfs, ...), which litdata reads through `simmim.data.fsspec_downloader`,
registered with litdata for that scheme in every process that reads (`use_store`).

A set is read by byte ranges (a sample's offsets, then its bytes), so a store needs nothing but ranged reads; its
options (endpoints, credentials) come from its usual environment, or from fsspec's configuration
(`~/.config/fsspec/*.json`, `FSSPEC_<PROTOCOL>_<OPTION>` variables) for an fsspec filesystem.
"""

from __future__ import annotations

import io
import re
from typing import Dict, Optional

LITDATA_STORES = ("s3", "gs", "azure", "r2")  # read by litdata's own downloaders
REFUSED = {
    "hf": "litdata reads hf:// as a Hugging Face dataset of its own kind, before anything could check it",
    "local": "litdata takes local: for a cached local folder: give the folder's path",
    "file": "give the folder's path without file://",
    "memory": "fsspec's memory filesystem is private to one process, and data-loader workers are processes",
}


def scheme(root: str) -> Optional[str]:
    """The URL scheme of `root` (lower case), or None for a path."""
    match = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*)://", root)
    return match.group(1).lower() if match else None


def unusable(name: str) -> Optional[str]:
    """Why shards cannot be read from `name://` (None: they can)."""
    if name in REFUSED:
        return REFUSED[name]
    if name in LITDATA_STORES:
        return None
    import fsspec

    try:
        fsspec.get_filesystem_class(name)
    except ImportError as e:  # fsspec knows it, through a package that is not installed
        return f"fsspec reads {name}:// through a package that is not installed ({e})"
    except ValueError:
        return f"neither litdata ({', '.join(LITDATA_STORES)}) nor fsspec reads {name}://"
    return None


def use_store(name: str) -> None:
    """Make litdata read `name://` through `FsspecDownloader`, unless it has a downloader of its own for it."""
    from litdata.streaming.downloader import _DOWNLOADERS, register_downloader

    from simmim.data.fsspec_downloader import FsspecDownloader

    if f"{name}://" not in _DOWNLOADERS:
        register_downloader(f"{name}://", FsspecDownloader)


class _Bounded(io.BytesIO):
    """An in-memory file that refuses to grow past `limit` bytes (a download of a file whose size is untrusted)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data) -> int:  # type: ignore[override]
        if self.tell() + len(data) > self.limit:
            raise ValueError(f"larger than {self.limit} bytes")
        return super().write(data)


def read_bounded(url: str, limit: int, storage_options: Optional[Dict] = None) -> bytes:
    """The object at `url`, refused past `limit` bytes before more is read."""
    from litdata.streaming.downloader import get_downloader

    use_store(scheme(url) or "")
    buffer = _Bounded(limit)
    get_downloader(url.rsplit("/", 1)[0], "", [], storage_options).download_fileobj(url, buffer)
    return buffer.getvalue()
