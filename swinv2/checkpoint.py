"""Load SwinV2 weights from any common checkpoint format, and export to timm's layout.

Formats (key layouts in REFERENCE.md):
- ours / official microsoft/Swin-Transformer (also wrapped in `{"model": ...}`, also with the old `rpe_mlp` names);
- an official SimMIM pretraining checkpoint (`encoder.` prefix, `decoder.*` dropped);
- timm's `SwinTransformerV2` (downsample at the start of stages 1-3, `head.fc`);
- HuggingFace transformers' `Swinv2Model`, `Swinv2ForImageClassification` (`classifier` -> head) and
  `Swinv2ForMaskedImageModeling` (decoder dropped): separate query/key/value, `swinv2.` prefix;
- any of the above as `.safetensors`, or behind a prefix such as `module.` (DDP) or `model.encoder.` (Lightning).

Files are read with `torch.load(weights_only=True)`, or, for official checkpoints that also pickle their yacs
config, with an unpickler restricted to the same allowlist: no pickled code is ever run.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple, Union

import torch
import torch.nn.functional as F
from torch import _weights_only_unpickler

StateDict = Dict[str, torch.Tensor]

# Buffers that depend on the window and input size: always recomputed by the model that loads the weights.
WINDOW_BUFFERS = ("relative_coords_table", "relative_position_index", "attn_mask")
ANCHOR = "patch_embed.proj.weight"  # present in every SwinV2 checkpoint; locates the key prefix
HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"  # its name in transformers' layout
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what a transformers hub folder holds

# transformers' names inside a block -> official names (query/key/value weights are concatenated separately).
_HF_BLOCK_NAMES = (
    ("attention.self.logit_scale", "attn.logit_scale"),
    ("attention.self.continuous_position_bias_mlp.", "attn.cpb_mlp."),
    ("attention.self.query.bias", "attn.q_bias"),
    ("attention.self.value.bias", "attn.v_bias"),
    ("attention.self.relative_", "attn.relative_"),  # window buffers, if an older version saved them
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_HF_TOP_NAMES = (
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("embeddings.norm.", "patch_embed.norm."),
    ("embeddings.mask_token", "mask_token"),
    ("layernorm.", "norm."),
)


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
    """

    format: str
    prefix: str = ""
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    dropped_keys: Dict[str, str] = field(default_factory=dict)
    resized_keys: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"format={self.format!r} prefix={self.prefix!r}"]
        for name in ("missing_keys", "unexpected_keys", "resized_keys"):
            keys = getattr(self, name)
            lines.append(f"{name} ({len(keys)}): {keys[:20]}{' ...' if len(keys) > 20 else ''}")
        lines.append(f"dropped_keys: {len(self.dropped_keys)}")
        return "\n".join(lines)


class CheckpointMismatchError(ValueError):
    """A checkpoint tensor does not fit the model (different architecture or configuration)."""


class _Inert(dict):
    """Stands in for any non-allowlisted global in a checkpoint (e.g. the yacs `CfgNode` holding the official
    config): it accepts construction, items, appends and state, and runs nothing."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def __setstate__(self, state) -> None:
        self["__state__"] = state

    def append(self, item) -> None:
        self.setdefault("__items__", []).append(item)

    def extend(self, items) -> None:
        self.setdefault("__items__", []).extend(items)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals torch's `weights_only` loader allows; every other global becomes `_Inert`,
    so no function named in the file (os.system, ...) can ever be called."""

    def find_class(self, module: str, name: str):
        allowed = _weights_only_unpickler._get_allowed_globals()
        if f"{module}.{name}" in allowed:
            return allowed[f"{module}.{name}"]
        return _Inert


class _RestrictedPickle:
    """A `pickle_module` for `torch.load` built around `_RestrictedUnpickler`."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(lambda f, **kw: _RestrictedUnpickler(f, **kw).load())
    __name__ = "restricted_pickle"


def read_checkpoint(path: Union[str, os.PathLike]) -> Mapping:
    """Read a `.safetensors` or torch checkpoint file without executing any pickled code. A folder (a
    transformers hub download) is read through its `model.safetensors` or `pytorch_model.bin`.

    `torch.load(weights_only=True)` first. Official checkpoints also pickle their yacs config, which that loader
    refuses; they are then read with an unpickler that resolves the same allowlist and turns every other global
    into an inert placeholder.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = [os.path.join(path, n) for n in HF_WEIGHT_FILES if os.path.isfile(os.path.join(path, n))]
        if not inside:
            raise FileNotFoundError(f"{path} is a folder without {' or '.join(HF_WEIGHT_FILES)}: pass the file")
        path = inside[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle)


