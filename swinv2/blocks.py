"""Swin Transformer V2 building blocks: window partitioning, the post-norm block, patch merging, a stage.

Module and parameter names follow microsoft/Swin-Transformer `models/swin_transformer_v2.py`; feature maps
travel as NHWC (B, H, W, C) between blocks, as in timm, so non-square and padded inputs need no bookkeeping.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from torch.utils.checkpoint import checkpoint

from swinv2.attention import WindowAttention

# Official: logits between tokens of different shifted regions get -100 (not -inf, which NaNs empty rows).
SHIFT_MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window_size: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, Wh*Ww, C), windows of one image contiguous and in row-major order."""
    b, h, w, c = x.shape
    wh, ww = window_size
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)  # (B, H/Wh, W/Ww, Wh, Ww, C)
    return x.reshape(-1, wh * ww, c)


def window_reverse(windows: torch.Tensor, window_size: Tuple[int, int], h: int, w: int) -> torch.Tensor:
    """(B*nW, Wh*Ww, C) -> (B, H, W, C), the inverse of `window_partition`."""
    wh, ww = window_size
    c = windows.shape[-1]
    x = windows.view(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)  # (B, H/Wh, Wh, W/Ww, Ww, C)
    return x.reshape(-1, h, w, c)


def shift_attention_mask(
    h: int, w: int, window_size: Tuple[int, int], shift_size: Tuple[int, int], device: Optional[torch.device] = None
) -> torch.Tensor:
    """Additive mask for shifted-window attention on a (padded) H x W map.

    After the cyclic shift, a window can hold tokens from up to 4 regions that were not adjacent in the image;
    tokens of different regions must not attend to each other.

    Returns:
        Float tensor (nW, N, N): 0 within a region, -100 across regions.
    """
    region = torch.zeros(1, h, w, 1, device=device)
    label = 0
    for hs in ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None)):
        for ws in ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None)):
            region[:, hs[0] : hs[1], ws[0] : ws[1], :] = label
            label += 1
    region = window_partition(region, window_size).squeeze(-1)  # (nW, N)
    diff = region.unsqueeze(1) - region.unsqueeze(2)  # (nW, N, N)
    return torch.zeros_like(diff).masked_fill(diff != 0, SHIFT_MASK_VALUE)


def clamp_window(
    resolution: Tuple[int, int], window_size: Tuple[int, int], shift: bool
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Window and shift for a stage: where the map is no larger than the window, the window becomes the map
    and that axis is not shifted (official code; per axis as in timm, so non-square maps keep their windows).
    """
    window = tuple(min(r, w) for r, w in zip(resolution, window_size))
    shift_size = tuple(0 if (r <= w or not shift) else w // 2 for r, w in zip(resolution, window_size))
    return window, shift_size


class Mlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinTransformerBlock(nn.Module):
    """Residual post-norm block: `x = x + DropPath(LN(WindowAttn(x)))`, `x = x + DropPath(LN(MLP(x)))`.

    Args:
        dim: Channels C.
        input_resolution: Feature map (H, W) the block is built for; other sizes are accepted at run time.
        num_heads: Attention heads.
        window_size: Target window (Wh, Ww), clamped to the resolution.
        shift: Whether this is a shifted-window block (odd blocks in a stage).
        mlp_ratio: MLP hidden size / C.
        extra_norm: Apply a LayerNorm to the main branch after the block (SwinV2-H/G, every 6 blocks).
        **attn_kwargs: qkv_bias, attn_drop, pretrained_window_size, position_bias, fused, chunk_size.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: Tuple[int, int],
        num_heads: int,
        window_size: Tuple[int, int] = (7, 7),
        shift: bool = False,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        extra_norm: bool = False,
        **attn_kwargs,
    ) -> None:
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.window_size, self.shift_size = clamp_window(self.input_resolution, window_size, shift)
        self.attn = WindowAttention(dim, self.window_size, num_heads, proj_drop=drop, **attn_kwargs)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm3 = nn.LayerNorm(dim) if extra_norm else nn.Identity()
        if any(self.shift_size):
            hp, wp = self._padded(*self.input_resolution)
            self.register_buffer("attn_mask", shift_attention_mask(hp, wp, self.window_size, self.shift_size))
        else:
            self.attn_mask = None

    def _padded(self, h: int, w: int) -> Tuple[int, int]:
        wh, ww = self.window_size
        return -(-h // wh) * wh, -(-w // ww) * ww

    def _shift_mask(self, hp: int, wp: int, device: torch.device) -> Optional[torch.Tensor]:
        if self.attn_mask is None:
            return None
        if (hp, wp) == self._padded(*self.input_resolution):
            return self.attn_mask  # the registered buffer, for the size the block was built for
        return shift_attention_mask(hp, wp, self.window_size, self.shift_size, device)

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cyclic shift, pad to whole windows, attend per window, undo. (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        sh, sw = self.shift_size
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        hp, wp = self._padded(h, w)
        if (hp, wp) != (h, w):
            x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))  # zero padding at the bottom/right, as timm
        windows = self.attn(window_partition(x, self.window_size), self._shift_mask(hp, wp, x.device))
        x = window_reverse(windows, self.window_size, hp, wp)  # (B, Hp, Wp, C)
        if (hp, wp) != (h, w):
            x = x[:, :h, :w]
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        x = x + self.drop_path(self.norm1(self.window_attention(x)))
        x = x + self.drop_path(self.norm2(self.mlp(x)))
        return self.norm3(x)


class PatchMerging(nn.Module):
    """SwinV2 patch merging: concatenate 2x2 neighbours, Linear(4C, 2C, no bias), then LayerNorm(2C) (V1 normalised
    the 4C channels before the reduction; V2 moves the norm after it, like the post-norm blocks)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    @staticmethod
    def merge(x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C), each 2x2 neighbourhood concatenated; odd sizes are
        zero-padded."""
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h, w = x.shape[1:3]
        # Official channel order [x(0,0), x(1,0), x(0,1), x(1,1)]: row offset varies fastest.
        return x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        return self.norm(self.reduction(self.merge(x)))


class BasicLayer(nn.Module):
    """One stage: `depth` blocks alternating regular and shifted windows, then an optional PatchMerging.

    Args:
        dim: Channels of this stage.
        input_resolution: Feature map (H, W) of this stage.
        depth: Number of blocks.
        drop_path: Stochastic depth rate of each block.
        downsample: Merge patches at the end of the stage (official layout: stages 0 to N-2).
        use_checkpoint: Non-reentrant activation checkpointing of each block while training.
        extra_norm_period: Main-branch LayerNorm after every `extra_norm_period`-th block of the stage (0: none).
        **block_kwargs: Forwarded to `SwinTransformerBlock`.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: Tuple[int, int],
        depth: int,
        drop_path: Sequence[float],
        downsample: bool = False,
        use_checkpoint: bool = False,
        extra_norm_period: int = 0,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        blocks: List[SwinTransformerBlock] = []
        for j in range(depth):
            extra = extra_norm_period > 0 and (j + 1) % extra_norm_period == 0
            blocks.append(
                SwinTransformerBlock(
                    dim,
                    input_resolution,
                    shift=j % 2 == 1,
                    drop_path=drop_path[j],
                    extra_norm=extra,
                    **block_kwargs,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C), or (B, H/2, W/2, 2C) with downsampling."""
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x if self.downsample is None else self.downsample(x)
