"""Data pipeline speed: our pretraining and fine-tuning pipelines against torchvision's and timm's.

    python benchmarks/dataloader.py                               # 128 synthetic JPEGs of 500x375 and 375x500
    python benchmarks/dataloader.py --images DIR                  # your own images instead
    python benchmarks/dataloader.py --workers 2 8 --out benchmarks/results/dataloader_cpu.md

Pretraining: decode, RandomResizedCrop(192, scale 0.67-1, ratio 3/4-4/3), horizontal flip, normalise, and the SimMIM
mask (ratio 0.6, 32 px mask patches). Ours is `MaskedImageDataset` as training uses it (seeded per sample); it hands
uint8 to the training device, which normalises (timed separately), and "ours before" is the pipeline as it was. The
torchvision pipeline is `torchvision.io.decode_image` then `transforms.v2` (RandomResizedCrop, RandomHorizontalFlip,
ToDtype, Normalize) and the same mask generator; twice: with torchvision's default antialiased resize, and with
`antialias=False`, the plain bilinear resize that ours (OpenCV `INTER_LINEAR`) does.

Fine-tuning: ours is `LabelledImageDataset` with the official training transform at 224 px (timm's pipeline with
the official SwinV2 fine-tuning arguments, on our OpenCV decode, each sample seeded); timm's is `create_transform`
with the same arguments (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 in pixel mode, bicubic, color jitter
0.4, which timm leaves off beside RandAugment) on a PIL decode, as timm's own `ImageDataset` reads images.

Two measurements:
- **Per worker**: what one loader worker does, in this process with one thread (torch and OpenCV): read every image
  and collate them in batches. The pipelines take turns pass by pass; img/s is the median pass, the ratio the median
  of per-pass ratios (paired, so that drift of a shared machine cancels).
- **Loader**: a `DataLoader` with W workers and batch 32 (ours: the training loader `make_loader` builds), images/s
  over `--epochs` epochs after one warm-up epoch; with `--pin_memory` the batches are pinned as on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, default_collate  # noqa: E402

from simmim.data.images import list_images, normalize_images  # noqa: E402
from simmim.data.loaders import IMAGENET_MEAN, IMAGENET_STD, collate_readable, make_loader  # noqa: E402
from simmim.data.pixels import RGB8  # noqa: E402
from simmim.finetune.augment import classification_transform  # noqa: E402
from simmim.finetune.data import LabelledImageDataset  # noqa: E402
from simmim.pretrain.augment import PretrainTransform  # noqa: E402
from simmim.pretrain.data import MaskedImageDataset  # noqa: E402
from simmim.pretrain.masking import MaskGenerator  # noqa: E402
from simmim.seeding import sample_generators  # noqa: E402


def make_jpegs(folder: Path, count: int, seed: int = 0) -> List[Path]:
    """`count` photo-like JPEGs (quality 90) of ImageNet's typical sizes, 500x375 and 375x500: smooth colour fields,
    mid-frequency structure and grain, so that the files (about 85 KB) take a photo's decoding work."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        h, w = (375, 500) if i % 3 else (500, 375)
        base = rng.uniform(0, 255, (h // 16, w // 16, 3)).astype(np.float32)
        mid = rng.normal(0, 40, (h // 4, w // 4, 3)).astype(np.float32)
        img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC) + cv2.resize(mid, (w, h))
        img = np.clip(img + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        files.append(path)
    return files


class TorchvisionPretrain(Dataset):
    """The pretraining pipeline in torchvision: `decode_image`, `transforms.v2`, and our mask generator."""

    def __init__(self, files: Sequence[Path], size: int, mask_generator: MaskGenerator, antialias: bool) -> None:
        from torchvision.transforms import v2

        self.files, self.mask_generator = files, mask_generator
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3), antialias=antialias),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from torchvision.io import ImageReadMode, decode_image, read_file

        img = decode_image(read_file(str(self.files[i])), mode=ImageReadMode.RGB)
        mask = self.mask_generator(np.random.default_rng(i))
        return self.transform(img), torch.from_numpy(mask)


class DecodeOnly(Dataset):
    """A JPEG decode alone, as a pipeline reads a file: OpenCV's (ours) or torchvision's `decode_image` in RGB mode
    (theirs); both are libjpeg-turbo. The work a pipeline cannot shed, and the floor under every ratio."""

    def __init__(self, files: Sequence[Path], torchvision: bool) -> None:
        self.files, self.torchvision = files, torchvision

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        if self.torchvision:
            from torchvision.io import ImageReadMode, decode_image, read_file

            return torch.tensor(decode_image(read_file(str(self.files[i])), mode=ImageReadMode.RGB).shape[1])
        img = cv2.imdecode(np.fromfile(self.files[i], dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        return torch.tensor(img.shape[0])


class PreviousPretrain(Dataset):
    """Our pretraining pipeline as it was before it was made fast, kept to measure the change: every image through
    float32 and back after decoding, albumentations' RandomResizedCrop, HorizontalFlip and Normalize, and an
    (H, W, 3) array handed to the collate as a permuted view."""

    def __init__(self, files: Sequence[Path], size: int, mask_generator: MaskGenerator) -> None:
        import albumentations as A

        self.files, self.mask_generator = files, mask_generator
        self.transform = A.Compose(
            [
                A.RandomResizedCrop(size=(size, size), scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)),
                A.HorizontalFlip(p=0.5),
                A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key):
        i, seed = key
        img = cv2.imdecode(np.fromfile(self.files[i], dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        img = img.astype(np.float32) / 255.0  # the former `to_uint8_rgb` of an 8-bit colour image
        img = np.ascontiguousarray(np.clip(img[:, :, ::-1] * 255.0 + 0.5, 0, 255).astype(np.uint8))
        augment_rng, py_rng, mask_rng = sample_generators(seed)
        self.transform.set_random_state(augment_rng, py_rng)
        x = torch.from_numpy(self.transform(image=img)["image"]).permute(2, 0, 1)
        return x, torch.from_numpy(self.mask_generator(mask_rng)), ()


class TimmFinetune(Dataset):
    """timm's training transform for the official SwinV2 fine-tuning recipe, on a PIL decode."""

    def __init__(self, files: Sequence[Path], size: int) -> None:
        from timm.data import create_transform

        self.files, self.redraws = files, 0
        self.transform = create_transform(
            size,
            is_training=True,
            scale=(0.08, 1.0),
            color_jitter=0.4,
            auto_augment="rand-m9-mstd0.5-inc1",
            interpolation="bicubic",
            re_prob=0.25,
            re_mode="pixel",
            re_count=1,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            img = img.convert("RGB")
        for _ in range(10):
            try:
                return self.transform(img), 0
            except ValueError:  # RandAugment's posterize to 0 bits (magnitude 10), which Pillow 13 refuses: redraw
                self.redraws += 1
        raise RuntimeError("timm's transform failed 10 times in a row")


def pipelines(files: List[Path], stage: str) -> Dict[str, Dataset]:
    """The datasets to compare for one stage, ours first (the reference of every ratio)."""
    if stage == "pretrain":
        masks = MaskGenerator(192, 32, 4, 0.6)
        return {
            "ours": MaskedImageDataset(files, PretrainTransform(192, True), masks, True, fmt=RGB8),
            "ours before (float decode, albumentations)": PreviousPretrain(files, 192, masks),
            "torchvision v2": TorchvisionPretrain(files, 192, masks, antialias=True),
            "torchvision v2, antialias=False": TorchvisionPretrain(files, 192, masks, antialias=False),
            DECODE: DecodeOnly(files, torchvision=False),
            TV_DECODE: DecodeOnly(files, torchvision=True),
        }
    tfm = classification_transform("official", 224, True, IMAGENET_MEAN, IMAGENET_STD, 0.25)
    return {
        "ours": LabelledImageDataset(files, [0] * len(files), tfm, refill=True),
        "timm create_transform": TimmFinetune(files, 224),
    }


DECODE = "OpenCV's decode alone, as ours reads (not a pipeline)"
TV_DECODE = "torchvision's decode alone, as its pipelines read (not a pipeline)"


def sample_keys(n: int, seed: int = 0) -> List:
    """Training keys `(index, sample seed)` as `SeededSampler` gives them; plain indices serve the peers."""
    return [(i, seed * n + i) for i in range(n)]


def collate_of(name: str, ds: Dataset) -> Callable:
    """The collate a training loader uses: ours (`collate_readable`) or PyTorch's default."""
    if name.startswith("ours"):
        return partial(collate_readable, num_fields=2 if isinstance(ds, MaskedImageDataset) else 3)
    return default_collate


def per_worker(datasets: Dict[str, Dataset], passes: int, batch: int) -> Dict[str, Dict[str, float]]:
    """One thread, as in one loader worker: read every image and collate them in batches, the pipelines taking turns
    pass by pass. img/s of the median pass, and the median per-pass ratio of each pipeline's time to ours."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    n = len(next(iter(datasets.values())))
    batches = [range(i, min(i + batch, n)) for i in range(0, n, batch)]

    def one_pass(name: str, ds: Dataset) -> None:
        collate = collate_of(name, ds)
        for b in batches:
            collate([ds[(i, i)] if name.startswith("ours") else ds[i] for i in b])

    for name, ds in datasets.items():  # warm-up: imports, first calls, the page cache
        one_pass(name, ds)
    times: Dict[str, List[float]] = {name: [] for name in datasets}
    for _ in range(passes):
        for name, ds in datasets.items():
            t0 = time.perf_counter()
            one_pass(name, ds)
            times[name].append(time.perf_counter() - t0)
    return {
        name: {
            "img_s": n / statistics.median(t),
            "ms": statistics.median(t) / n * 1e3,
            "ours_speedup": statistics.median(a / b for a, b in zip(t, times["ours"])),
        }
        for name, t in times.items()
    }


def normalize_ms(batch: int, repeats: int = 20) -> float:
    """Milliseconds per image of `normalize_images` on a uint8 batch of 192 px, on this CPU (median of repeats)."""
    x = torch.randint(0, 256, (batch, 3, 192, 192), dtype=torch.uint8)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        normalize_images(x, IMAGENET_MEAN, IMAGENET_STD)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / batch * 1e3


def loader_speed(name: str, ds: Dataset, workers: int, batch: int, epochs: int, pin: bool) -> float:
    """Images/s of a DataLoader over `ds` (ours: the training loader of `make_loader`)."""
    if name.startswith("ours"):
        loader = make_loader(ds, batch, workers, True, collate_of(name, ds))
    else:
        loader = DataLoader(
            ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
        )
    loader.pin_memory = pin
    images = 0
    for _ in loader:  # warm-up epoch: starts the workers
        pass
    t0 = time.perf_counter()
    for _ in range(epochs):
        for b in loader:
            images += len(b[0])
    return images / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="a folder of images (default: synthetic JPEGs)")
    p.add_argument("--count", type=int, default=128, help="synthetic JPEGs to make")
    p.add_argument("--stages", nargs="+", default=["pretrain", "finetune"], choices=["pretrain", "finetune"])
    p.add_argument("--passes", type=int, default=5, help="per-worker passes over the images, per pipeline")
    p.add_argument("--workers", type=int, nargs="*", default=[2], help="DataLoader worker counts (none: skip)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3, help="timed loader epochs")
    p.add_argument("--pin_memory", action="store_true", default=torch.cuda.is_available())
    p.add_argument("--out", help="also write the tables to this Markdown file")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            files = list_images(args.images)
            source = f"{len(files)} images from {args.images}"
        else:
            files = make_jpegs(Path(tmp), args.count)
            kb = statistics.mean(f.stat().st_size for f in files) / 1024
            source = f"{len(files)} synthetic JPEGs, 500x375 and 375x500, quality 90, {kb:.0f} KB on average"
        if args.workers and len(files) < args.batch:
            p.error(f"{len(files)} images make no full batch of --batch {args.batch}: lower --batch or add images")
        import albumentations
        import timm
        import torchvision

        lines = [
            f"# Data pipeline speed ({', '.join(args.stages)})",
            "",
            f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"timm {timm.__version__}, "
            f"albumentations {albumentations.__version__}, OpenCV {cv2.__version__}; {source}",
            f"`python benchmarks/dataloader.py {' '.join(sys.argv[1:])}`",
            "",
        ]
        printed = 0
        for stage in args.stages:
            datasets = pipelines(files, stage)
            lines += [f"## {stage}: per worker (one thread, {args.passes} passes)", ""]
            lines += ["| pipeline | img/s | ms/img | ours is faster by |", "|---|---|---|---|"]
            results = per_worker(datasets, args.passes, args.batch)
            for name, r in results.items():
                lines.append(f"| {name} | {r['img_s']:.0f} | {r['ms']:.2f} | {r['ours_speedup']:.2f}x |")
            if stage == "pretrain":
                norm_ms = normalize_ms(args.batch)
                with_norm = results["ours"]["ms"] + norm_ms
                ratios = ", ".join(
                    f"{results[name]['ms'] / with_norm:.2f}x {name}"
                    for name in results
                    if name.startswith("torchvision v2")
                )
                ours_rest = results["ours"]["ms"] - results[DECODE]["ms"]
                tv_rest = {name: results[name]["ms"] - results[TV_DECODE]["ms"] for name in results
                           if name.startswith("torchvision v2")}  # fmt: skip
                beyond = ", ".join(
                    f"{name} {rest:.2f} ms ({rest / ours_rest:.2f}x ours)" for name, rest in tv_rest.items()
                )
                lines += [
                    "",
                    f"Ours stops at uint8 and the training device normalises. Timed on this CPU with one thread for "
                    f"a batch of {args.batch}, that adds {norm_ms:.3f} ms per image; counted into ours "
                    f"({with_norm:.2f} ms/img), the ratios of median times are {ratios}.",
                    "",
                    f"The decodes alone take {results[DECODE]['ms']:.2f} ms/img (OpenCV, "
                    f"{results[DECODE]['ms'] / results['ours']['ms']:.0%} of ours) and {results[TV_DECODE]['ms']:.2f} "
                    f"ms/img (torchvision). Beyond its own decode, from the medians above, per image: ours "
                    f"{ours_rest:.2f} ms, {beyond}.",
                ]
            lines.append("")
            if args.workers:
                torch.set_num_threads(max(1, (os.cpu_count() or 1)))
                cv2.setNumThreads(-1)
                head = " | ".join(f"{w} workers" for w in args.workers)
                lines += [f"## {stage}: DataLoader, batch {args.batch}, img/s (pin_memory={args.pin_memory})", ""]
                lines += [f"| pipeline | {head} |", "|---|" + "---|" * len(args.workers)]
                for name, ds in datasets.items():
                    if name in (DECODE, TV_DECODE):
                        continue  # not pipelines: timed per worker only
                    speeds = [loader_speed(name, ds, w, args.batch, args.epochs, args.pin_memory) for w in args.workers]
                    lines.append(f"| {name} | " + " | ".join(f"{s:.0f}" for s in speeds) + " |")
                lines.append("")
            print("\n".join(lines[printed:]), flush=True)
            printed = len(lines)
    text = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