def _unwrap(obj: Mapping) -> Tuple[StateDict, str, bool]:
    """Find the state dict (inside `model`/`state_dict`/`module` wrappers); transformers' keys are renamed to the
    official layout. Returns the tensors, the prefix before `patch_embed`, and whether they were transformers'."""
    for wrapper in ("model", "state_dict", "module"):
        if ANCHOR not in obj and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    hf = [k for k in sd if k.endswith(HF_ANCHOR)]
    transformers = bool(hf) and not any(k.endswith(ANCHOR) for k in sd)
    if transformers:
        sd = from_transformers(sd, min(hf, key=len)[: -len(HF_ANCHOR)])
    anchors = [k for k in sd if k.endswith(ANCHOR)]
    if not anchors:
        raise CheckpointMismatchError(
            f"no '{ANCHOR}' (or transformers' '{HF_ANCHOR}') key found, so this is not a SwinV2 checkpoint in a "
            f"known layout (first keys: {list(obj)[:8]})"
        )
    return sd, min(anchors, key=len)[: -len(ANCHOR)], transformers


def _rename_start(name: str, table: Tuple[Tuple[str, str], ...]) -> str:
    """Replace the first matching leading `old` of `(old, new)` pairs in `table`."""
    for old, new in table:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def from_transformers(sd: StateDict, prefix: str = "swinv2.") -> StateDict:
    """Rename a transformers `Swinv2*` state dict to the official layout, keeping `prefix`.

    query/key/value weights are concatenated into `attn.qkv.weight` (key has no bias, as in the official code);
    `classifier.*` next to the prefix becomes `head.*`. Other keys (the MIM decoder, unknown names) keep their names
    and are reported by `load_pretrained` as dropped or unexpected.
    """
    parent = prefix[: -len("swinv2.")] if prefix.endswith("swinv2.") else prefix
    out: StateDict = {}
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, v in sd.items():
        if key.startswith(parent + "classifier."):
            out[prefix + "head." + key[len(parent + "classifier.") :]] = v
            continue
        if not key.startswith(prefix):
            out[key] = v
            continue
        k = key[len(prefix) :]
        block = re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", k)
        if block:
            head, rest = f"layers.{block.group(1)}.blocks.{block.group(2)}.", block.group(3)
            part = re.fullmatch(r"attention\.self\.(query|key|value)\.weight", rest)
            if part:
                qkv.setdefault(head, {})[part.group(1)] = v
                continue
            k = head + _rename_start(rest, _HF_BLOCK_NAMES)
        elif k.startswith("encoder.layers."):
            k = k[len("encoder.") :]  # downsample: at the end of stages 0..N-2, as in the official code
        else:
            k = _rename_start(k, _HF_TOP_NAMES)
        out[prefix + k] = v
    for head, parts in qkv.items():
        if len(parts) == 3:
            out[prefix + head + "attn.qkv.weight"] = torch.cat([parts[n] for n in ("query", "key", "value")])
        else:
            out.update({f"{prefix}{head}attention.self.{n}.weight": t for n, t in parts.items()})
    return out


def transformers_config_kwargs(config: Union[str, os.PathLike, Mapping]) -> Dict:
    """`SwinTransformerV2` keyword arguments for a transformers `Swinv2Config` (a `config.json` path or its dict).

    `num_classes` is the number of labels for `Swinv2ForImageClassification` checkpoints, else 0 (features only);
    override it for fine-tuning. Raises ValueError for settings this implementation does not reproduce.
    """
    if not isinstance(config, Mapping):
        with open(config) as f:
            config = json.load(f)
    unsupported = {
        "hidden_act": (config.get("hidden_act", "gelu"), "gelu"),
        "layer_norm_eps": (config.get("layer_norm_eps", 1e-5), 1e-5),
        "use_absolute_embeddings": (config.get("use_absolute_embeddings", False), False),
    }
    for key, (value, ours) in unsupported.items():
        if value != ours:
            raise ValueError(f"transformers config has {key}={value!r}; this SwinV2 implements only {ours!r}")
    classifier = "Swinv2ForImageClassification" in (config.get("architectures") or [])
    depths = tuple(config.get("depths", (2, 2, 6, 2)))
    return dict(
        img_size=config.get("image_size", 224),
        patch_size=config.get("patch_size", 4),
        in_chans=config.get("num_channels", 3),
        num_classes=len(config.get("id2label") or {}) if classifier else 0,
        embed_dim=config.get("embed_dim", 96),
        depths=depths,
        num_heads=tuple(config.get("num_heads", (3, 6, 12, 24))),
        window_size=config.get("window_size", 7),
        pretrained_window_sizes=tuple(config.get("pretrained_window_sizes", (0, 0, 0, 0)))[: len(depths)],
        mlp_ratio=config.get("mlp_ratio", 4.0),
        qkv_bias=config.get("qkv_bias", True),
        drop_rate=config.get("hidden_dropout_prob", 0.0),
        attn_drop_rate=config.get("attention_probs_dropout_prob", 0.0),
        drop_path_rate=config.get("drop_path_rate", 0.1),
    )


