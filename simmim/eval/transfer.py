"""Window and resolution transfer study: `python -m simmim.transfer`.

The SwinV2 paper's comparison of position biases: train a classifier at a small image size and window with each
bias (`table`: Swin V1's parameter table, interpolated to a new window; `linear_cpb`: a small MLP on linear
relative coordinates; `log_cpb`: the same on log-spaced coordinates), then evaluate it at larger images and
windows without further training, and again after a short fine-tune at the larger size. Weights move to the new
window as `swinv2.create_model_from_checkpoint` moves them for every user. A controlled study: every image is
resized and center-cropped, no augmentation, plain PyTorch (AdamW, cosine; `simmim.eval.classify`), on the CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import swinv2
from simmim.data.builtin import labelled_root
from simmim.data.folders import labelled_split
from simmim.errors import ConfigError
from simmim.eval.classify import accuracy, fit, loader

POSITION_BIASES = ("table", "linear_cpb", "log_cpb")


def parse_sizes(values: Sequence[str]) -> List[Tuple[int, int]]:
    """ "SIZE:WINDOW" strings as (size, window) pairs."""
    out = []
    for v in values:
        try:
            size, window = (int(p) for p in v.split(":"))
        except ValueError:
            raise ConfigError(f"--eval {v!r}: expected SIZE:WINDOW, such as 128:8") from None
        out.append((size, window))
    return out


def study(
    root: Optional[str],
    img_size: int,
    window: int,
    targets: Sequence[Tuple[int, int]],
    biases: Sequence[str] = POSITION_BIASES,
    epochs: int = 8,
    finetune_epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 64,
    arch: Optional[Dict] = None,
    seed: int = 0,
) -> Dict[str, Dict[str, float]]:
    """{bias: {column: top-1}} with the columns "SIZE/wWINDOW" (trained there), "SIZE/wWINDOW zero-shot" and
    "SIZE/wWINDOW fine-tuned" for every target."""
    arch = arch or dict(embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
    tf, tl, vf, vl = (split := labelled_split(root, 0.2))[:4]
    classes = split.classes
    results: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bias in biases:
            torch.manual_seed(seed)
            model = swinv2.SwinTransformerV2(
                img_size=img_size, window_size=window, num_classes=len(classes), position_bias=bias, **arch
            )
            fit(model, loader(tf, tl, img_size, batch_size, True, seed), epochs, lr)
            row = {f"{img_size}/w{window}": accuracy(model, loader(vf, vl, img_size, 256, False, seed))}
            path = swinv2.save_weights(Path(tmp) / f"{bias}.safetensors", model)
            for size, win in targets:
                big = swinv2.create_model_from_checkpoint(path, img_size=size, window_size=win)
                val = loader(vf, vl, size, 256, False, seed)
                row[f"{size}/w{win} zero-shot"] = accuracy(big, val)
                torch.manual_seed(seed)
                fit(big, loader(tf, tl, size, batch_size, True, seed), finetune_epochs, lr / 10)
                row[f"{size}/w{win} fine-tuned"] = accuracy(big, val)
            results[bias] = row
    return results


def table(results: Dict[str, Dict[str, float]]) -> str:
    """The results as a Markdown table, one row per position bias."""
    columns = list(next(iter(results.values())))
    lines = ["| position bias | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for bias, row in results.items():
        lines.append(f"| {bias} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)


def main(args: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    p = argparse.ArgumentParser(prog="python -m simmim.transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--data.root", dest="root", help="class folders (train/ and val/, or split 80/20); default: digits")
    p.add_argument("--img_size", type=int, default=64, help="the training size")
    p.add_argument("--window", type=int, default=4, help="the training window")
    p.add_argument("--eval", nargs="+", default=["128:8", "192:12"], help="larger SIZE:WINDOW pairs")
    p.add_argument("--biases", nargs="+", default=list(POSITION_BIASES), choices=POSITION_BIASES)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--finetune_epochs", type=int, default=1, help="at each larger size (LR / 10)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--embed_dim", type=int, default=48)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 2, 2, 2])
    p.add_argument("--num_heads", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table to this Markdown file")
    opts = p.parse_args(args)
    opts.root = labelled_root(opts.root)
    start = time.perf_counter()
    arch = dict(embed_dim=opts.embed_dim, depths=tuple(opts.depths), num_heads=tuple(opts.num_heads))
    results = study(
        opts.root, opts.img_size, opts.window, parse_sizes(opts.eval), opts.biases, opts.epochs,
        opts.finetune_epochs, opts.lr, opts.batch_size, arch, opts.seed,
    )  # fmt: skip
    text = table(results)
    print(text)
    print(f"({opts.epochs} epochs at {opts.img_size}/w{opts.window}, {opts.finetune_epochs} at each larger size; "
          f"{time.perf_counter() - start:.0f} s)")  # fmt: skip
    if opts.out:
        Path(opts.out).write_text(text + "\n")
    return results
