"""The checkpoint contract: what a weights file records about its model, and loading SwinV2 weights of any layout.

`save_weights(path, model)` writes safetensors whose header records `model.architecture()` (variant, embed dim,
depths, heads, patch and image size, the window of every stage, the pretraining windows, the position-bias type).
Lightning checkpoints carry the same record under the same key (`ARCH_KEY`). `create_model_from_checkpoint(path)`
builds the model from that record alone; `load_pretrained(model, path)` loads weights of any supported layout into
a model built by hand, and warns when the model's position-bias windows disagree with the file's.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from safetensors.torch import save_file

from swinv2.convert import (
    ANCHOR,
    WINDOW_BUFFERS,
    CheckpointMismatchError,
    StateDict,
    official_state_dict,
    resize_bias_table,
    to_timm_state_dict,
)
from swinv2.model import VARIANTS, SwinTransformerV2, require_swinv2_parts
from swinv2.reading import (
    ARCHITECTURE_LIMITS,
    OPTION_FIELDS,
    RECORD_FIELDS,
    MalformedRecordError,
    check_architecture,
    parse_record,
    read_checkpoint,
    read_json_record,
)
from swinv2.windows import Windows, check_windows, implied_windows, reference_windows, spacing

ARCH_KEY = "swinv2_architecture"  # safetensors metadata entry / Lightning checkpoint entry: JSON of the record
LAYOUT_KEY = "format"  # safetensors metadata entry: "swinv2-official" or "timm"
INPUTS_KEY = "inputs"  # safetensors metadata entry / Lightning checkpoint entry: JSON of the input record
LABELS_KEY = "labels"  # safetensors metadata entry / Lightning checkpoint entry: JSON list of the class names
MAX_LABELS_CHARS = 8 << 20  # a label record: ImageNet-21k's names take about 1 MB
MAX_LABEL_CHARS = 1024
PIXEL_DEPTHS = ("uint8", "uint16", "float32")
Source = Union[str, os.PathLike, Mapping]


@dataclass
class LoadReport:
    """What `load_pretrained` did.

    Attributes:
        format: Detected layout: "official", "simmim", "timm", "transformers".
        prefix: Key prefix that was stripped ("" if none).
        missing_keys: Model weights the checkpoint did not provide (they keep their initialisation).
        unexpected_keys: Checkpoint weights the model has no place for.
        dropped_keys: Checkpoint entries dropped on purpose (window buffers, decoder, a head or mask token the
            model does not use), with the reason.
        resized_keys: Entries interpolated to the model's shape (Swin V1 bias tables on a new window).
        adapted_keys: Entries adapted to another number of input channels (`adapt_channels`), with what was done.
        windows: The windows the file's position bias was trained for, per stage, where the file tells.
    """

    format: str
    prefix: str = ""
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    dropped_keys: Dict[str, str] = field(default_factory=dict)
    resized_keys: List[str] = field(default_factory=list)
    adapted_keys: Dict[str, str] = field(default_factory=dict)
    windows: Optional[Windows] = None

    def __str__(self) -> str:
        lines = [f"format={self.format!r} prefix={self.prefix!r} windows={self.windows}"]
        for name in ("missing_keys", "unexpected_keys", "resized_keys"):
            keys = getattr(self, name)
            lines.append(f"{name} ({len(keys)}): {keys[:20]}{' ...' if len(keys) > 20 else ''}")
        lines.append(f"dropped_keys: {len(self.dropped_keys)}")
        lines += [f"adapted: {k}: {how}" for k, how in self.adapted_keys.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The record


def variant_of(arch: Mapping[str, Any]) -> str:
    """The `VARIANTS` name whose shape (embed dim, depths, heads, extra norms) `arch` has, else "custom"."""
    for name, spec in VARIANTS.items():
        want = {"extra_norm_period": 0, **spec}
        if all(arch[k] == (list(v) if isinstance(v, tuple) else v) for k, v in want.items()):
            return name
    return "custom"


def architecture(model: SwinTransformerV2) -> Dict[str, Any]:
    """`model.architecture()` and the variant it matches: the record every weights file of this project carries.
    A model with parts of another block design is refused (`require_swinv2_parts`)."""
    require_swinv2_parts(model, "record the architecture")
    arch = model.architecture()
    return {"variant": variant_of(arch), **arch}


def add_record(checkpoint: Dict[str, Any], model: SwinTransformerV2) -> Dict[str, Any]:
    """Put `model`'s architecture record into a checkpoint dict (a Lightning checkpoint being saved); returns it."""
    checkpoint[ARCH_KEY] = architecture(model)
    return checkpoint


