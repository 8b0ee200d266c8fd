"""`python -m swinv2`: list the variants, then run a short masked-encoding demo on CPU.

python -m swinv2                      # variant table + demo with swinv2_tiny at 192 px, window 12
python -m swinv2 --model swinv2_base --img-size 256 --window 16
"""

from __future__ import annotations

import argparse
import time

import torch

import swinv2


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m swinv2", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="swinv2_tiny", choices=sorted(swinv2.VARIANTS))
    p.add_argument("--img-size", type=int, default=192)
    p.add_argument("--window", type=int, default=12)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args(argv)

    print("| variant | embed dim | depths | heads | params (1000 classes) |")
    print("|---|---|---|---|---|")
    for name, cfg in swinv2.VARIANTS.items():
        with torch.device("meta"):
            n = sum(q.numel() for q in swinv2.create_model(name).parameters())
        print(f"| {name} | {cfg['embed_dim']} | {cfg['depths']} | {cfg['num_heads']} | {n / 1e6:.1f}M |")

    model = swinv2.create_model(args.model, img_size=args.img_size, window_size=args.window, mask_token=True)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    grid = args.img_size // model.patch_size
    mask = torch.rand(args.batch, grid, grid) < 0.6  # SimMIM-style: 60% of the patches replaced by the mask token
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.forward_features(x, mask)
    feats.float().mean().backward()
    print(
        f"\n{args.model} @ {args.img_size}px, windows per stage {[w[0] for w in model.window_sizes]}: "
        f"features {tuple(feats.shape)} (NHWC), forward+backward of {args.batch} images in bf16 autocast "
        f"took {time.perf_counter() - t0:.2f}s"
    )
    print("encoder_stride", model.encoder_stride, "| num_features", model.num_features)


if __name__ == "__main__":
    main()
