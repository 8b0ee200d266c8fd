"""Pretraining batches per second per worker from a shard set against the same images in a folder
(`simmim.data.shards`; the figures are in docs/data.md).

Makes `--count` photo-like JPEGs (`dataloader.py`'s: 500x375 and 375x500, about 85 KB), packs them with
`python -m simmim.shard` (64 MB chunks), and times the pretraining data module's training loader (decode, random
resized crop to 192 px, flip, mask; batch 32) over each source:

- `folder`: the image folder (through its file index);
- `shards`: the shard set in a local folder;
- `s3`: the same set in an S3-compatible store, moto's server on the loopback interface (`--s3`; it runs on the same
  cores, so this measures the reading path's overhead, not a network).

For each worker count, every source gets a warm-up epoch (starting its persistent workers), then `--epochs` timed
epochs; the sources take turns, in a rotated order each round (`--rounds`).

    python benchmarks/shard_reading.py --count 2000 --workers 1 2 --rounds 2 \
        --out benchmarks/results/shard_reading_cpu.json

(the committed results have no `s3` row: moto's server, on the same two cores, spent most of them serving ranged
reads, so it measured moto.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from dataloader import make_jpegs  # noqa: E402

from simmim.data import convert  # noqa: E402
from simmim.pretrain.data import PretrainDataModule  # noqa: E402


def _moto(folder: Path) -> tuple:
    """moto's S3 server on a free loopback port with `folder` uploaded; returns (process, s3:// URL)."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    client = boto3.client("s3")
    client.create_bucket(Bucket="bench-shards")
    for path in folder.iterdir():
        if not path.name.startswith("."):
            client.upload_file(str(path), "bench-shards", f"set/{path.name}")
    return server, "s3://bench-shards/set"


def _loader(root: str, workers: int, batch: int):
    dm = PretrainDataModule(
        root, img_size=192, mask_patch_size=32, batch_size=batch, num_workers=workers, val_fraction=0.0
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm.train_dataloader()


def _rate(loader, epochs: int) -> float:
    for _ in loader:  # warm-up: starts the persistent workers
        pass
    images, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _, _ in loader:
            images += len(x)
    return images / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--s3", action="store_true", help="also read the set from moto's S3 server")
    p.add_argument("--out", help="write the figures to this JSON file (and a Markdown table beside it)")
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_jpegs(tmp / "images", a.count)
        start = time.perf_counter()
        convert.main([str(tmp / "images"), str(tmp / "shards"), "--workers", str(os.cpu_count() or 1)])
        convert_s = time.perf_counter() - start
        sources = {"folder": str(tmp / "images"), "shards": str(tmp / "shards")}
        server = None
        if a.s3:
            server, sources["s3"] = _moto(tmp / "shards")
        try:
            rates: Dict[str, Dict[int, List[float]]] = {name: {w: [] for w in a.workers} for name in sources}
            for workers in a.workers:
                for r in range(a.rounds):
                    names = list(sources)[r % len(sources) :] + list(sources)[: r % len(sources)]
                    for name in names:
                        loader = _loader(sources[name], workers, a.batch)
                        rates[name][workers].append(_rate(loader, a.epochs))
                        del loader
                        print(
                            f"{workers} worker(s), round {r}, {name}: {rates[name][workers][-1]:.0f} img/s", flush=True
                        )
        finally:
            if server is not None:
                server.kill()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    result = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "count": a.count,
        "batch": a.batch,
        "convert_s": round(convert_s, 2),
        "img_s": {name: {str(w): [round(x, 1) for x in v] for w, v in by.items()} for name, by in rates.items()},
    }
    rows = ["| source | " + " | ".join(f"{w} worker(s): img/s (per worker)" for w in a.workers) + " |"]
    rows.append("|---|" + "---|" * len(a.workers))
    for name, by in rates.items():
        cells = [", ".join(f"{x:.0f} ({x / w:.0f})" for x in by[w]) for w in a.workers]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    print(table)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        Path(a.out).with_suffix(".md").write_text(
            f"# Pretraining batches from shards and from a folder\n\n{cpu}, {os.cpu_count()} cores, "
            f"{result['date']}; {a.count} photo-like JPEGs, batch {a.batch}, 192 px crops with masks; "
            f"conversion {convert_s:.1f} s. Each cell: one timed epoch per round, in round order.\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