def save_weights(
    path: Union[str, os.PathLike],
    model: SwinTransformerV2,
    layout: str = "official",
    inputs: Optional[Mapping[str, Any]] = None,
    labels: Optional[List[str]] = None,
) -> str:
    """Write `model`'s weights as safetensors with its architecture record; returns `path`.

    Args:
        layout: "official" (this project's and microsoft/Swin-Transformer's keys, mask token included) or "timm"
            (`to_timm_state_dict`, which timm's `SwinTransformerV2` loads with `strict=True`).
        inputs: The input record (`check_inputs`): the pixels' type and the normalisation the weights were
            trained with, so that whoever reads them normalises the same way.
        labels: The class names of a classifier's outputs, in order (`check_labels`).
    """
    if layout not in ("official", "timm"):
        raise ValueError(f"layout must be 'official' or 'timm', got {layout!r}")
    sd = model.state_dict() if layout == "official" else to_timm_state_dict(model)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    metadata = {
        ARCH_KEY: json.dumps(architecture(model)),
        LAYOUT_KEY: "timm" if layout == "timm" else "swinv2-official",
    }
    if inputs is not None:
        metadata[INPUTS_KEY] = json.dumps(check_inputs(inputs, model.in_chans, path))
    if labels is not None:
        metadata[LABELS_KEY] = json.dumps(check_labels(labels, model.num_classes, path))
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, path, metadata=metadata)
    return path


def read_architecture(raw: Mapping, name: str = "the checkpoint") -> Optional[Dict[str, Any]]:
    """The architecture record of a read checkpoint (safetensors header or Lightning checkpoint), checked and
    bounded (`swinv2.reading.check_architecture`), or None when it has none.

    Raises:
        MalformedRecordError: a record that is not JSON, has unknown fields or values out of bounds.
    """
    record = raw.get(ARCH_KEY) if isinstance(raw, Mapping) else None
    if record is None:
        return None
    if isinstance(record, (str, bytes)):
        return parse_record(record, name)
    return check_architecture(record, name)


def check_inputs(record: Any, channels: int, where: Any) -> Dict[str, Any]:
    """An input record, checked: `{"depth": one of PIXEL_DEPTHS, "mean": [...], "std": [...]}`, one finite value
    per channel each (std positive; as fractions of the full range for integer pixels)."""
    if not isinstance(record, Mapping) or set(record) != {"depth", "mean", "std"}:
        raise MalformedRecordError(f"{where}: the input record is not {{depth, mean, std}}")
    if record["depth"] not in PIXEL_DEPTHS:
        raise MalformedRecordError(f"{where}: the input record's depth {str(record['depth'])[:40]!r} is unknown")
    out: Dict[str, Any] = {"depth": record["depth"]}
    for key in ("mean", "std"):
        values = record[key]
        ok = isinstance(values, (list, tuple)) and len(values) == channels
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not ok or (key == "std" and min(values) <= 0):
            raise MalformedRecordError(f"{where}: the input record's {key} is not {channels} finite values")
        out[key] = [float(v) for v in values]
    return out


def read_inputs(raw: Mapping, name: str = "the checkpoint") -> Optional[Dict[str, Any]]:
    """The input record of a read checkpoint (safetensors header or Lightning checkpoint), checked against its
    architecture's channels, or None when it has none."""
    record = raw.get(INPUTS_KEY) if isinstance(raw, Mapping) else None
    if record is None:
        return None
    arch = read_architecture(raw, name)
    if isinstance(record, (str, bytes)):
        record = read_json_record(record, name)
    return check_inputs(record, (arch or {}).get("in_chans", 3), name)


