"""Key layouts of SwinV2 weights: find the state dict in a checkpoint, detect its layout, convert it.

Layouts (documented in docs/checkpoints.md):
- ours = the official microsoft/Swin-Transformer layout (also wrapped in `{"model": ...}`, also with the old
  `rpe_mlp` names);
- an official SimMIM pretraining checkpoint (`encoder.` prefix, `decoder.*` dropped);
- timm's `SwinTransformerV2` (downsample at the start of stages 1-3, `head.fc`);
- HuggingFace transformers' `Swinv2Model`, `Swinv2ForImageClassification` (`classifier` -> head) and
  `Swinv2ForMaskedImageModeling` (decoder dropped): separate query/key/value, `swinv2.` prefix;
- any of the above behind a prefix such as `module.` (DDP) or `model.encoder.` (Lightning).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch
import torch.nn.functional as F

from swinv2.model import require_swinv2_parts

StateDict = Dict[str, torch.Tensor]

# Buffers that depend on the window and input size: always recomputed by the model that loads the weights.
WINDOW_BUFFERS = ("relative_coords_table", "relative_position_index", "attn_mask")
ANCHOR = "patch_embed.proj.weight"  # present in every SwinV2 checkpoint; locates the key prefix
HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"  # its name in transformers' layout

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


class CheckpointMismatchError(ValueError):
    """A checkpoint tensor does not fit the model (different architecture or configuration)."""


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


# transformers `Swinv2Config` fields whose other values this SwinV2 does not implement
HF_FIXED = {"hidden_act": "gelu", "use_absolute_embeddings": False, "layer_norm_eps": 1e-5}


def transformers_config_kwargs(config: Union[str, os.PathLike, Mapping]) -> Dict:
    """`SwinTransformerV2` keyword arguments for a transformers `Swinv2Config` (a `config.json` path or its dict).

    `num_classes` is the number of labels for `Swinv2ForImageClassification` checkpoints, else 0 (features only);
    override it for fine-tuning. Raises ValueError for settings this implementation does not reproduce.
    """
    if not isinstance(config, Mapping):
        with open(config) as f:
            config = json.load(f)
    for key, ours in HF_FIXED.items():
        value = config.get(key, ours)
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


def official_state_dict(obj: Mapping) -> Tuple[StateDict, str, str, Dict[str, str]]:
    """The encoder weights of a read checkpoint, prefix stripped, in the official layout.

    Returns:
        (state dict, detected format, stripped prefix, {key: reason} for entries outside the encoder prefix).
    """
    sd, prefix, transformers = _unwrap(obj)
    outside = {k: f"outside the encoder prefix {prefix!r}" for k in sd if not k.startswith(prefix)}
    sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    fmt = "transformers" if transformers else _detect_format(sd, prefix)
    return convert_to_official(sd, fmt), fmt, prefix, outside


def resize_bias_table(table: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Bicubic resize of a Swin V1 relative-position bias table ((2W-1)^2, nH) to a new window."""
    (n_src, heads), (n_dst, _) = table.shape, shape
    s, d = int(n_src**0.5), int(n_dst**0.5)
    grid = table.float().T.reshape(1, heads, s, s)
    return F.interpolate(grid, size=(d, d), mode="bicubic", align_corners=False).reshape(heads, d * d).T


def to_timm_state_dict(model: torch.nn.Module) -> StateDict:
    """Export `model` in timm's `SwinTransformerV2` layout, which timm loads with `strict=True`.

    Raises:
        ValueError: the model uses a feature timm's SwinV2 does not have (non-log CPB, extra norms, APE), or parts
            of another block design.
    """
    require_swinv2_parts(model, "export it in timm's layout")
    keys = model.state_dict().keys()
    extras = sorted({n for n in ("norm3", "absolute_pos_embed") for k in keys if n in k})
    bias = model.architecture()["position_bias"]
    if bias != "log_cpb" or extras:
        raise ValueError(
            "timm's SwinTransformerV2 has only log-spaced CPB, no extra main-branch norms and no absolute position "
            f"embedding; this model has position_bias={bias!r} and {extras or 'no'} extra parameters"
        )
    out = {}
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[-1] in WINDOW_BUFFERS or k == "mask_token":
            continue  # non-persistent in timm / not part of timm's model
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        k = re.sub(r"^head\.", "head.fc.", k)
        out[k] = v
    return out


