"""Swin Transformer V2 encoder and its named variants.

Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022.
`state_dict()` keys follow microsoft/Swin-Transformer `models/swin_transformer_v2.py` exactly
(downsample at the end of stages 0-2, `head.weight`), plus `mask_token` for SimMIM.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, TypedDict, Union

import torch
import torch.nn as nn

from swinv2.attention import WindowAttention
from swinv2.blocks import BasicLayer, PatchMerging, SwinTransformerBlock

IntOrPair = Union[int, Tuple[int, int]]
# A window for every stage (an int or (h, w)), or one per stage: the type command lines and checkpoints give.
WindowSpec = Union[int, Tuple[int, int], List[Union[int, Tuple[int, int]]]]


class EncoderOptions(TypedDict, total=False):
    """`SwinTransformerV2` arguments a training stage passes through (`--model.encoder_kwargs`), spelled out so
    that a command line, a config or a checkpoint can only hold values of these types (never a class to build)."""

    patch_size: int
    in_chans: int
    embed_dim: int
    depths: List[int]
    num_heads: List[int]
    mlp_ratio: float
    qkv_bias: bool
    drop_rate: float
    attn_drop_rate: float
    ape: bool
    patch_norm: bool
    extra_norm_period: int
    position_bias: str
    attn_chunk_size: Optional[int]
    fused_attn: Optional[bool]


# Parameters the official code keeps out of weight decay, by name fragment (`no_weight_decay_keywords`),
# plus the SimMIM mask token.
NO_WEIGHT_DECAY_KEYWORDS = (
    "cpb_mlp",
    "logit_scale",
    "relative_position_bias_table",
    "absolute_pos_embed",
    "mask_token",
)


def _pair(v: IntOrPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _per_stage(value: Union[IntOrPair, Sequence[IntOrPair]], num_stages: int, name: str) -> Tuple[Tuple[int, int], ...]:
    """An int or (h, w) for every stage, or a sequence with one int or (h, w) per stage."""
    if isinstance(value, int):
        return (_pair(value),) * num_stages
    value = list(value)
    if len(value) != num_stages:
        raise ValueError(f"{name} needs an int or one value per stage ({num_stages}), got {value}")
    return tuple(_pair(v) for v in value)


try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # a PyTorch without distributed support: nothing can be sharded
    FSDPModule = None


def _design(module: nn.Module) -> type:
    """The class that gives `module` its meaning: its own, or, for a module FSDP2 sharded (`fully_shard` swaps its
    class for `FSDP<name>`, a subclass of `FSDPModule` and of the original), the original class."""
    cls = type(module)
    if FSDPModule is None or not issubclass(cls, FSDPModule):
        return cls
    return next(b for b in cls.__bases__ if b is not FSDPModule)


def require_swinv2_parts(model: nn.Module, what: str) -> None:
    """Refuse a model with parts of another block design: subclasses of SwinV2's block, attention or patch merging
    (such as Swin V1's, which a study may put in) keep SwinV2's parameter names, but their weights do not mean what
    SwinV2's do, so such a model is neither recorded, exported nor loaded as a SwinV2. `what`: the refused action."""
    parts = (SwinTransformerBlock, WindowAttention, PatchMerging)
    modules = model.named_modules()
    foreign = [f"{n} ({type(m).__name__})" for n, m in modules if isinstance(m, parts) and _design(m) not in parts]
    if foreign:
        raise ValueError(
            f"cannot {what}: the model has parts of another block design ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}), whose weights do not mean what SwinV2's do; save and load it "
            "with the code that built it"
        )


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: Conv2d(k=stride=patch) then LayerNorm. (B, C, H, W) -> (B, H/p, W/p, D)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"input size {h}x{w} is not divisible by patch_size {self.patch_size}: "
                "resize or crop the images to a multiple of the patch size"
            )
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H/p, W/p, D)


def _warn_clamped_windows(requested, used, resolutions) -> None:
    """Warn when a window larger than its feature map is clamped in any stage but the last (the recipes clamp the
    last stage by design: 192 px, window 12 leaves it 6x6), naming the stages, their maps and windows."""
    clamped = [i for i, (r, u) in enumerate(zip(requested, used)) if tuple(_pair(r)) != tuple(u)]
    if any(i < len(used) - 1 for i in clamped):
        stages = ", ".join(
            f"stage {i + 1} ({resolutions[i][0]}x{resolutions[i][1]} map: window {used[i][0]}x{used[i][1]}, "
            f"not {_pair(requested[i])[0]}x{_pair(requested[i])[1]})"
            for i in clamped
        )
        warnings.warn(
            f"window_size larger than the feature map is clamped to the map in {stages}; a larger image "
            "(img_size) or a smaller window_size keeps the windows you asked for",
            stacklevel=3,
        )