def check_labels(labels: Any, num_classes: int, where: Any) -> List[str]:
    """A label record, checked: `num_classes` distinct class names, non-empty strings of at most 1024 characters."""
    ok = isinstance(labels, (list, tuple)) and len(labels) == num_classes
    ok = ok and all(isinstance(n, str) and 0 < len(n) <= MAX_LABEL_CHARS for n in labels)
    if not ok or len(set(labels)) != len(labels):
        raise MalformedRecordError(f"{where}: the label record is not {num_classes} distinct class names")
    return list(labels)


def read_labels(raw: Mapping, name: str = "the checkpoint") -> Optional[List[str]]:
    """The class names of a read checkpoint's outputs (safetensors header or Lightning checkpoint), checked against
    its architecture's classes, or None when it has none."""
    record = raw.get(LABELS_KEY) if isinstance(raw, Mapping) else None
    if record is None:
        return None
    if isinstance(record, (str, bytes)):
        if len(record) > MAX_LABELS_CHARS:
            raise MalformedRecordError(f"{name}: the label record is longer than {MAX_LABELS_CHARS} characters")
        try:
            record = json.loads(record)
        except (ValueError, RecursionError):
            raise MalformedRecordError(f"{name}: the label record is not JSON") from None
    arch = read_architecture(raw, name)
    count = arch["num_classes"] if arch else len(record) if isinstance(record, list) else -1
    return check_labels(record, count, name)


def checkpoint_windows(raw: Mapping, name: str = "the checkpoint") -> Optional[Windows]:
    """The windows a read checkpoint's position bias was trained for: recorded, else implied by its tables."""
    arch = read_architecture(raw, name)
    if arch is not None:
        return reference_windows(arch)
    sd, *_ = official_state_dict(raw)
    return implied_windows(sd, spacing(sd) != "linear_cpb")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _check_cosine_attention(sd: StateDict, name: str) -> None:
    """Refuse weights whose attention has no `logit_scale`: a scaled dot-product design (Swin V1's), whose weights
    do not mean the same in SwinV2's scaled cosine attention. (Swin V1's patch merging shows as a 4C-wide
    `downsample.norm`: a shape mismatch, refused when loading.)"""
    if any(k.endswith("attn.qkv.weight") for k in sd) and not any(k.endswith("attn.logit_scale") for k in sd):
        raise CheckpointMismatchError(
            f"{name} has attention without logit_scale: scaled dot-product attention (Swin V1's design), whose "
            "weights do not mean the same in SwinV2's scaled cosine attention. Load it with the code that wrote it."
        )


def _mismatch_hint(key: str) -> str:
    if key.startswith("patch_embed"):
        return "a different embed_dim, patch_size or in_chans"
    if "absolute_pos_embed" in key:
        return "a different img_size with ape=True"
    if key.endswith(("logit_scale", "cpb_mlp.2.weight", "relative_position_bias_table")):
        return "a different num_heads"
    if "downsample.norm" in key:
        return "a different embed_dim, or Swin V1's patch merging (it normalises 4C channels, SwinV2 2C)"
    return "a different variant (embed_dim, num_heads or mlp_ratio)"


