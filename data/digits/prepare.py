"""Prepare the built-in digits dataset: `python data/digits/prepare.py [--root data/digits/prepared]`.

The pretraining CLI calls the same function on first use when no --data.root is given.
"""

import argparse

from simmim.data.builtin import DEFAULT_DIGITS_ROOT, prepare_digits

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", default=str(DEFAULT_DIGITS_ROOT))
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args()
    print("digits written to", prepare_digits(a.root, a.size))
