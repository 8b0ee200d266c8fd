"""Reconstruction viewer: `python -m simmim.reconstruct --checkpoint last.ckpt --images DIR --out grid.png`.

Masks images of a folder as pretraining does and writes a grid of original, masked input, reconstruction and the
reconstruction pasted into the visible pixels, one row per image, from a pretraining checkpoint (the decoder is
in the `.ckpt`, not in the encoder export). The image size, mask patch size and mask ratio come from the run's
`config.yaml` beside its `checkpoints/` folder when it is there (flags override them); the normalisation is the
checkpoint's own (`--model.mean`, `--model.std`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from torchvision.utils import save_image

from simmim.checkpointing.untrusted import checked_hyperparameters, read_run_config
from simmim.data.images import decode_item
from simmim.data.shards import open_images
from simmim.errors import ConfigError
from simmim.monitors import ResizeCenterCrop
from simmim.pretrain.callbacks import reconstruction_grid
from simmim.pretrain.data import PretrainDataModule
from simmim.pretrain.masking import MaskGenerator
from simmim.pretrain.module import SimMIMPretrainer
from swinv2.reading import read_checkpoint


def run_config(checkpoint: Path) -> dict:
    """The `data` section of the run's saved config (`<run>/config.yaml`), checked as untrusted input
    (`simmim.checkpointing.untrusted.read_run_config`), or {} without one."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            sections = {"data": PretrainDataModule, "model": SimMIMPretrainer}
            return read_run_config(folder / "config.yaml", sections)["data"]
    return {}


def load_pretrainer(checkpoint: Path) -> SimMIMPretrainer:
    """The pretraining module of a Lightning checkpoint, read without running pickled code, its hyper-parameters
    checked (`simmim.checkpointing.untrusted.checked_hyperparameters`) before the module is built from them."""
    raw = read_checkpoint(checkpoint)
    if "state_dict" not in raw or "hyper_parameters" not in raw:
        raise ConfigError(
            f"--checkpoint {checkpoint}: not a pretraining checkpoint (entries {sorted(raw)[:6]}); the viewer needs "
            "the decoder, which is in the run's checkpoints/*.ckpt, not in encoder.safetensors"
        )
    hp = checked_hyperparameters(raw["hyper_parameters"], SimMIMPretrainer, str(checkpoint))
    hp.update(compile_attention=False, knn_every_n_epochs=0, finetune_every_n_epochs=0)
    module = SimMIMPretrainer(**hp)
    module.load_state_dict(raw["state_dict"])
    return module.eval()


def spread(files: Sequence[str], n: int) -> Sequence[str]:
    """`n` files spread evenly over the sorted list (class folders all get a turn), or all of them."""
    if len(files) <= n:
        return files
    return [files[round(i * (len(files) - 1) / (n - 1))] for i in range(n)] if n > 1 else files[:1]


def parse(args: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simmim.reconstruct", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a pretraining checkpoint (.ckpt)")
    p.add_argument("--images", required=True, help="a folder of images (searched recursively), or shards")
    p.add_argument("--out", default="reconstructions.png", help="the PNG grid to write")
    p.add_argument("--num_images", type=int, default=8)
    p.add_argument("--mask_ratio", type=float, help="default: the run's")
    p.add_argument("--mask_patch_size", type=int, help="default: the run's")
    p.add_argument("--img_size", type=int, help="default: the run's")
    p.add_argument("--seed", type=int, default=0, help="draws the masks")
    return p.parse_args(args)


def main(args: Optional[List[str]] = None) -> torch.Tensor:
    """Writes the grid and returns it ((3, H, W) in 0-1)."""
    opts = parse(args)
    checkpoint = Path(opts.checkpoint)
    data = run_config(checkpoint)
    module = load_pretrainer(checkpoint)
    img_size = opts.img_size or data.get("img_size") or module.hparams.img_size
    mean, std = module.mean, module.std
    try:
        masks = MaskGenerator(
            img_size,
            opts.mask_patch_size or data.get("mask_patch_size", 32),
            module.hparams.patch_size,
            opts.mask_ratio if opts.mask_ratio is not None else data.get("mask_ratio", 0.6),
        )
    except ValueError as e:  # from the options or the run's config.yaml
        raise ConfigError(f"the mask settings do not fit: {e}") from None
    files = spread(open_images(opts.images), opts.num_images)
    if not files:
        raise ConfigError(f"--images {opts.images}: no images found")
    resize = ResizeCenterCrop(img_size, mean, std)
    x = torch.stack([resize(decode_item(f)) for f in files])
    rng = np.random.default_rng(opts.seed)
    mask = torch.from_numpy(np.stack([masks(rng) for _ in files]))
    grid = reconstruction_grid(module.model, x, mask, mean, std)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, opts.out)
    print(f"reconstructions of {len(files)} images from {opts.images} (mask ratio {masks.num_masked}/"
          f"{masks.num_patches} patches): {opts.out}")  # fmt: skip
    return grid
