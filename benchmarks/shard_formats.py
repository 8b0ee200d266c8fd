"""Which library to stream pretraining shards with: litdata (maintained by Lightning) and webdataset, measured on the
same images, to choose by numbers (docs/data.md has the figures and the choice).

    PYTHONPATH=DIR python benchmarks/shard_formats.py --n 2000 --out benchmarks/results/shard_formats_cpu.json \
        [--libraries webdataset litdata] [--label NAME]

(DIR holds litdata and webdataset, which the project does not install: `pip install --target DIR litdata
webdataset`.) The images are `dataloader.py`'s photo-like JPEGs (500x375 and 375x500, about 85 KB), in 10 class
folders. For each library:

- **write**: seconds to turn the folder into shards of `--shard_mb` (16 MB: about 10 shards of the default 2,000
  images; real datasets use 64 MB to 1 GB) (the encoded bytes kept as they are, with the
  class and the sample's position);
- **read**: images/s through a loader with W workers (`--workers`), each sample read and decoded by OpenCV (the
  decoding pretraining does), one epoch after a warm-up epoch; per worker, the rate divided by W;
- **exact resume**: an epoch interrupted after half its batches and resumed from the loader's saved state sees
  exactly the samples, in order, that the uninterrupted epoch saw after that point ("replay" where the library has
  no saved state: the same seed gives the same order, so a resume must read and discard what came before);
- **ranks**: two ranks (simulated through the environment variables each library reads) read one epoch each:
  how many samples each got, and how many were read twice or not at all.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from dataloader import make_jpegs  # noqa: E402

try:
    import webdataset as wds
    from litdata import StreamingDataLoader, StreamingDataset, optimize
except ImportError as e:
    raise SystemExit(f"{e}: install litdata and webdataset (see this file's docstring)") from None

CLASSES = 10
OPENCV = "opencv-python-headless"  # the distribution requirements.txt installs
SHARD_BYTES = [16 << 20]  # --shard_mb


def _decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def _items(folder: Path, n: int) -> List[Tuple[str, int, int]]:
    """(path, class, position) of `n` JPEGs in `CLASSES` class folders."""
    files = make_jpegs(folder / "flat", n)
    items = []
    for i, f in enumerate(files):
        target = folder / "classes" / f"c{i % CLASSES}" / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, target)
        items.append((str(target), i % CLASSES, i))
    return items


# litdata ------------------------------------------------------------------------------------------------------------


def _litdata_sample(item: Tuple[str, int, int]) -> Dict:
    path, label, index = item
    return {"image": Path(path).read_bytes(), "label": label, "index": index}


def litdata_write(items, out: Path) -> None:
    optimize(fn=_litdata_sample, inputs=items, output_dir=str(out), chunk_bytes=SHARD_BYTES[0], num_workers=1)


class Decoded(StreamingDataset):
    """litdata's dataset, each sample decoded (as pretraining does) or not (`decode`)."""

    decode = True

    def __getitem__(self, index):
        item = super().__getitem__(index)
        return (_decode(item["image"]).shape[0] if self.decode else 0), item["index"]


def litdata_loader(shards: Path, workers: int, decode: bool = True, persistent: bool = False):
    dataset = Decoded(str(shards), shuffle=True, seed=0, drop_last=False)
    dataset.decode = decode
    return StreamingDataLoader(dataset, batch_size=32, num_workers=workers, persistent_workers=persistent)


# webdataset ---------------------------------------------------------------------------------------------------------


def webdataset_write(items, out: Path) -> None:
    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxsize=SHARD_BYTES[0], verbose=0) as sink:
        for path, label, index in items:
            sink.write({"__key__": f"{index:09d}", "jpg": Path(path).read_bytes(), "cls": label, "idx.cls": index})


def _decoded_sample(s) -> Tuple[int, int]:
    return _decode(s["jpg"]).shape[0], int(s["idx.cls"])


def _raw_sample(s) -> Tuple[int, int]:
    return 0, int(s["idx.cls"])


def _webdataset_pipeline(shards: Path, decode: bool):
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    return (
        wds.WebDataset(urls, shardshuffle=len(urls), seed=0, nodesplitter=wds.split_by_node, empty_check=False)
        .shuffle(1000, seed=0)
        .map(_decoded_sample if decode else _raw_sample)
    )


