"""SimMIM random masking (Xie et al., "SimMIM", CVPR 2022, Sec. 3.1; official `MaskGenerator`)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from timm.layers import to_2tuple

from swinv2.model import IntOrPair


class MaskGenerator:
    """Random mask over large "mask patches", upsampled to the model's patch grid.

    Exactly `ceil(n * mask_ratio)` of the n mask patches are masked, chosen uniformly without replacement.
    The official recipe: input 192, mask patch 32, model patch 4, ratio 0.6 -> 22 of 36 patches, a 48x48 mask.

    Args:
        input_size: Image size, int or (H, W).
        mask_patch_size: Side of the square masked unit, in pixels.
        model_patch_size: The encoder's patch size, in pixels.
        mask_ratio: Fraction of mask patches to mask, in (0, 1).
    """

    def __init__(
        self,
        input_size: IntOrPair = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
    ) -> None:
        self.input_size = to_2tuple(input_size)
        for side in self.input_size:
            if side % mask_patch_size:
                raise ValueError(f"input size {self.input_size} is not divisible by mask_patch_size {mask_patch_size}")
        if mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size {mask_patch_size} is not divisible by model_patch_size {model_patch_size}"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.grid = tuple(s // mask_patch_size for s in self.input_size)  # mask patches per side
        self.scale = mask_patch_size // model_patch_size  # model patches per mask patch side
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = math.ceil(self.num_patches * mask_ratio)

    def __call__(self, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """Returns: uint8 mask (H / model_patch, W / model_patch), 1 = masked. `rng` defaults to numpy's global."""
        rng = rng if rng is not None else np.random.default_rng(np.random.randint(0, 2**31))
        flat = np.zeros(self.num_patches, dtype=np.uint8)
        flat[rng.choice(self.num_patches, self.num_masked, replace=False)] = 1
        mask = flat.reshape(self.grid)
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