def transformers_config(model: torch.nn.Module) -> Dict[str, Any]:
    """The transformers `Swinv2Config` fields (`config.json`) that rebuild `model` as transformers' `Swinv2Model`
    (with a head: `Swinv2ForImageClassification`, whose labels the caller adds).

    transformers' Swinv2 has one window for every stage, clamped to a stage's map height (`min(H_i, window)`), square
    windows, the log-spaced continuous position bias, a LayerNorm after the patch embedding, and neither extra
    main-branch norms (SwinV2-H/G) nor an absolute position embedding.

    Raises:
        ValueError: naming every part of `model` transformers' Swinv2 cannot express (a folder written anyway would
            load without an error and compute something else).
    """
    require_swinv2_parts(model, "export it in transformers' layout")
    arch = model.architecture()
    problems: List[str] = []
    if arch["extra_norm_period"]:
        problems.append(f"a LayerNorm on the main branch every {arch['extra_norm_period']} blocks (SwinV2-H/G)")
    if arch["position_bias"] != "log_cpb":
        problems.append(f"the position bias {arch['position_bias']!r} (it has only the log-spaced continuous one)")
    if arch["ape"]:
        problems.append("an absolute position embedding")
    if not arch["patch_norm"]:
        problems.append("no LayerNorm after the patch embedding")
    windows, pretrained = arch["window_size"], arch["pretrained_window_sizes"]
    if any(h != w for h, w in windows + pretrained):
        problems.append(f"non-square windows {windows} (pretrained {pretrained})")
    if any((p or w) == 1 for (w, _), (p, _) in zip(windows, pretrained)):
        problems.append(f"a position-bias window of 1 (windows {windows}, pretrained {pretrained}): it divides the "
                        "coordinates by the window - 1, and gives NaN")  # fmt: skip
    window = windows[0][0]
    grid = [side // arch["patch_size"] for side in arch["img_size"]]
    if any(side % model.encoder_stride for side in arch["img_size"]):
        problems.append(f"an image size {arch['img_size']} whose feature maps halve to an odd size")
    for i, layer in enumerate(model.layers):
        res = [side // 2**i for side in grid]
        theirs = [min(r, window) for r in res]  # transformers' `_compute_window_shift`: the height's, both axes
        for j, block in enumerate(layer.blocks):
            shift = 0 if res[0] <= theirs[0] or j % 2 == 0 else window // 2
            if (tuple(block.window_size), tuple(block.shift_size)) != ((theirs[0],) * 2, (shift,) * 2):
                problems.append(
                    f"stage {i + 1}'s window {list(block.window_size)} and shift {list(block.shift_size)}: its one "
                    f"window ({window}), clamped to the map's height, gives {theirs[0]} and shift {shift}"
                )
                break
        if any(r % theirs[0] for r in res):
            problems.append(f"stage {i + 1}'s {res[0]}x{res[1]} map, not whole windows of {theirs[0]} (it pads "
                            "before the shift, this model after)")  # fmt: skip
        if problems and problems[-1].startswith(f"stage {i + 1}"):
            break
    if problems:
        raise ValueError(f"transformers' Swinv2 cannot express {'; '.join(problems)}")
    img = arch["img_size"]
    return dict(
        model_type="swinv2",
        image_size=img[0] if img[0] == img[1] else list(img),
        patch_size=arch["patch_size"],
        num_channels=arch["in_chans"],
        embed_dim=arch["embed_dim"],
        depths=list(arch["depths"]),
        num_heads=list(arch["num_heads"]),
        window_size=window,
        pretrained_window_sizes=[p for p, _ in pretrained],
        mlp_ratio=arch["mlp_ratio"],
        qkv_bias=arch["qkv_bias"],
        **HF_FIXED,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.1,
        encoder_stride=model.encoder_stride,
    )


def to_transformers_state_dict(model: torch.nn.Module, prefix: str = "") -> StateDict:
    """`model`'s weights in transformers' Swinv2 layout (the inverse of `from_transformers`): the encoder's keys
    behind `prefix` (`"swinv2."` inside `Swinv2ForImageClassification` and `Swinv2ForMaskedImageModeling`, `""` for
    `Swinv2Model`), a head as `classifier.*`, the mask token as `embeddings.mask_token`; `attn.qkv` split into
    query, key and value (key without a bias). The window buffers are left out: transformers computes its own.
    Call `transformers_config` first: it refuses what this layout cannot hold."""
    block_names = tuple((new, old) for old, new in _HF_BLOCK_NAMES if not old.startswith("attention.self.relative_"))
    top_names = tuple((new, old) for old, new in _HF_TOP_NAMES)
    out: StateDict = {}
    for key, v in model.state_dict().items():
        if key.rsplit(".", 1)[-1] in WINDOW_BUFFERS:
            continue
        if key.startswith("head."):
            out["classifier." + key[len("head.") :]] = v
            continue
        block = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", key)
        if block:
            head, rest = f"encoder.layers.{block.group(1)}.blocks.{block.group(2)}.", block.group(3)
            if rest == "attn.qkv.weight":
                for name, part in zip(("query", "key", "value"), v.chunk(3)):
                    out[f"{prefix}{head}attention.self.{name}.weight"] = part
                continue
            out[prefix + head + _rename_start(rest, block_names)] = v
        elif key.startswith("layers."):
            out[prefix + "encoder." + key] = v  # downsample: at the end of stages 0..N-2 in both layouts
        else:
            out[prefix + _rename_start(key, top_names)] = v
    return out
