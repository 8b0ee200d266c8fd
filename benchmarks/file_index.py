"""What the file index costs at scale, against the plain listing it replaced (`simmim.data.index`).

Builds a tree of N empty `.JPEG` files in 1,000 class folders (once, under `--dir`), then reports for each N:
- the old listing: `list_images` time, and the private memory a forked worker copies touching every entry;
- the index: first build (walk + write), a cached start (every folder checked, the files mapped and validated),
  the index's bytes per file, and the private memory a forked worker copies touching every entry of a split.

Private memory is the worker's private dirty pages outside mapped files (`/proc/self/smaps`): what copying on write
costs. Linux only.

    python benchmarks/file_index.py --n 100000 1000000 --dir /tmp/index_bench [--out benchmarks/results/...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from simmim.data.images import list_images  # noqa: E402
from simmim.data.index import folder_index  # noqa: E402


def make_tree(root: Path, n: int) -> None:
    """N empty files, `class{c:03d}/{i:09d}.JPEG`, 1,000 classes; kept when it is already there."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return
    shutil.rmtree(root, ignore_errors=True)
    for c in range(1000):
        (root / f"class{c:03d}").mkdir(parents=True)
    for i in range(n):
        fd = os.open(root / f"class{i % 1000:03d}" / f"{i:09d}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
    done.write_text(str(n))


def private_dirty_kib() -> int:
    """Private dirty memory outside mapped files (heap, anonymous): what copying on write costs a process. A mapped
    file's pages count as private dirty too while the page cache has not written them back: left out."""
    total, anonymous = 0, True
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                anonymous = len(fields) == 5 or fields[5].startswith("[")
            elif fields[0] == "Private_Dirty:" and anonymous:
                total += int(fields[1])
    return total


def worker_copies(files) -> Tuple[int, int]:
    """(KiB a forked process copies while it reads every entry of `files`, as a data-loader worker does over an
    epoch; the characters it read). `tests/simmim/test_index.py` measures with it too."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        start = private_dirty_kib()
        chars = sum(len(str(files[i])) for i in range(len(files)))
        os.write(write, f"{private_dirty_kib() - start} {chars}".encode())
        os._exit(0)
    os.close(write)
    kib, chars = map(int, os.read(read, 64).split())
    os.waitpid(pid, 0)
    return kib, chars


def index_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.split("-")[0] != "subset")


def measure(root: Path, n: int, cache: Path) -> dict:
    make_tree(root, n)
    t = time.perf_counter()
    listed = list_images(root)
    list_s = time.perf_counter() - t
    list_copy = worker_copies(listed)[0] / 1024
    del listed
    shutil.rmtree(cache, ignore_errors=True)
    t = time.perf_counter()
    index = folder_index(root, cache)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    index = folder_index(root, cache)
    cached_s = time.perf_counter() - t
    order = np.random.default_rng(0).permutation(len(index))
    split = index.subset(np.sort(order[len(index) // 20 :]))  # the training side of a 5% split
    return {
        "files": len(index),
        "listing_s": round(list_s, 2),
        "listing_worker_copies_mib": round(list_copy, 1),
        "index_first_build_s": round(build_s, 2),
        "index_cached_start_s": round(cached_s, 3),
        "index_bytes_per_file": round(index_bytes(index.folder) / len(index), 1),
        "split_bytes_per_file": 8.0,
        "index_worker_copies_mib": round(worker_copies(split)[0] / 1024, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dir", default=None, help="where the trees are made (default: a temporary folder, removed)")
    p.add_argument("--out", default=None, help="also write the results as JSON")
    opts = p.parse_args()
    base = Path(opts.dir or tempfile.mkdtemp(prefix="index-bench-"))
    rows = []
    try:
        for n in opts.n:
            row = measure(base / f"tree{n}", n, base / f"cache{n}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if opts.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    result = {"machine": f"{platform.node()}: {cpu}, {os.cpu_count()} cores", "rows": rows}
    if opts.out:
        Path(opts.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
