"""Built-in data, made from what the dependencies ship (no network): scikit-learn's 1,797 handwritten digits (8x8),
written as an ImageFolder tree of 64x64 PNGs `<root>/<digit>/<index>.png` so they carry labels for fine-tuning
(`prepare_digits`, the default data), and the payoff benchmark's 64 px crops of 16 sample photographs
(`prepare_photos`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

DEFAULT_DIGITS_ROOT = Path("data/digits/prepared")


def prepare_digits(root: str | os.PathLike = DEFAULT_DIGITS_ROOT, size: int = 64) -> Path:
    """Write the digits once; later calls find the finished folder and return at once."""
    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        pixels = (255 - img * (255.0 / 16.0)).astype(np.uint8)  # dark ink on white, as the digits were scanned
        big = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_CUBIC)
        out = root / str(label) / f"{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), big)
    done.write_text(f"{len(digits.images)} images\n")
    return root


DEFAULT_PHOTOS_ROOT = Path("data/photos/prepared")

# Photographs the installed packages ship (scikit-image's sample data, scikit-learn's and matplotlib's sample
# images): one class per photograph. Synthetic images (logos, charts, phantoms) and the retina scan (mostly black
# border) are left out.
PHOTOS = {
    "astronaut": ("skimage", "astronaut.png"),
    "brick": ("skimage", "brick.png"),
    "camera": ("skimage", "camera.png"),
    "chelsea": ("skimage", "chelsea.png"),
    "coffee": ("skimage", "coffee.png"),
    "coins": ("skimage", "coins.png"),
    "grass": ("skimage", "grass.png"),
    "gravel": ("skimage", "gravel.png"),
    "hubble": ("skimage", "hubble_deep_field.jpg"),
    "ihc": ("skimage", "ihc.png"),
    "moon": ("skimage", "moon.png"),
    "motorcycle": ("skimage", "motorcycle_left.png"),
    "rocket": ("skimage", "rocket.jpg"),
    "china": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
    "grace_hopper": ("matplotlib", "grace_hopper.jpg"),
}
_PHOTO_FOLDERS = {"skimage": ("data",), "sklearn": ("datasets", "images"), "matplotlib": ("mpl-data", "sample_data")}


def labelled_root(root: Optional[str]) -> str:
    """An evaluation tool's `--data.root`: `root` as given, or the built-in digits (written first if needed)."""
    return str(root) if root is not None else str(prepare_digits())


def _photo(package: str, name: str) -> np.ndarray:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the natural-image benchmark cuts its crops from {package}'s sample photos: pip install -r "
            "requirements.txt (scikit-image, scikit-learn and matplotlib ship them)"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *_PHOTO_FOLDERS[package], name)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)  # gray photographs become three equal channels
    if img is None:
        raise FileNotFoundError(f"{path}: sample photo missing or unreadable (reinstall {package})")
    return img


def crop_boxes(shape, grid: int, index: int, train_per_tile: int, val_per_tile: int, rng: np.random.Generator):
    """(split, top, left, side) of every square crop of an image of `shape` (H, W): a `grid` x `grid` grid of tiles,
    in row r the tile of column (2r + index) mod grid held out ("val"), the others "train"; each crop lies inside
    one tile, its side from half to the whole of the tile's short side."""
    th, tw = shape[0] // grid, shape[1] // grid
    for row in range(grid):
        held_out = (row * 2 + index) % grid
        for col in range(grid):
            split = "val" if col == held_out else "train"
            for _ in range(val_per_tile if split == "val" else train_per_tile):
                side = int(rng.integers(min(th, tw) // 2, min(th, tw) + 1))
                top, left = int(rng.integers(0, th - side + 1)), int(rng.integers(0, tw - side + 1))
                yield split, row * th + top, col * tw + left, side


def prepare_photos(
    root: str | os.PathLike = DEFAULT_PHOTOS_ROOT,
    size: int = 64,
    short_side: int = 384,
    grid: int = 4,
    train_crops_per_tile: int = 8,
    val_crops_per_tile: int = 5,
    seed: int = 0,
) -> Path:
    """Natural-image crops with held-out regions: `root/train/<photo>/*.png` and `root/val/<photo>/*.png`.

    Each photograph is resized to a short side of `short_side` and cut into a `grid` x `grid` grid of tiles; one
    tile per row (a different column in each row) is held out. Crops of half to the whole tile's short side, at a
    random place inside one tile, are resized to `size`: training crops come from the other tiles, so no validation
    crop shares a pixel with a training crop. With the defaults: 16 classes, 1,536 training and 320 validation crops.
    Later calls find the finished folder and return at once.
    """
    root = Path(root)
    done = root / ".complete"
    settings = (
        f"size={size} short_side={short_side} grid={grid} crops={train_crops_per_tile}/{val_crops_per_tile} seed={seed}"
    )
    if done.exists():
        if settings not in done.read_text():
            raise FileExistsError(
                f"{root} holds crops made with other settings ({done.read_text().strip()}; asked: {settings}): "
                "delete the folder or give another root"
            )
        return root
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for index, (label, (package, name)) in enumerate(sorted(PHOTOS.items())):
        img = _photo(package, name)
        h, w = img.shape[:2]
        scale = short_side / min(h, w)
        img = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        for split, top, left, side in crop_boxes(
            img.shape[:2], grid, index, train_crops_per_tile, val_crops_per_tile, rng
        ):
            crop = cv2.resize(img[top : top + side, left : left + side], (size, size), interpolation=cv2.INTER_LINEAR)
            out = root / split / label / f"{counts[split]:05d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out), crop)
            counts[split] += 1
    done.write_text(f"{len(PHOTOS)} classes, {counts['train']} train / {counts['val']} val crops; {settings}\n")
    return root
