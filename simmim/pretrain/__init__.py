"""Stage 1: SimMIM pretraining of a SwinV2 encoder. The method is `masking` (random patch masks) and `model` (mask
token in, linear decoder out, L1 on the masked pixels); around it `augment` (crop and flip), `data`, `module` (the
LightningModule), `callbacks` (reconstruction grids), `reconstruct` (the viewer) and `cli`.

`main(args)` is the command line (`python -m simmim.pretrain`), callable from Python with a list of arguments.
"""

from simmim.pretrain.cli import main

__all__ = ["main"]