def webdataset_loader(shards: Path, workers: int, decode: bool = True, persistent: bool = False):
    return wds.WebLoader(
        _webdataset_pipeline(shards, decode), batch_size=32, num_workers=workers, persistent_workers=persistent
    )


LIBRARIES = {
    "litdata": (litdata_write, litdata_loader),
    "webdataset": (webdataset_write, webdataset_loader),
}


# measurements -------------------------------------------------------------------------------------------------------


def _epoch(loader) -> List[int]:
    return [int(i) for _, idx in loader for i in idx]


def _shut(loader) -> None:
    """Stops a loader's persistent workers now (webdataset's loader wraps a DataLoader in its pipeline): left
    running, they would take the cores from what is measured next."""
    for part in [loader, *getattr(loader, "pipeline", [])]:
        iterator = getattr(part, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            part._iterator = None


def read_rate(make_loader, shards: Path, workers: int) -> float:
    loader = make_loader(shards, workers, persistent=True)
    _epoch(loader)  # warm-up: workers started, files in the page cache
    start = time.perf_counter()
    n = len(_epoch(loader))
    rate = n / (time.perf_counter() - start)
    _shut(loader)
    del loader
    gc.collect()
    return rate


def exact_resume(name: str, shards: Path) -> Dict:
    """Whether an epoch stopped halfway and resumed from the loader's state sees what the whole epoch saw after."""
    make_loader = LIBRARIES[name][1]
    whole = _epoch(make_loader(shards, 2, decode=False))
    half = len(whole) // 64  # batches of 32: half the epoch
    if name == "webdataset":
        again = _epoch(make_loader(shards, 2, decode=False))
        return {"saved_state": False, "replay_same_order": again == whole}
    loader = make_loader(shards, 2, decode=False)
    first: List[int] = []
    for b, (_, idx) in enumerate(loader):
        first += [int(i) for i in idx]
        if b + 1 == half:
            state = loader.state_dict()
            break
    resumed = make_loader(shards, 2, decode=False)
    resumed.load_state_dict(state)
    rest = _epoch(resumed)
    return {
        "saved_state": True,
        "first_part_matches": first == whole[: len(first)],
        "resumed_matches": rest == whole[len(first) :],
        "seen_once": sorted(first + rest) == sorted(whole),
    }


def two_ranks(name: str, shards: Path, n: int) -> Dict:
    """One epoch on each of two simulated ranks (one worker each)."""
    seen: List[List[int]] = []
    for rank in (0, 1):
        env = {"WORLD_SIZE": "2", "GLOBAL_RANK": str(rank), "RANK": str(rank)}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            seen.append(_epoch(LIBRARIES[name][1](shards, 1, decode=False)))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    together = seen[0] + seen[1]
    return {
        "per_rank": [len(s) for s in seen],
        "read_twice": len(together) - len(set(together)),
        "not_read": n - len(set(together)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES), help="in this order")
    p.add_argument("--shard_mb", type=int, default=16, help="shard size (about 10 shards for the default --n)")
    p.add_argument("--out", type=Path, help="a JSON file; each run is added under --label")
    p.add_argument("--label", default="run", help="this run's name in --out")
    opts = p.parse_args()
    SHARD_BYTES[0] = opts.shard_mb << 20
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    results: Dict = {
        "date": datetime.date.today().isoformat(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "n": opts.n,
        "versions": {m: importlib.metadata.version(m) for m in ("litdata", "webdataset", "torch", OPENCV)},
        "order": opts.libraries,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        items = _items(tmp, opts.n)
        for name in opts.libraries:
            write, make_loader = LIBRARIES[name]
            shards = tmp / name
            start = time.perf_counter()
            write(items, shards)
            row: Dict = {"write_s": round(time.perf_counter() - start, 2)}
            row["shard_mb"] = round(sum(f.stat().st_size for f in shards.rglob("*") if f.is_file()) / 2**20, 1)
            for w in opts.workers:
                rate = read_rate(make_loader, shards, w)
                row[f"read_img_s_{w}w"] = round(rate, 1)
                row[f"per_worker_img_s_{w}w"] = round(rate / w, 1)
            row["exact_resume"] = exact_resume(name, shards)
            row["two_ranks"] = two_ranks(name, shards, opts.n)
            results[name] = row
            print(name, json.dumps(row), flush=True)
    if opts.out:
        runs = json.loads(opts.out.read_text()) if opts.out.exists() else {}
        runs[opts.label] = results
        opts.out.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