def load_pretrained(model: SwinTransformerV2, source: Source, adapt_channels: bool = False) -> LoadReport:
    """Load SwinV2 weights of any supported layout into `model`.

    Window-dependent buffers are dropped from the source and recomputed for the model's own windows, so a
    checkpoint loads at another window size. A classifier head of another size is dropped (fine-tuning). When the
    file records (or its `relative_coords_table` implies) position-bias windows other than the model's
    `pretrained_window_sizes`, a warning names both.

    Args:
        model: A `swinv2.SwinTransformerV2`.
        source: A checkpoint path (`.pth`/`.ckpt`/`.safetensors`, a transformers folder) or an already read
            checkpoint or state dict.
        adapt_channels: Load weights trained for another number of input channels (RGB weights into a 13-band
            model, say) by adapting the patch embedding (`adapt_in_chans`); without it that is refused.

    Returns:
        A `LoadReport` with the detected format and the missing, unexpected and dropped keys.

    Raises:
        CheckpointMismatchError: a tensor's shape does not fit the model; the message names key, shapes, cause.
        UnsafeCheckpointError: the file would need pickled code to load (see `swinv2.reading`).
    """
    require_swinv2_parts(model, "load SwinV2 weights into it")
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the checkpoint"
    raw = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    sd, fmt, prefix, outside = official_state_dict(raw)
    report = LoadReport(format=fmt, prefix=prefix, dropped_keys=outside)
    arch = read_architecture(raw, name)
    _check_cosine_attention(sd, name)
    if arch is not None:
        report.windows, how = reference_windows(arch), "recorded in the file"
    else:
        log_spaced = (spacing(sd) or model.architecture()["position_bias"]) == "log_cpb"
        report.windows, how = implied_windows(sd, log_spaced), "implied by its relative_coords_table"
    check_windows(model, report.windows, how, name)

    target = model.state_dict()
    window_buffers = {k for k in target if k.rsplit(".", 1)[-1] in WINDOW_BUFFERS}
    to_load: StateDict = {}
    # The patch embedding first: its shape names the likeliest cause of a mismatch (embed_dim, patch, channels).
    for k, v in sorted(sd.items(), key=lambda kv: (kv[0] != ANCHOR, not kv[0].startswith("patch_embed"))):
        if k.rsplit(".", 1)[-1] in WINDOW_BUFFERS:
            report.dropped_keys[k] = "window buffer, recomputed for the model's window"
        elif k not in target:
            if k.startswith("head.") and not any(t.startswith("head.") for t in target):
                report.dropped_keys[k] = "the model has no classifier head"
            elif k == "mask_token":
                report.dropped_keys[k] = "the model has no mask token"
            else:
                report.unexpected_keys.append(k)
        elif v.shape != target[k].shape:
            if k.startswith("head."):
                report.dropped_keys[k] = (
                    f"classifier of shape {tuple(v.shape)}, the model's is {tuple(target[k].shape)}"
                )
            elif k.endswith("relative_position_bias_table"):
                to_load[k] = resize_bias_table(v, target[k].shape).to(target[k].dtype)
                report.resized_keys.append(k)
            elif k == ANCHOR and _other_channels(v, target[k]):
                if not adapt_channels:
                    raise CheckpointMismatchError(
                        f"{name} was trained on {v.shape[1]}-channel images and the model takes {target[k].shape[1]} "
                        "channels: load it with adapt_channels=True to adapt its patch embedding (adapt_in_chans), or "
                        f"build the model with in_chans={v.shape[1]}"
                    )
                to_load[k] = adapt_in_chans(v, target[k].shape[1]).to(target[k].dtype)
                report.adapted_keys[k] = f"{v.shape[1]} -> {target[k].shape[1]} input channels (adapt_in_chans)"
            else:
                raise CheckpointMismatchError(
                    f"checkpoint key '{prefix}{k}' has shape {tuple(v.shape)} but the model expects "
                    f"{tuple(target[k].shape)}: the checkpoint was probably trained with {_mismatch_hint(k)}. "
                    "Build the model with the checkpoint's configuration (swinv2.create_model_from_checkpoint)."
                )
        else:
            to_load[k] = v
    report.missing_keys = sorted(k for k in target if k not in to_load and k not in window_buffers)
    model.load_state_dict(to_load, strict=False)
    return report


