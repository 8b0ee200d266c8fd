"""SimMIM: masked image modeling with a linear decoder and an L1 loss on masked pixels.

Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022. Module names follow the official
checkpoint layout: `encoder.*` (with `encoder.mask_token`) and `decoder.0.*`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Official SimMIM reduction: `sum(|pred - target| * M) / (sum(M) + 1e-5) / C`.

    Args:
        pred, target: (B, C, H, W).
        pixel_mask: (B, 1, H, W), 1 where the pixel was masked.

    Returns:
        Scalar: the mean absolute error per masked pixel and channel.
    """
    per_pixel = (pred - target).abs()  # (B, C, H, W)
    return (per_pixel * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / pred.shape[1]


def _window_sums(x: torch.Tensor, dim: int, radius: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sums of `x` over the 2 * radius + 1 neighbours of each position along `dim`, clipped to the image, as
    differences of a cumulative sum C, written slice by slice (no gather, no concatenation); and how many neighbours
    each sum has. Position i gets C[min(i + radius, L - 1)] - C[i - radius - 1], the second term 0 near the start."""
    length = x.shape[dim]
    cumsum = x.cumsum(dim)
    sums = torch.empty_like(cumsum)
    inside = max(length - radius, 0)  # positions whose window ends inside the image
    if inside:
        sums.narrow(dim, 0, inside).copy_(cumsum.narrow(dim, radius, inside))
    sums.narrow(dim, inside, length - inside).copy_(cumsum.narrow(dim, length - 1, 1))  # the rest: the total
    after = max(length - radius - 1, 0)  # positions whose window starts after the image's start
    sums.narrow(dim, length - after, after).sub_(cumsum.narrow(dim, 0, after))
    i = torch.arange(length, device=x.device)
    count = (i + radius).clamp(max=length - 1) - (i - radius).clamp(min=0) + 1
    return sums, count.to(x.dtype)


def local_stats(x: torch.Tensor, patch_size: int = 47) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel, per-channel mean and std of the `patch_size` x `patch_size` neighbourhood (padding excluded,
    unbiased variance), as the official SwinV2 SimMIM `norm_targets`. Returns (mean, sqrt(var + 1e-6)).

    The official code averages over the square window directly: k^2 additions per pixel, most of a SwinV2-T step on
    a CPU at window 47 (docs/speed.md). The window clipped to the image is a rectangle, so here its sums are taken one
    axis after the other, each as a difference of cumulative sums (a few operations per pixel, whatever k), in
    float64: the same statistics, with less rounding than the official float32 pools. Images are taken a few at a
    time (`_STATS_CHUNK` values each), so the float64 temporaries stay a few tens of MB at any batch size."""
    if patch_size % 2 == 0:
        raise ValueError(f"norm_target_patch_size must be odd, got {patch_size}")
    per_chunk = max(1, _STATS_CHUNK // max(1, x[0].numel()))
    if len(x) > per_chunk:
        means, stds = zip(*(_local_stats(c, patch_size) for c in x.split(per_chunk)))
        return torch.cat(means), torch.cat(stds)
    return _local_stats(x, patch_size)


_STATS_CHUNK = 1 << 21  # values of x per chunk of images in `local_stats`


def _local_stats(x: torch.Tensor, patch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    r = patch_size // 2
    x64 = x.to(torch.float64)
    both = torch.stack([x64, x64 * x64])  # sums of x and x^2 together
    rows, n_rows = _window_sums(both, -2, r)
    sums, n_cols = _window_sums(rows, -1, r)
    count = n_rows[:, None] * n_cols[None, :]
    mean, mean_sq = sums / count
    var = ((mean_sq - mean**2) * (count / (count - 1))).clamp(min=0.0)
    return mean.to(x.dtype), (var + 1e-6).sqrt().to(x.dtype)


def normalize_target(x: torch.Tensor, patch_size: int = 47) -> torch.Tensor:
    """Local target normalisation of the official SwinV2 SimMIM recipe (`NORM_TARGET.PATCH_SIZE: 47`)."""
    mean, std = local_stats(x, patch_size)
    return (x - mean) / std


class SimMIM(nn.Module):
    """Encoder + linear decoder (1x1 conv to stride^2 * 3 channels, PixelShuffle back to the image size).

    Args:
        encoder: Any model with `forward_features(x, mask) -> (B, h, w, C)` (NHWC), `num_features`, `in_chans`,
            `patch_size`, and a mask token (e.g. `swinv2.SwinTransformerV2(mask_token=True)`).
        encoder_stride: Total downsampling of the encoder (32 for SwinV2).
        norm_target_patch_size: Odd window for local target normalisation (official SwinV2 recipe: 47), or None.
    """

    def __init__(self, encoder: nn.Module, encoder_stride: int = 32, norm_target_patch_size: Optional[int] = None):
        super().__init__()
        self.encoder = encoder
        self.encoder_stride = encoder_stride
        self.in_chans = encoder.in_chans
        self.patch_size = encoder.patch_size
        self.norm_target_patch_size = norm_target_patch_size
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, encoder_stride**2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(encoder_stride),
        )

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) and patch mask (B, H/p, W/p) -> reconstruction (B, C, H, W)."""
        z = self.encoder.forward_features(x, mask)  # (B, H/32, W/32, D)
        return self.decoder(z.permute(0, 3, 1, 2))

    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, H/p, W/p) patch mask -> (B, 1, H, W) pixel mask."""
        m = mask.to(torch.float32)
        m = m.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)
        return m.unsqueeze(1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked-pixel L1 loss (scalar) for images (B, C, H, W) and patch mask (B, H/p, W/p)."""
        rec = self.reconstruct(x, mask).float()
        target = (
            x.float()
            if self.norm_target_patch_size is None
            else normalize_target(x.float(), self.norm_target_patch_size)
        )
        return masked_l1_loss(rec, target, self.pixel_mask(mask))