class SwinTransformerV2(nn.Module):
    """Swin Transformer V2.

    Args:
        img_size: Input size (int or (H, W)). Other sizes divisible by `patch_size` are accepted at run time
            (windows are zero-padded as in timm); the per-stage window clamping is decided for this size.
        patch_size: Patch size of the embedding.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 for no head (`forward` then returns pooled features).
        embed_dim: Channels C of stage 0; stage i has C * 2**i.
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        window_size: Window per stage (an int or (h, w) for all, or one per stage).
        pretrained_window_sizes: Window each stage was pretrained with (0: none). Rescales the CPB coordinates
            so a model fine-tuned at a larger window extrapolates log-spaced from the pretraining range.
        mlp_ratio: MLP hidden size / C.
        qkv_bias: Learnable q and v biases.
        drop_rate: Dropout after the patch embedding and inside MLPs.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth, rising linearly from 0 over all blocks.
        ape: Absolute position embedding (off in every SwinV2 recipe).
        patch_norm: LayerNorm after the patch embedding.
        use_checkpoint: Activation checkpointing per block (non-reentrant), see `set_grad_checkpointing`.
        extra_norm_period: LayerNorm on the main branch after every n-th block of a stage (SwinV2-H/G: 6).
        position_bias: "log_cpb" (SwinV2), "linear_cpb" or "table" (Swin V1 bias table), for the paper's ablation.
        mask_token: Learnable SimMIM mask token of shape (1, 1, C), used by `forward_features(x, mask)`.
        attn_chunk_size: Sequential attention: compute at most this many windows at once to bound memory.
        fused_attn: Use `F.scaled_dot_product_attention` (True), explicit matmuls (False), or pick by device
            (None: fused on CUDA, explicit on CPU, where `benchmarks/encoder.py` measured it faster).
    """

    def __init__(
        self,
        img_size: IntOrPair = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Union[IntOrPair, Sequence[IntOrPair]] = 7,
        pretrained_window_sizes: Union[IntOrPair, Sequence[IntOrPair]] = (0, 0, 0, 0),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        extra_norm_period: int = 0,
        position_bias: str = "log_cpb",
        mask_token: bool = False,
        attn_chunk_size: Optional[int] = None,
        fused_attn: Optional[bool] = None,
    ) -> None:
        super().__init__()
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length")
        self.img_size = _pair(img_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.mlp_ratio = mlp_ratio
        self.extra_norm_period = extra_norm_period
        self.num_features = int(embed_dim * 2 ** (num_stages - 1))
        self.encoder_stride = patch_size * 2 ** (num_stages - 1)
        windows = _per_stage(window_size, num_stages, "window_size")
        if not isinstance(pretrained_window_sizes, int) and not any(pretrained_window_sizes):
            pretrained_window_sizes = 0  # the all-zero default means "none" for any number of stages
        pretrained = _per_stage(pretrained_window_sizes, num_stages, "pretrained_window_sizes")
        grid = tuple(s // patch_size for s in self.img_size)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim)) if ape else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        self.pos_drop = nn.Dropout(drop_rate)

        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear over all blocks
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            resolution = tuple(-(-g // 2**i) for g in grid)  # ceil: odd maps are padded by PatchMerging
            self.layers.append(
                BasicLayer(
                    dim=int(embed_dim * 2**i),
                    input_resolution=resolution,
                    depth=depths[i],
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=i < num_stages - 1,
                    use_checkpoint=use_checkpoint,
                    extra_norm_period=extra_norm_period,
                    num_heads=num_heads[i],
                    window_size=windows[i],
                    mlp_ratio=mlp_ratio,
                    drop=drop_rate,
                    qkv_bias=qkv_bias,
                    attn_drop=attn_drop_rate,
                    pretrained_window_size=pretrained[i],
                    position_bias=position_bias,
                    fused=fused_attn,
                    chunk_size=attn_chunk_size,
                )
            )
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()
        _warn_clamped_windows(windows, self.window_sizes, [layer.blocks[0].input_resolution for layer in self.layers])

    def init_weights(self) -> None:
        """Official init: trunc-normal(0.02) Linear weights, zero biases, unit LayerNorms, then the residual
        post-norms (norm1, norm2 of every block) at zero, so each block starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.absolute_pos_embed, self.mask_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for layer in self.layers:
            for blk in layer.blocks:
                for norm in (blk.norm1, blk.norm2):
                    nn.init.zeros_(norm.weight)
                    nn.init.zeros_(norm.bias)

    @property
    def window_sizes(self) -> Tuple[Tuple[int, int], ...]:
        """The (clamped) window each stage uses."""
        return tuple(layer.blocks[0].window_size for layer in self.layers)

    def architecture(self) -> Dict[str, Any]:
        """The constructor arguments that fix this model's weights and their meaning, JSON-able (lists, not tuples),
        with the window each stage really uses. Dropout, checkpointing and kernel choices are left out: they change
        how the model trains, not what its weights are. `SwinTransformerV2(**model.architecture())` rebuilds it."""
        attn = [layer.blocks[0].attn for layer in self.layers]
        return dict(
            img_size=list(self.img_size),
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            num_classes=self.num_classes,
            embed_dim=self.embed_dim,
            depths=[len(layer.blocks) for layer in self.layers],
            num_heads=[a.num_heads for a in attn],
            window_size=[list(w) for w in self.window_sizes],
            pretrained_window_sizes=[list(a.pretrained_window_size) for a in attn],
            mlp_ratio=self.mlp_ratio,
            qkv_bias=attn[0].q_bias is not None,
            ape=self.absolute_pos_embed is not None,
            patch_norm=isinstance(self.patch_embed.norm, nn.LayerNorm),
            extra_norm_period=self.extra_norm_period,
            position_bias=attn[0].position_bias,
            mask_token=self.mask_token is not None,
        )

    def no_weight_decay(self) -> Set[str]:
        """Names of parameters the official recipe keeps out of weight decay (besides 1-D weights and biases,
        which the optimizer factory excludes by shape)."""
        return {n for n, _ in self.named_parameters() if any(k in n for k in NO_WEIGHT_DECAY_KEYWORDS)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn per-block activation checkpointing on or off (non-reentrant, so it works with DDP)."""
        for layer in self.layers:
            layer.use_checkpoint = enable

    def compile_attention(self, **compile_kwargs: Any) -> None:
        """`torch.compile` every window-attention module (opt-in; the blocks stay eager).

        Fuses the bias, mask, softmax and their backward; compiling whole blocks was slower. It compiles at the
        first forward; docs/speed.md measures what it gains.
        """
        for layer in self.layers:
            for blk in layer.blocks:
                blk.attn.compile(**compile_kwargs)

    def embed(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Patch embedding, optional SimMIM masking, position embedding. (B, C, H, W) -> (B, H/p, W/p, D)."""
        x = self.patch_embed(x)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("a mask was given but the model has no mask token: build it with mask_token=True")
            if mask.shape != x.shape[:3]:
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} does not match the patch grid {tuple(x.shape[:3])} "
                    f"(B, H/{self.patch_size}, W/{self.patch_size})"
                )
            w = mask.unsqueeze(-1).to(x.dtype)  # (B, H/p, W/p, 1), 1 = masked
            x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        if self.absolute_pos_embed is not None:
            if x.shape[1] * x.shape[2] != self.absolute_pos_embed.shape[1]:
                raise ValueError(f"ape=True fixes the input size to {self.img_size}, got {tuple(x.shape[1:3])} patches")
            x = x + self.absolute_pos_embed.view(1, x.shape[1], x.shape[2], -1)
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode images.

        Args:
            x: Images (B, in_chans, H, W).
            mask: Optional (B, H/patch, W/patch), bool or 0/1; 1 replaces that patch by the mask token.

        Returns:
            Features (B, H/32, W/32, num_features), NHWC, after the final LayerNorm.
        """
        x = self.embed(x, mask)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average-pool NHWC features (B, h, w, C) and classify: (B, num_classes), or (B, C) with pre_logits."""
        x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


# Variant table: paper Table 1 (docs/encoder.md). Patch 4, MLP ratio 4 for all.
VARIANTS: Dict[str, Dict[str, Any]] = {
    "swinv2_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swinv2_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swinv2_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swinv2_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    # H and G: no official code. Heads keep a 32-channel head size; main-branch LayerNorm every 6 blocks.
    # G uses the paper's depths {2, 2, 42, 4} (Sec. 4.1), which give its ~3.0B parameters.
    "swinv2_huge": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), extra_norm_period=6),
    "swinv2_giant": dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128), extra_norm_period=6),
}


def create_model(name: str, **overrides: Any) -> SwinTransformerV2:
    """Build a named variant (`swinv2_tiny` ... `swinv2_giant`); keyword arguments override its defaults."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(VARIANTS)}")
    return SwinTransformerV2(**{**VARIANTS[name], **overrides})
