"""`python -m simmim.shard SRC OUT`: a folder tree of images (with or without class folders) packed into a shard
set (`simmim.data.shards`) that both stages read with `--data.root OUT`, or from object storage once copied there.

- The tree is read through its file index (`simmim.data.index`: walked once, cached); a file's class is its
  top-level folder, as in fine-tuning (-1 for a file directly in SRC).
- The files are written in a fixed random order (a permutation drawn from `--seed`), so that every chunk holds a
  sample of the whole tree rather than one class folder: training shuffles within a few chunks at a time.
- Every image is decoded before it is written; one that does not decode is left out and named (on the terminal and
  in `shards.json`). The bytes written are the file's own: nothing is re-encoded.
- The work is cut into parts of `--part_size` files, written side by side by `--workers` processes, each part's
  chunks named after it. A part is done once its record (`part-<n>.json`) exists, so an interrupted conversion
  started again with the same command redoes only the unfinished parts. `OUT/.convert.json` records the source and
  settings; a folder holding another conversion is refused rather than mixed.
- The set is complete when litdata's `index.json` is written, last.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from simmim.data.images import UnreadableImageError, read_image_file
from simmim.data.index import FileIndex, open_index, read_json, write_json
from simmim.data.pixels import read_array
from simmim.data.shards import (
    FORMAT,
    INDEX_FILE,
    MAX_SAMPLE_BYTES,
    SHARDS_FILE,
    VERSION,
    ShardSet,
    checked_index,
    data_spec,
)
from simmim.errors import ConfigError

MANIFEST = ".convert.json"
LOCK = ".convert.lock"
RANK_ENV = "DATA_OPTIMIZER_GLOBAL_RANK"  # litdata's writer takes its rank from it
MAX_RECORD_BYTES = 256 << 20


def parse(args: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simmim.shard", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="the image folder (class folders optional)")
    p.add_argument("out", help="the shard folder to write (new or empty, or an interrupted conversion to finish)")
    p.add_argument("--chunk_mb", type=float, default=64.0, help="chunk size in MB (default 64)")
    p.add_argument("--part_size", type=int, default=1000, help="files per resumable part (default 1000)")
    workers = min(8, os.cpu_count() or 1)
    p.add_argument("--workers", type=int, default=workers, help="processes (default: the cores, 8 at most)")
    p.add_argument("--seed", type=int, default=0, help="the order the files are written in (default 0)")
    p.add_argument("--index_cache", help="where the source's file index is kept (default: the usual cache)")
    p.add_argument("--reindex", action="store_true", help="walk the source again even if its index is current")
    a = p.parse_args(args)
    if a.chunk_mb <= 0 or a.part_size <= 0 or a.workers < 1:
        raise ConfigError("--chunk_mb, --part_size and --workers must be positive")
    return a


def _read_json(path: Path) -> Any:
    return read_json(path, MAX_RECORD_BYTES)


def _key(rel: str) -> str:
    """A file's path in the tree as a sample key (a name that is not UTF-8 gets replacement characters)."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _convert_part(job: Tuple[FileIndex, np.ndarray, int, str, int]) -> Dict[str, Any]:
    """Write one part's files (positions of the source index) as chunks `chunk-<part>-<n>.bin` and its litdata
    index `<part>.index.json`, then its record `part-<part>.json`, which it returns: the part, the images written,
    those without a class, and those skipped (`[path, reason]` pairs)."""
    import cv2

    cv2.setNumThreads(1)
    index, positions, part, out, chunk_bytes = job
    out_dir = Path(out)
    with _shared_lock(out_dir):
        return _write_locked_part(index, positions, part, out_dir, chunk_bytes)


def _write_locked_part(
    index: FileIndex, positions: np.ndarray, part: int, out_dir: Path, chunk_bytes: int
) -> Dict[str, Any]:
    for leftover in [*out_dir.glob(f"chunk-{part}-*.bin"), out_dir / f"{part}.{INDEX_FILE}"]:
        leftover.unlink(missing_ok=True)  # an interrupted attempt at this part
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    import litdata.streaming.writer as litdata_writer

    # With pyarrow installed, litdata's writer keeps a sample of strings, an int and bytes only in an Arrow table
    # appended to the chunk, its offsets all equal: litdata's random access by byte range (remote sets) then reads
    # empty samples. Our chunks are always litdata's classic layout, one sample after another, whatever is installed.
    litdata_writer.is_arrow_footer_type = lambda schema: False
    BinaryWriter = litdata_writer.BinaryWriter

    record: Dict[str, Any] = {"part": part, "written": 0, "unlabelled": 0, "skipped": []}
    before = os.environ.get(RANK_ENV)
    os.environ[RANK_ENV] = str(part)  # litdata's writer names its chunks after it
    try:
        writer = BinaryWriter(os.fspath(out_dir), chunk_bytes=chunk_bytes)
        with contextlib.redirect_stdout(io.StringIO()):  # the writer prints the format it infers
            _write_part(writer, index, positions, record)
    finally:
        if before is None:
            del os.environ[RANK_ENV]
        else:
            os.environ[RANK_ENV] = before
    write_json(out_dir / f"part-{part}.json", record)
    return record


