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
# fsspec's filesystems of network stores. Not its filesystems that read through other files or URLs named in what
# they read (reference://, zip://, tar://, the caches, ...): a crafted set could send the reads anywhere.
FSSPEC_STORES = (
    "http", "https", "ftp", "sftp", "ssh", "hdfs", "webhdfs", "webdav", "gcs", "abfs", "abfss", "az", "adl", "oci",
    "oss",
)  # fmt: skip
HINTS = {
    "hf": "litdata reads hf:// as a Hugging Face dataset of its own kind, before anything could check it",
    "local": "litdata takes local: for a cached local folder: give the folder's path",
    "file": "give the folder's path without file://",
}


def scheme(root: str) -> Optional[str]:
    """The URL scheme of `root` (lower case; the first of a chained fsspec URL, `a::b://`), or None for a path."""
    match = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*)(://|::)", root)
    return match.group(1).lower() if match else None


def unusable(url: str) -> Optional[str]:
    """Why shards cannot be read from the URL `url` (None: they can)."""
    name = scheme(url) or ""
    if name in HINTS:
        return HINTS[name]
    if name not in LITDATA_STORES + FSSPEC_STORES:
        return (
            f"{name}:// is not a store shards are read from (litdata's: {', '.join(LITDATA_STORES)}; fsspec's "
            f"network filesystems: {', '.join(FSSPEC_STORES)})"
        )
    if "::" in url:
        return "chained fsspec URLs (a::b://) are not taken: name the store itself"
    if re.search(r"[?#]", url) or "@" in url.split("://", 1)[1].split("/", 1)[0]:
        return (
            "a URL with credentials, a query or a fragment is not taken (it would be printed and saved with the "
            "run): give credentials through the store's environment or fsspec's configuration"
        )
    if name in FSSPEC_STORES:
        import fsspec

        try:
            fsspec.get_filesystem_class(name)
        except ImportError as e:  # fsspec reads it through a package that is not installed
            return f"fsspec reads {name}:// through a package that is not installed ({e})"
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
