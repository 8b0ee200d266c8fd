"""Built-in default data: scikit-learn's 1,797 handwritten digits (8x8, shipped with the package, no network),
written as an ImageFolder tree of 64x64 PNGs `<root>/<digit>/<index>.png`, so they carry labels for fine-tuning.
"""

from __future__ import annotations

import os
from pathlib import Path

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