def _write_part(writer, index: FileIndex, positions: np.ndarray, record: Dict[str, Any]) -> None:
    for i in positions:
        path, rel, label = index[int(i)], index.relative(int(i)), int(index.label(int(i)))
        try:
            if os.path.getsize(path) > MAX_SAMPLE_BYTES:  # what a reader takes from a chunk, at most
                raise UnreadableImageError(f"{path} is larger than {MAX_SAMPLE_BYTES} bytes")
            data = read_image_file(path)
            read_array(data, path)  # decodes as both stages read it: any reader, any channels and depth
        except (UnreadableImageError, OSError) as e:
            record["skipped"].append([_key(rel), str(e)])
            continue
        writer[record["written"]] = {"key": _key(rel), "label": label, "image": data.tobytes()}
        record["written"] += 1
        record["unlabelled"] += label < 0
    if record["written"]:
        writer.done()


def _manifest(src: Path, index: FileIndex, a: argparse.Namespace) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": os.fspath(src),
        "fingerprint": list(index.fingerprint()),
        "chunk_bytes": int(a.chunk_mb * 2**20),
        "part_size": a.part_size,
        "seed": a.seed,
    }


def _found(out: Path, manifest: Dict[str, Any]) -> str:
    """What `out` holds for `manifest`'s conversion: "new" (missing or empty), "partial" or "complete"; anything
    else is refused. Reads only."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"OUT {out}: not a folder (a link is not followed); give a new or empty folder")
    if not out.exists() or all(p.name == LOCK for p in out.iterdir()):
        return "new"
    found = _read_json(out / MANIFEST)
    if found is None:
        raise ConfigError(f"OUT {out}: not empty and not a conversion by this command; give a new or empty folder")
    if found != manifest:
        raise ConfigError(
            f"OUT {out}: holds a conversion of another source, with other settings, or of the source before it "
            f"changed ({found.get('source') if isinstance(found, dict) else '?'}); give a new folder, or delete "
            "this one"
        )
    return "complete" if (out / INDEX_FILE).is_file() else "partial"


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """`out` (made if missing) held by this conversion: a second one into it is refused while this one, or any of
    its workers, runs. The lock (`out/.convert.lock`) is taken exclusively to start, then held shared, as each
    worker holds it while it writes a part (`_shared_lock`), so that a worker left running by a killed conversion
    still keeps a new one out. The kernel releases it when a process ends, however it ends."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise ConfigError(f"OUT {out}: cannot write its lock ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"OUT {out}: another conversion is writing it; wait for it to end") from None
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _shared_lock(out: Path) -> Iterator[None]:
    """In a worker: the conversion's lock on `out`, held shared while it writes."""
    with open(out / LOCK, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        yield


def _part_records(out: Path, parts: int) -> Dict[int, Dict[str, Any]]:
    """The records of the finished parts (a malformed one counts as unfinished: the part is redone)."""
    done = {}
    for p in range(parts):
        record = _read_json(out / f"part-{p}.json") if (out / f"part-{p}.json").is_file() else None
        if (
            isinstance(record, dict)
            and record.get("part") == p
            and all(isinstance(record.get(k), int) for k in ("written", "unlabelled"))
            and isinstance(record.get("skipped"), list)
        ):
            done[p] = record
    return done


def _finish(out: Path, records: Dict[int, Dict[str, Any]], classes: List[str], source: Path) -> int:
    """Merge the parts' litdata indexes into `index.json` (written last) beside `shards.json`; returns the count."""
    chunks, config, spec = [], None, data_spec()
    for p in sorted(records):
        if not records[p]["written"]:
            continue
        part = _read_json(out / f"{p}.{INDEX_FILE}")
        if not isinstance(part, dict):
            raise ConfigError(f"OUT {out}: the index of part {p} is missing or unreadable: run the command again")
        checked = checked_index(os.fspath(out), part.get("config"), part.get("chunks"), spec)[2]
        config = config or checked["config"]
        chunks.extend(checked["chunks"])
    count = sum(int(r["written"]) for r in records.values())
    if not count:
        raise ConfigError(f"no image under {source} could be decoded: nothing to write")
    skipped = [s for p in sorted(records) for s in records[p]["skipped"]]
    record = {"format": FORMAT, "version": VERSION, "count": count, "classes": classes}
    record.update(unlabelled=sum(int(r["unlabelled"]) for r in records.values()), source=os.fspath(source))
    write_json(out / SHARDS_FILE, {**record, "skipped": skipped})
    write_json(out / INDEX_FILE, {"chunks": chunks, "config": config, "updated_at": str(time.time())})
    _tidy(out)
    return count


def _tidy(out: Path) -> None:
    """Remove what an interrupted conversion leaves behind: half-written records (`.*.tmp`), and once the set is
    complete the parts' records and indexes (not part of the set: a copy to object storage would take them)."""
    leftovers = list(out.glob(".*.tmp"))
    if (out / INDEX_FILE).is_file():
        leftovers += [*out.glob("part-*.json"), *(p for p in out.glob(f"*.{INDEX_FILE}") if p.name[0].isdigit())]
    for path in leftovers:
        path.unlink(missing_ok=True)


def convert(a: argparse.Namespace) -> int:
    """Run the conversion `a` describes (`parse`); returns the number of images written. A source with train/ and
    val/ folders becomes two sets, OUT/train and OUT/val, as fine-tuning reads them."""
    src, out = Path(a.src).resolve(), Path(a.out).absolute()
    if (src / "train").is_dir() and (src / "val").is_dir():
        return sum(convert_tree(src / split, out / split, a) for split in ("train", "val"))
    return convert_tree(src, out, a)


def convert_tree(src: Path, out: Path, a: argparse.Namespace) -> int:
    """One folder tree `src` into the shard set `out`; returns the number of images written."""
    index = open_index(src, None, a.index_cache, a.reindex, fresh=True)
    manifest = _manifest(src, index, a)
    if _found(out, manifest) != "complete":  # refusals and a finished set need no lock (nor a writable OUT)
        with _locked(out):
            found = _found(out, manifest)  # again, now that no other conversion can change it
            if found == "new":
                write_json(out / MANIFEST, manifest)
            _tidy(out)
            if found != "complete":
                return _convert_locked(src, out, index, manifest, a)
    else:
        with contextlib.suppress(OSError):  # a finished set on a read-only mount stays as it is
            _tidy(out)
    print(f"{out}: already complete ({SHARDS_FILE} names what it holds)", file=sys.stderr)
    return len(ShardSet(out))


def _convert_locked(src: Path, out: Path, index: FileIndex, manifest: Dict[str, Any], a: argparse.Namespace) -> int:
    """Write the unfinished parts of `out` (locked, `_locked`), then finish the set."""
    from tqdm import tqdm

    order = np.random.default_rng(a.seed).permutation(len(index))
    parts = -(-len(index) // a.part_size)
    records = _part_records(out, parts)
    jobs = [
        (index, order[p * a.part_size : (p + 1) * a.part_size], p, os.fspath(out), manifest["chunk_bytes"])
        for p in range(parts)
        if p not in records
    ]
    done = sum(min(a.part_size, len(index) - p * a.part_size) for p in records)
    with tqdm(total=len(index), initial=done, unit="img", desc=f"shards -> {out.name}", file=sys.stderr) as bar:

        def finished(record: Dict[str, Any]) -> None:
            records[record["part"]] = record
            for key, reason in record["skipped"]:
                bar.write(f"skipped {key}: {reason}", file=sys.stderr)
            bar.update(min(a.part_size, len(index) - record["part"] * a.part_size))

        if a.workers == 1 or len(jobs) <= 1:
            for job in jobs:
                finished(_convert_part(job))
        else:
            pool = multiprocessing.get_context("spawn").Pool(min(a.workers, len(jobs)))
            try:
                for result in pool.imap_unordered(_convert_part, jobs):
                    finished(result)
            except BaseException:
                pool.terminate()
                raise
            else:
                pool.close()  # the workers exit on their own (a terminated one leaks litdata's semaphores)
            finally:
                pool.join()
    count = _finish(out, records, index.classes, src)
    skipped = len(index) - count
    left_out = f", {skipped} left out (each named, with the reason, in {SHARDS_FILE})" if skipped else ""
    print(f"{out}: {count} images in shards{left_out}", file=sys.stderr)
    return count


def main(args: Optional[List[str]] = None) -> int:
    return convert(parse(args))
