"""Layer-wise learning-rate decay for SwinV2 fine-tuning (official `get_swin_layer` mapping,
docs/recipes.md).

Layer ids: `mask_token` and `patch_embed` 0; block j of stage i `sum(depths[:i]) + j + 1`; the downsample at the
end of stage i `sum(depths[:i+1])`; everything else `sum(depths) + 1`: the final norm and the head, and also
`absolute_pos_embed` (the official map names no other parameter, so it gets the full learning rate). A parameter
of layer id l gets `lr * decay ** (sum(depths) + 1 - l)`, so the lowest layer's share of the learning rate is
`decay ** (sum(depths) + 1)`: 0.75 gives the official 24-block SwinV2-B 0.00075 but an 8-block model 0.075.
`depth_scaled_decay` keeps that share when the depth changes (docs/payoff.md).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from simmim.optim import is_no_decay


def depth_scaled_decay(layer_decay: float, depth: int, reference_depth: Optional[int]) -> float:
    """The per-layer factor for a model of `depth` blocks whose lowest layer gets the share of the learning rate,
    `layer_decay ** (reference_depth + 1)`, that `layer_decay` gives a model of `reference_depth` blocks; None:
    `layer_decay` as it is (the official recipes, written for their own depth)."""
    if reference_depth is None:
        return layer_decay
    if reference_depth < 1:
        raise ValueError(f"--model.layer_decay_depth {reference_depth}: must be a block count (1 or more) or null")
    return layer_decay ** ((reference_depth + 1) / (depth + 1))


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """Layer id of an encoder parameter name in the official layout (no prefix)."""
    if name == "mask_token" or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers."):
        parts = name.split(".")
        stage = int(parts[1])
        if parts[2] == "downsample":
            return sum(depths[: stage + 1])
        return sum(depths[:stage]) + int(parts[3]) + 1
    return sum(depths) + 1


def layer_decay_param_groups(
    named_params: Iterable[Tuple[str, torch.nn.Parameter]],
    depths: Sequence[int],
    weight_decay: float,
    layer_decay: float,
    skip_names: Set[str] = frozenset(),
) -> List[Dict]:
    """AdamW groups keyed by (layer id, decayed?), each with `lr_scale`; 1-D params, biases and `skip_names`
    get no weight decay."""
    last = sum(depths) + 1
    groups: Dict[Tuple[int, bool], Dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        layer = swin_layer_id(name, depths)
        no_decay = is_no_decay(name, p, skip_names)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (last - layer),
                "layer_id": layer,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]
