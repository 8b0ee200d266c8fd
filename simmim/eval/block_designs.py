"""Swin V1's block design beside SwinV2's, for the activation study (`python -m simmim.activations`).

SwinV2 changed two things in every block (Liu et al., CVPR 2022, Sec. 3.1-3.2); this module puts Swin V1's back, each
on its own, into a `swinv2.SwinTransformerV2` of any shape:

- `norm_position="pre"`: Swin V1's pre-norm block, `x = x + DropPath(Attn(LN(x)))`, `x = x + DropPath(MLP(LN(x)))`
  (`PreNormBlock`, initialised with unit norms, as V1), and its patch merging, `LayerNorm(4C)` before the reduction
  (`NormFirstPatchMerging`);
- `attention="dot"`: Swin V1's scaled dot product, `sim(q, k) = q.k / sqrt(hd) + B`, with no `logit_scale`
  (`DotProductAttention`).

The parts keep SwinV2's parameter names and every attention path (fused, sequential, checkpointed, compiled). A
model of another design is not a SwinV2: `swinv2` neither records, exports nor loads a model with these parts
(`swinv2.model.require_swinv2_parts`). `save` writes this module's own file instead: its record, and the tensors
under names that end in `@<design>`, so that no SwinV2 loader takes them for SwinV2 weights; `load` rebuilds the
design from it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file

import swinv2
from swinv2.attention import WindowAttention
from swinv2.blocks import PatchMerging, SwinTransformerBlock
from swinv2.reading import MalformedRecordError, check_architecture, read_json_record

NORM_POSITIONS = ("post", "pre")  # SwinV2's residual post-norm, Swin V1's pre-norm
ATTENTION_TYPES = ("cosine", "dot")  # SwinV2's scaled cosine attention, Swin V1's scaled dot product
RECORD_KEY = "simmim.block_design"


class PreNormBlock(SwinTransformerBlock):
    """Swin V1's pre-norm block: `x = x + DropPath(WindowAttn(LN(x)))`, `x = x + DropPath(MLP(LN(x)))`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.window_attention(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return self.norm3(x)


class NormFirstPatchMerging(PatchMerging):
    """Swin V1's patch merging: `LayerNorm(4C)`, then the reduction to 2C."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(self.merge(x)))


class DotProductAttention(WindowAttention):
    """Swin V1's scaled dot-product attention, `q.k / sqrt(hd) + B`; no `logit_scale` parameter."""

    def split_qkv(self, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        return q * (qkv.shape[-1] ** -0.5), k, v


def build(norm_position: str = "post", attention: str = "cosine", **arch: Any) -> swinv2.SwinTransformerV2:
    """A `SwinTransformerV2(**arch)` with the given design. Its initial weights are SwinV2's of the same seed (the
    parts have the same parameters and draw nothing more), except that pre-norm blocks and merging keep unit norms
    (Swin V1's init), and dot-product attention has no `logit_scale`."""
    if norm_position not in NORM_POSITIONS:
        raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got {norm_position!r}")
    if attention not in ATTENTION_TYPES:
        raise ValueError(f"attention must be one of {ATTENTION_TYPES}, got {attention!r}")
    model = swinv2.SwinTransformerV2(**arch)
    # The parts differ from SwinV2's only in their forward: each module keeps its parameters and takes the class.
    for layer in model.layers:
        for blk in layer.blocks:
            if attention == "dot":
                blk.attn.__class__ = DotProductAttention
                blk.attn.logit_scale = None
            if norm_position == "pre":
                blk.__class__ = PreNormBlock
                for norm in (blk.norm1, blk.norm2):
                    nn.init.ones_(norm.weight)
        if norm_position == "pre" and layer.downsample is not None:
            layer.downsample.__class__ = NormFirstPatchMerging
            layer.downsample.norm = nn.LayerNorm(layer.downsample.reduction.in_features)
    return model


def design_of(model: swinv2.SwinTransformerV2) -> Dict[str, str]:
    """`{"norm_position": ..., "attention": ...}` of a model `build` made (SwinV2's for a plain one)."""
    blk = model.layers[0].blocks[0]
    return {
        "norm_position": "pre" if isinstance(blk, PreNormBlock) else "post",
        "attention": "dot" if isinstance(blk.attn, DotProductAttention) else "cosine",
    }


def _tag(design: Dict[str, Any]) -> str:
    """The suffix of every tensor name in `save`'s files: `@<norm_position>+<attention>`."""
    return f"@{design['norm_position']}+{design['attention']}"


def save(path: Union[str, os.PathLike], model: swinv2.SwinTransformerV2) -> str:
    """`model`'s weights as safetensors with this module's record (the design and `model.architecture()`), each
    tensor named `<parameter>@<norm_position>+<attention>`."""
    path = os.fspath(path)
    design = design_of(model)
    record = {**design, "architecture": model.architecture()}
    tensors = {k + _tag(design): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, path, metadata={RECORD_KEY: json.dumps(record)})
    return path


def load(path: Union[str, os.PathLike]) -> swinv2.SwinTransformerV2:
    """The model `save` wrote: the record checked as any weights file's record is (`swinv2.reading`), the design
    one of the known ones, the weights loaded strictly."""
    raw = swinv2.read_checkpoint(path)
    text = raw.get(RECORD_KEY)
    if not isinstance(text, str):
        raise MalformedRecordError(f"{path} has no {RECORD_KEY} record: not written by `save`")
    record = read_json_record(text, str(path))
    if not isinstance(record, dict) or sorted(record) != ["architecture", "attention", "norm_position"]:
        raise MalformedRecordError(f"{path}: its {RECORD_KEY} record needs norm_position, attention, architecture")
    arch = check_architecture(record["architecture"], str(path))
    model = build(record["norm_position"], record["attention"], **arch)
    model.load_state_dict({k.removesuffix(_tag(record)): v for k, v in raw["state_dict"].items()})
    return model