def _detect_format(sd: StateDict, prefix: str) -> str:
    stages = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.downsample\.", k))}
    if "head.fc.weight" in sd or (stages and min(stages) > 0):
        return "timm"
    return "simmim" if prefix.endswith("encoder.") else "official"


def convert_to_official(sd: StateDict, fmt: str) -> StateDict:
    """Rename keys of a prefix-free state dict in `fmt` layout to the official layout."""
    out = {}
    for k, v in sd.items():
        k = k.replace("rpe_mlp", "cpb_mlp")  # older released checkpoints
        if fmt == "timm":
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
            k = re.sub(r"^head\.fc\.", "head.", k)
        out[k] = v
    return out


def _resize_bias_table(table: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Bicubic resize of a Swin V1 relative-position bias table ((2W-1)^2, nH) to a new window."""
    (n_src, heads), (n_dst, _) = table.shape, shape
    s, d = int(n_src**0.5), int(n_dst**0.5)
    grid = table.float().T.reshape(1, heads, s, s)
    return F.interpolate(grid, size=(d, d), mode="bicubic", align_corners=False).reshape(heads, d * d).T


def _mismatch_hint(key: str) -> str:
    if key.startswith("patch_embed"):
        return "a different embed_dim, patch_size or in_chans"
    if "absolute_pos_embed" in key:
        return "a different img_size with ape=True"
    if key.endswith(("logit_scale", "cpb_mlp.2.weight", "relative_position_bias_table")):
        return "a different num_heads"
    return "a different variant (embed_dim, num_heads or mlp_ratio)"


def load_pretrained(model: torch.nn.Module, source: Union[str, os.PathLike, Mapping]) -> LoadReport:
    """Load SwinV2 weights of any supported format into `model`.

    Window-dependent buffers are dropped from the source and recomputed for the model's own windows, so a
    checkpoint loads at another window size. A classifier head of another size is dropped (fine-tuning).

    Args:
        model: A `swinv2.SwinTransformerV2`.
        source: A checkpoint path (`.pth`/`.ckpt`/`.safetensors`) or an already loaded (state) dict.

    Returns:
        A `LoadReport` with the detected format and the missing, unexpected and dropped keys.

    Raises:
        CheckpointMismatchError: a tensor's shape does not fit the model; the message names key, shapes, cause.
    """
    raw = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    sd, prefix, transformers = _unwrap(raw)
    report = LoadReport(format="", prefix=prefix)
    for k in sd:
        if not k.startswith(prefix):
            report.dropped_keys[k] = f"outside the encoder prefix {prefix!r}"
    sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    report.format = "transformers" if transformers else _detect_format(sd, prefix)
    sd = convert_to_official(sd, report.format)

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
                to_load[k] = _resize_bias_table(v, target[k].shape).to(target[k].dtype)
                report.resized_keys.append(k)
            else:
                raise CheckpointMismatchError(
                    f"checkpoint key '{prefix}{k}' has shape {tuple(v.shape)} but the model expects "
                    f"{tuple(target[k].shape)}: the checkpoint was probably trained with {_mismatch_hint(k)}. "
                    "Build the model with the checkpoint's configuration."
                )
        else:
            to_load[k] = v
    report.missing_keys = sorted(k for k in target if k not in to_load and k not in window_buffers)
    model.load_state_dict(to_load, strict=False)
    return report


def to_timm_state_dict(model: torch.nn.Module) -> StateDict:
    """Export `model` in timm's `SwinTransformerV2` layout, which timm loads with `strict=True`.

    Raises:
        ValueError: the model uses a feature timm's SwinV2 does not have (non-log CPB, extra norms, APE).
    """
    keys = model.state_dict().keys()
    extras = sorted({n for n in ("norm3", "absolute_pos_embed") for k in keys if n in k})
    position_bias = model.layers[0].blocks[0].attn.position_bias
    if position_bias != "log_cpb" or extras:
        raise ValueError(
            "timm's SwinTransformerV2 has only log-spaced CPB, no extra main-branch norms and no absolute position "
            f"embedding; this model has position_bias={position_bias!r} and {extras or 'no'} extra parameters"
        )
    out = {}
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[-1] in WINDOW_BUFFERS or k == "mask_token":
            continue  # non-persistent in timm / not part of timm's model
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        k = re.sub(r"^head\.", "head.fc.", k)
        out[k] = v
    return out
