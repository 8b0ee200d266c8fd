"""Reconstruction viewer: `python -m simmim.reconstruct --checkpoint last.ckpt --images DIR --out grid.png`.

Masks images of a folder as pretraining does and writes a grid of original, masked input, reconstruction and the
reconstruction pasted into the visible pixels, one row per image, from a pretraining checkpoint (the decoder is
in the `.ckpt`, not in the encoder export). The image size, mask patch size and mask ratio come from the run's
`config.yaml` beside its `checkpoints/` folder when it is there (flags override them); the normalisation and the
pixel format are the checkpoint's own (`--model.mean`, `--model.std`, its input record). Images that are not 8-bit
RGB show `--bands` (three as red, green, blue, or one as gray; numbered from 1) with a per-band percentile stretch.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.utils import save_image

from simmim.checkpointing.untrusted import checked_hyperparameters, read_run_config, run_folder
from simmim.data.images import decode_item
from simmim.data.pixels import RGB8, PixelFormat
from simmim.data.shards import open_images
from simmim.errors import ConfigError
from simmim.monitors import ResizeCenterCrop
from simmim.pretrain.callbacks import display_bands, reconstruction_grid
from simmim.pretrain.data import PretrainDataModule
from simmim.pretrain.masking import MaskGenerator
from simmim.pretrain.module import SimMIMPretrainer
from swinv2.checkpoint import read_inputs
from swinv2.reading import read_checkpoint


def run_config(checkpoint: Path) -> dict:
    """The `data` section of the run's saved config (`<run>/config.yaml`), checked as untrusted input
    (`simmim.checkpointing.untrusted.read_run_config`), or {} without one."""
    folder = run_folder(checkpoint)
    if folder is None:
        return {}
    return read_run_config(folder / "config.yaml", {"data": PretrainDataModule, "model": SimMIMPretrainer})["data"]


def load_pretrainer(checkpoint: Path) -> Tuple[SimMIMPretrainer, Optional[PixelFormat]]:
    """The pretraining module of a Lightning checkpoint, read without running pickled code, its hyper-parameters
    checked (`simmim.checkpointing.untrusted.checked_hyperparameters`) before the module is built from them; and the
    pixel format its input record names (None: a checkpoint without one, 8-bit RGB)."""
    raw = read_checkpoint(checkpoint)
    if "state_dict" not in raw or "hyper_parameters" not in raw:
        raise ConfigError(
            f"--checkpoint {checkpoint}: not a pretraining checkpoint (entries {sorted(raw)[:6]}); the viewer needs "
            "the decoder, which is in the run's checkpoints/*.ckpt, not in encoder.safetensors"
        )
    hp = checked_hyperparameters(raw["hyper_parameters"], SimMIMPretrainer, str(checkpoint))
    # nothing the file names is read: its weights are the checkpoint's own
    hp.update(compile_attention=False, knn_every_n_epochs=0, finetune_every_n_epochs=0, pretrained=None)
    module = SimMIMPretrainer(**hp)
    module.load_state_dict(raw["state_dict"])
    record = read_inputs(raw, str(checkpoint))
    return module.eval(), None if record is None else PixelFormat(module.channels, record["depth"])


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
    p.add_argument("--bands", help="the bands shown, numbered from 1: three as red, green, blue (4,3,2) or one as gray")
    return p.parse_args(args)


def main(args: Optional[List[str]] = None) -> torch.Tensor:
    """Writes the grid and returns it ((3, H, W) in 0-1)."""
    opts = parse(args)
    checkpoint = Path(opts.checkpoint)
    data = run_config(checkpoint)
    module, fmt = load_pretrainer(checkpoint)
    try:
        bands = None if opts.bands is None else [int(b) for b in opts.bands.split(",")]
    except ValueError:
        raise ConfigError(f"--bands {opts.bands}: give band numbers separated by commas (4,3,2)") from None
    shown = display_bands(module.channels, bands)
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
    resize = ResizeCenterCrop(img_size, mean, std, fmt)
    x = torch.stack([resize(decode_item(f, fmt)) for f in files])
    rng = np.random.default_rng(opts.seed)
    mask = torch.from_numpy(np.stack([masks(rng) for _ in files]))
    grid = reconstruction_grid(module.model, x, mask, mean, std, shown, fmt is not None and fmt != RGB8)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, opts.out)
    print(f"reconstructions of {len(files)} images from {opts.images} (mask ratio {masks.num_masked}/"
          f"{masks.num_patches} patches): {opts.out}")  # fmt: skip
    return grid
