"""Window attention of Swin Transformer V2: scaled cosine attention with a position bias.

Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022, Sec. 3.2-3.3.
Parameter and buffer names follow microsoft/Swin-Transformer `models/swin_transformer_v2.py`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

POSITION_BIAS_TYPES = ("log_cpb", "linear_cpb", "table")

# Official: logit_scale is clamped at log(1 / 0.01) so the cosine similarity is scaled by at most 100.
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)


def relative_position_index(window_size: Tuple[int, int]) -> torch.Tensor:
    """Index into the (2Wh-1)*(2Ww-1) relative-position table for each pair of tokens in a window.

    Returns:
        Long tensor of shape (Wh*Ww, Wh*Ww).
    """
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2), in [-(W-1), W-1]
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def relative_coords_table(
    window_size: Tuple[int, int], pretrained_window_size: Tuple[int, int], log_spaced: bool = True
) -> torch.Tensor:
    """Normalised relative coordinates fed to the continuous position bias MLP.

    Coordinates `arange(-(W-1), W)` per axis are divided by `pretrained_window_size - 1` when a pretrained
    window is given (so a larger window extrapolates beyond the pretraining range), else by `window_size - 1`.
    Log-spaced (paper Eq. 4): scaled to [-8, 8], then `sign(t) * log2(|t| + 1) / log2(8)`.
    Linear-spaced (the paper's ablation): left in [-1, 1].

    Returns:
        Float tensor of shape (1, 2Wh-1, 2Ww-1, 2).
    """
    axes = [torch.arange(-(w - 1), w, dtype=torch.float32) for w in window_size]
    table = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).unsqueeze(0)  # (1, 2Wh-1, 2Ww-1, 2)
    ref = pretrained_window_size if pretrained_window_size[0] > 0 else window_size
    table = table / torch.tensor([max(r - 1, 1) for r in ref], dtype=torch.float32)
    if log_spaced:
        table = table * 8
        table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table


class CosineQKV(torch.autograd.Function):
    """Split the qkv projection into unit-norm q (times the per-head scale), unit-norm k and v, by hand.

    Forward: `q / max(||q||, eps) * scale`, `k / max(||k||, eps)`, `v`, each (B*nW, nH, N, hd) contiguous, from
    qkv of shape (B*nW, N, 3, nH, hd). Norms are taken in fp32 at least; under autocast q and k stay in the
    projection's dtype with the per-row factor rounded to it, so each output element is one multiply.
    Backward, with u = q / ||q|| and r = u . g per row: dq = scale / ||q|| * (g - u r), dscale = sum of r
    (likewise for k with scale 1); the three gradients are written straight into one (B*nW, N, 3, nH, hd)
    buffer, the layout the projection's backward wants.

    Same math as `F.normalize` plus slicing under autograd (float64 `gradcheck` in the tests), which makes about
    three times as many passes over q, k and v on CPU: fp32 copies, zero-filled slice gradients, a permute copy.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, scale: torch.Tensor, eps: float = 1e-12):
        t = qkv.permute(2, 0, 3, 1, 4).contiguous()  # (3, B*nW, nH, N, hd)
        qk = t[:2]
        acc = torch.promote_types(qk.dtype, torch.float32)
        inv_norm = torch.linalg.vector_norm(qk, dim=-1, keepdim=True, dtype=acc).clamp_min_(eps).reciprocal_()
        factor = torch.cat((inv_norm[:1] * scale, inv_norm[1:]))  # (2, B*nW, nH, N, 1)
        ctx.save_for_backward(qk, inv_norm, factor)
        ctx.scale_shape = scale.shape
        q, k = (qk * factor.to(qk.dtype)).unbind(0)
        return q, k, t[2]

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        qk, inv_norm, factor = ctx.saved_tensors
        bw, nh, n, hd = dv.shape
        dqkv = torch.empty((bw, n, 3, nh, hd), dtype=qk.dtype, device=qk.device)
        out = dqkv.permute(2, 0, 3, 1, 4)  # (3, B*nW, nH, N, hd) view of the buffer
        dscale = None
        for i, g in enumerate((dq, dk)):
            x = qk[i]
            r = (x * g).sum(-1, keepdim=True, dtype=inv_norm.dtype) * inv_norm[i]  # u . g, (B*nW, nH, N, 1)
            coef = (factor[i] * inv_norm[i] * r).to(g.dtype)
            torch.addcmul(g * factor[i].to(g.dtype), x, coef, value=-1, out=out[i])
            if i == 0:
                dscale = r.sum_to_size(ctx.scale_shape)
        out[2].copy_(dv)
        return dqkv, dscale, None


