"""Prepare the natural-image payoff benchmark's crops: `python data/photos/prepare.py [--root data/photos/prepared]`.

16 classes (one per sample photograph that scikit-image, scikit-learn and matplotlib ship), `train/` and `val/`
crops from disjoint tiles of each photograph (docs/payoff.md). `benchmarks/pretraining_payoff.py` calls the same
function.
"""

import argparse

from simmim.data.builtin import DEFAULT_PHOTOS_ROOT, prepare_photos

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", default=str(DEFAULT_PHOTOS_ROOT))
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args()
    root = prepare_photos(a.root, a.size)
    print("photos written to", root, "-", (root / ".complete").read_text().strip())