def _other_channels(weight: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether two patch-embedding weights differ in their input channels alone."""
    same_otherwise = weight.shape[:1] + weight.shape[2:] == target.shape[:1] + target.shape[2:]
    return weight.dim() == target.dim() == 4 and weight.shape[1] != target.shape[1] and same_otherwise


def adapt_in_chans(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A patch embedding's weight (E, C, p, p) for N = `in_chans` input channels, exact where the two images are
    copies of each other by cyclic repetition:

    - more channels (N > C): an N-channel image whose channel k is channel k mod C of a C-channel image embeds as
      that image did. Channel k takes the weights of channel k mod C, divided by the number of channels sharing
      them.
    - fewer (N < C): an N-channel image embeds as the C-channel image whose channel c is its channel c mod N. Channel
      k takes the sum of the weights of the channels c with c mod N = k (N = 1: all of them, so a gray image embeds
      as its RGB copy).

    timm's `adapt_input_conv` sums for one channel, as here, and otherwise repeats the weights and scales them all
    by C / N: the same when N is a multiple of C, but for 13 bands from RGB its first channel's weights are shared
    by five bands and the others' by four, so a repeated image does not embed as the RGB one did."""
    if weight.dim() != 4 or in_chans < 1:
        raise ValueError(f"adapt_in_chans takes a (E, C, p, p) weight and in_chans >= 1, got {tuple(weight.shape)}")
    out_dim, channels = weight.shape[:2]
    adapted = weight.new_zeros(out_dim, in_chans, *weight.shape[2:])
    if in_chans >= channels:
        shared = [len(range(c, in_chans, channels)) for c in range(channels)]
        for k in range(in_chans):
            adapted[:, k] = weight[:, k % channels] / shared[k % channels]
    else:
        for c in range(channels):
            adapted[:, c % in_chans] += weight[:, c]
    return adapted


def _heads(sd: StateDict, prefix: str) -> int:
    """A block's head count from whichever per-head tensor the attention has."""
    for name, axis in (("logit_scale", 0), ("cpb_mlp.2.weight", 0), ("relative_position_bias_table", 1)):
        if prefix + name in sd:
            return sd[prefix + name].shape[axis]
    raise CheckpointMismatchError(f"no per-head tensor under {prefix!r}: not a SwinV2 state dict")


def infer_architecture(sd: StateDict) -> Dict[str, Any]:
    """What an official-layout state dict without a record shows of its architecture: channels, depths, heads,
    patch size, classes, MLP ratio, extra norms, position-bias type, mask token, pre- or post-norm (by the patch
    merging norm's width), cosine or dot attention (by `logit_scale`), and the window and pretraining
    window of each stage where its buffers tell (`relative_coords_table`, else `relative_position_index`). The image
    size shows only through `absolute_pos_embed` or a shifted block's `attn_mask` (whose window count gives the
    image size padded to a whole number of windows: the official recipes' sizes are such multiples)."""
    proj = sd[ANCHOR]  # (C, in_chans, p, p)
    if proj.dim() != 4 or proj.shape[-1] != proj.shape[-2]:
        raise MalformedRecordError(f"{ANCHOR} has shape {tuple(proj.shape)}, not (C, in_chans, p, p): not a SwinV2")
    blocks: Dict[int, int] = {}  # stage -> highest block index, bounded before any loop over them
    for k in sd:
        if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k):
            stage, block = int(m.group(1)), int(m.group(2))
            if stage >= ARCHITECTURE_LIMITS["stages"][1] or block >= ARCHITECTURE_LIMITS["depth"][1]:
                raise MalformedRecordError(f"key {k!r} names stage {stage}, block {block}: beyond any SwinV2")
            blocks[stage] = max(blocks.get(stage, -1), block)
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise MalformedRecordError(f"the file's blocks are in stages {sorted(blocks)}, not stages 0, 1, ...")
    stages = len(blocks)
    depths = [blocks[i] + 1 for i in range(stages)]
    norm3 = [int(m.group(1)) for k in sd if (m := re.match(r"layers\.\d+\.blocks\.(\d+)\.norm3\.weight", k))]
    arch: Dict[str, Any] = dict(
        patch_size=proj.shape[-1],
        in_chans=proj.shape[1],
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        embed_dim=proj.shape[0],
        depths=depths,
        num_heads=[_heads(sd, f"layers.{i}.blocks.0.attn.") for i in range(stages)],
        mlp_ratio=sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / proj.shape[0],
        qkv_bias="layers.0.blocks.0.attn.q_bias" in sd,
        ape="absolute_pos_embed" in sd,
        patch_norm="patch_embed.norm.weight" in sd,
        extra_norm_period=min(norm3) + 1 if norm3 else 0,
        position_bias="table"
        if "layers.0.blocks.0.attn.relative_position_bias_table" in sd
        else spacing(sd) or "log_cpb",
        mask_token="mask_token" in sd,
    )
    tables = [sd.get(f"layers.{i}.blocks.0.attn.relative_coords_table") for i in range(stages)]
    index = [sd.get(f"layers.{i}.blocks.0.attn.relative_position_index") for i in range(stages)]
    if all(t is not None for t in tables):  # (1, 2Wh-1, 2Ww-1, 2)
        arch["window_size"] = [[(t.shape[1] + 1) // 2, (t.shape[2] + 1) // 2] for t in tables]
        implied = implied_windows(sd, arch["position_bias"] == "log_cpb")
        arch["pretrained_window_sizes"] = [list(p) for p in implied]
    elif all(t is not None for t in index):  # N = Wh * Ww: square windows, as in every released checkpoint
        arch["window_size"] = [[math.isqrt(t.shape[0])] * 2 for t in index]
    if arch["ape"]:
        n = math.isqrt(sd["absolute_pos_embed"].shape[1])
        arch["img_size"] = [n * arch["patch_size"]] * 2
    elif "layers.0.blocks.1.attn_mask" in sd and "window_size" in arch:
        windows_per_side = math.isqrt(sd["layers.0.blocks.1.attn_mask"].shape[0])  # square images, as released
        arch["img_size"] = [windows_per_side * w * arch["patch_size"] for w in arch["window_size"][0]]
    return arch


def create_model_from_checkpoint(
    source: Source, strict: bool = True, name: Optional[str] = None, **overrides: Any
) -> SwinTransformerV2:
    """Build the model a weights file was written from, and load it.

    The architecture comes from the file's record (every file this project writes has one); for other files
    (official, SimMIM, timm) it is inferred from the keys, and what they cannot show (the image size, for timm
    files also the window) must be given in `overrides`. Changing the window in `overrides` without
    `pretrained_window_sizes` keeps the file's position-bias windows as the pretraining windows (window transfer).

    Args:
        source: A path or an already read checkpoint.
        strict: Raise if the model and the file do not have exactly the same weights (set False when `overrides`
            change the head or drop the mask token).
        name: What errors call the file (default: its path, or "the checkpoint" for one already read).
        **overrides: `SwinTransformerV2` arguments that replace the recorded ones (`num_classes`, `window_size`,
            `img_size`, `drop_path_rate`, `use_checkpoint`, ...).

    Returns:
        The model, with the `LoadReport` as `model.load_report`.
    """
    name = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the checkpoint")
    raw = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    arch = read_architecture(raw, name)
    if arch is None:
        try:
            arch = check_architecture(infer_architecture(official_state_dict(raw)[0]), name)
        except (KeyError, IndexError, ZeroDivisionError, CheckpointMismatchError) as e:
            raise MalformedRecordError(f"{name}: its keys do not describe a SwinV2 ({type(e).__name__}: {e})") from None
    arch.pop("variant", None)
    if "window_size" in overrides and "pretrained_window_sizes" not in overrides and "window_size" in arch:
        overrides["pretrained_window_sizes"] = [list(w) for w in reference_windows(arch)]
    kwargs = {**arch, **overrides}
    unknown = [k for k in ("img_size", "window_size") if k not in kwargs]
    if unknown:
        raise ValueError(
            f"{name} records no architecture and its keys do not show {' or '.join(unknown)}: pass "
            + ", ".join(f"{k}=..." for k in unknown)
            + " (the values it was trained with)"
        )
    model = SwinTransformerV2(**check_architecture(kwargs, name, (*RECORD_FIELDS, *OPTION_FIELDS)))
    model.load_report = load_pretrained(model, raw)
    if strict and (model.load_report.missing_keys or model.load_report.unexpected_keys):
        raise CheckpointMismatchError(
            f"{name} does not fill the model it describes exactly: {model.load_report}. Pass strict=False if the "
            "overrides change the head or the mask token on purpose."
        )
    return model