def cosine_qkv(qkv: torch.Tensor, scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`CosineQKV` in eager mode; under `torch.compile` the same math in plain ops, which the compiler fuses
    (it cannot trace the hand-written kernels' `out=` arguments and would break the graph there).
    """
    if not torch.compiler.is_compiling():
        return CosineQKV.apply(qkv, scale)
    dtype = qkv.dtype
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return (F.normalize(q, dim=-1) * scale).to(dtype), F.normalize(k, dim=-1).to(dtype), v


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows with scaled cosine similarity.

    `sim(q, k) = cos(q, k) * exp(min(logit_scale, log 100)) + B`, B the relative position bias.

    Args:
        dim: Number of input channels C.
        window_size: Window (Wh, Ww).
        num_heads: Number of attention heads.
        qkv_bias: Learnable biases for q and v (k has none, as in the official code).
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        pretrained_window_size: Window used in pretraining, (0, 0) for none. Only the CPB variants use it.
        position_bias: "log_cpb" (SwinV2), "linear_cpb" (paper ablation) or "table" (Swin V1 parameter table).
        fused: Use `F.scaled_dot_product_attention`; None picks the faster path measured by
            `benchmarks/encoder.py`: fused on CUDA, explicit matmul-softmax-matmul on CPU.
        chunk_size: Sequential attention: compute at most this many windows at once (None: all at once).
    """

    def __init__(
        self,
        dim: int,
        window_size: Tuple[int, int],
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: Tuple[int, int] = (0, 0),
        position_bias: str = "log_cpb",
        fused: Optional[bool] = None,
        chunk_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if position_bias not in POSITION_BIAS_TYPES:
            raise ValueError(f"position_bias must be one of {POSITION_BIAS_TYPES}, got {position_bias!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"attn_chunk_size must be a positive number of windows or None, got {chunk_size}")
        _check_sequential_dropout(chunk_size, attn_drop)
        self.dim = dim
        self.window_size = tuple(window_size)
        self.pretrained_window_size = tuple(pretrained_window_size)
        self.num_heads = num_heads
        self.position_bias = position_bias
        self.fused = fused
        self.chunk_size = chunk_size
        self.attn_drop = attn_drop

        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        num_rel = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1)
        if position_bias == "table":
            self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rel, num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.cpb_mlp = nn.Sequential(
                nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
            )
            table = relative_coords_table(self.window_size, self.pretrained_window_size, position_bias == "log_cpb")
            self.register_buffer("relative_coords_table", table)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))

        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_bias(self) -> torch.Tensor:
        """Per-head position bias (nH, N, N), N = Wh*Ww."""
        n = self.window_size[0] * self.window_size[1]
        if self.position_bias == "table":
            table = self.relative_position_bias_table  # ((2Wh-1)*(2Ww-1), nH)
        else:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        # Contiguous: a permuted view as the mask operand makes the (B*nW, nH, N, N) add much slower on CPU.
        # index_select: its backward (index_add) is faster on CPU than that of `table[index]` (index_put).
        bias = table.index_select(0, self.relative_position_index.view(-1))
        bias = bias.view(n, n, -1).permute(2, 0, 1).contiguous()  # (nH, N, N)
        if self.position_bias != "table":
            bias = 16 * torch.sigmoid(bias)  # official: bounds the CPB output to (0, 16)
        return bias

    def forward(self, x: torch.Tensor, shift_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend within each window.

        Args:
            x: Windows (B*nW, N, C), ordered image-major (all windows of image 0 first).
            shift_mask: Additive mask (nW, N, N) with 0 within a region and -100 across regions, or None.

        Returns:
            Tensor of shape (B*nW, N, C).
        """
        bw, n, c = x.shape
        bias = None if self.q_bias is None else torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(bw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = self.split_qkv(qkv)
        bias = self.relative_bias().unsqueeze(0).to(qkv.dtype)  # (1, nH, N, N)
        if self.chunk_size is None or self.chunk_size >= bw:
            out = self._attend_windows(q, k, v, bias, shift_mask, 0)
        else:
            _check_sequential_dropout(self.chunk_size, self.attn_drop if self.training else 0.0)
            out = self._attend_sequential(q, k, v, bias, shift_mask)
        x = out.transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(x))

    def split_qkv(self, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The qkv projection (B*nW, N, 3, nH, hd) as q, k, v (each (B*nW, nH, N, hd), contiguous), with the
        similarity's temperature folded into q so that the attention itself (fused or not) uses scale 1: here q
        and k L2-normalised and q times the clamped per-head `exp(logit_scale)`. q and k stay in the projection's
        dtype: under autocast the (B*nW, nH, N, N) products then stay in bf16 instead of bouncing between fp32 and
        bf16."""
        scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()  # (nH, 1, 1)
        return cosine_qkv(qkv, scale)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention for a run of windows.

        q, k, v: (W, nH, N, hd); mask: (M, nH, N, N) with M one of 1, nW, W. Returns (W, nH, N, hd).
        """
        bw, nh, n, hd = q.shape
        nw = mask.shape[0]
        if 1 < nw < bw:
            # Fold windows into the head axis so the per-window mask broadcasts over the batch: (B, nW*nH, N, hd).
            q, k, v = (t.reshape(bw // nw, nw * nh, n, hd) for t in (q, k, v))
            mask = mask.reshape(1, nw * nh, n, n)
        drop = self.attn_drop if self.training else 0.0
        if drop == 0 and (self.fused if self.fused is not None else q.is_cuda):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        else:
            attn = torch.matmul(q, k.transpose(-2, -1)).add_(mask)  # (W, nH, N, N) or (B, nW*nH, N, N)
            attn = torch.softmax(attn, dim=-1, dtype=q.dtype)
            if drop > 0:  # from the global generator, which activation checkpointing restores to recompute
                attn = F.dropout(attn, drop)
            out = torch.matmul(attn, v)
        return out.reshape(bw, nh, n, hd)

    def _attend_sequential(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
        shift_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Sequential self-attention (paper Sec. 3.5): `chunk_size` windows at a time.

        While training, each chunk is a non-reentrant checkpoint whose inputs are slices of q, k, v (views of
        tensors autograd keeps anyway), the per-head bias (1, nH, N, N) and the shift mask (nW, N, N): the chunk's
        attention matrix and its (chunk, nH, N, N) mask exist only while that chunk is computed, in forward and
        again in backward, so attention memory is that of one chunk.
        """
        recompute = torch.is_grad_enabled() and (q.requires_grad or bias.requires_grad)
        outs = []
        for i, (qc, kc, vc) in enumerate(zip(*(t.split(self.chunk_size) for t in (q, k, v)))):
            args = (qc, kc, vc, bias, shift_mask, i * self.chunk_size)
            if recompute:  # no RNG state to keep: a chunk draws nothing (no attention dropout here)
                outs.append(checkpoint(self._attend_windows, *args, use_reentrant=False, preserve_rng_state=False))
            else:
                outs.append(self._attend_windows(*args))
        return torch.cat(outs)

    def _attend_windows(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
        shift_mask: Optional[torch.Tensor],
        first: int,
    ) -> torch.Tensor:
        """`_attend` for windows `first` to `first + W` (all of them, or one chunk), with their mask built here:
        the bias alone; per window of an image, (nW, nH, N, N), when the run holds whole images; else one per
        window, (W, nH, N, N). Arguments as `_attend_sequential`'s; (W, nH, N, hd) -> same."""
        mask = bias
        if shift_mask is not None:
            nw, count = shift_mask.shape[0], q.shape[0]
            if first % nw or count % nw:
                shift_mask = shift_mask[torch.arange(first, first + count, device=q.device) % nw]
            mask = (bias + shift_mask.unsqueeze(1)).to(bias.dtype)
        return self._attend(q, k, v, mask)


def _check_sequential_dropout(chunk_size: Optional[int], attn_drop: float) -> None:
    """Sequential attention draws no attention dropout: a chunk recomputed in backward would need the RNG state of
    its forward, and no recipe uses attention dropout (the official rate is 0)."""
    if chunk_size is not None and attn_drop > 0:
        raise ValueError(
            f"attention dropout (attn_drop_rate {attn_drop}) does not combine with sequential attention "
            f"(attn_chunk_size {chunk_size}): set attn_drop_rate 0 or attn_chunk_size None"
        )
