"""litdata's downloader for any filesystem fsspec knows (`simmim.data.stores.use_store` registers it for a scheme
litdata has no downloader of its own for)."""

from __future__ import annotations

import os
from typing import Any, Dict

from litdata.streaming.downloader import Downloader


class FsspecDownloader(Downloader):
    """litdata's downloader for a filesystem fsspec knows: byte ranges, whole files by `get_file` (published under a
    temporary name, then renamed). fsspec keeps one filesystem object per process and thread."""

    BLOCK = 1 << 20

    def _fs(self):
        from fsspec.core import url_to_fs

        return url_to_fs(self._remote_dir, **self._storage_options)[0]

    def _chunk_sizes(self) -> Dict[str, int]:
        """File name -> byte size of every chunk, worked out once (not at every sample)."""
        if getattr(self, "_sizes", None) is None:
            self._sizes = {c["filename"]: c["chunk_bytes"] for c in self._chunks}
        return self._sizes

    def download_fileobj(self, remote_filepath: str, fileobj: Any) -> None:
        with self._fs().open(remote_filepath, "rb") as f:
            while block := f.read(self.BLOCK):
                fileobj.write(block)

    def download_bytes(self, remote_filepath: str, offset: int, length: int, local_chunkpath: str) -> bytes:
        if not length:
            return b""
        fs = self._fs()
        if fs.protocol[0] in ("http", "https"):
            # read as a file of the chunk's size: fsspec then refuses an answer that is not the range instead of
            # reading a whole object (or an endless stream) into memory
            size = self._chunk_sizes()[os.path.basename(remote_filepath)]
            try:
                with fs.open(remote_filepath, "rb", size=size, block_size=length, cache_type="none") as f:
                    f.seek(offset)
                    data = f.read(length)
            except ValueError as e:
                raise OSError(f"{remote_filepath}: {e}") from None
        else:
            data = fs.cat_file(remote_filepath, start=offset, end=offset + length)
        if len(data) != length:  # a store that ignored the range, or a file shorter than its index says
            raise OSError(f"{remote_filepath}: {len(data)} bytes read at {offset}, {length} expected")
        return data

    def download_file(self, remote_filepath: str, local_filepath: str) -> None:
        if not os.path.exists(local_filepath):
            os.makedirs(os.path.dirname(local_filepath) or ".", exist_ok=True)
            tmp = self._temp_download_path(local_filepath)
            try:
                self._fs().get_file(remote_filepath, tmp)
                self._atomic_replace(tmp, local_filepath)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        self._notify_published(local_filepath)
