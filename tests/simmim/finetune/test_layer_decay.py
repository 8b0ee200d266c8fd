"""Layer-wise LR decay groups against a hand-computed table (official `get_swin_layer` mapping)."""

import pytest
import torch
from conftest import TINY

import swinv2
from simmim.finetune.layer_decay import layer_decay_param_groups, swin_layer_id


def test_layer_ids_hand_computed_for_depths_2_2():
    # depths (2, 2): ids 0 (embed), blocks 1-2, downsample 2, blocks 3-4, norm/head 5 = sum(depths) + 1.
    depths = (2, 2)
    table = {
        "mask_token": 0,
        "patch_embed.proj.weight": 0,
        "layers.0.blocks.0.attn.qkv.weight": 1,
        "layers.0.blocks.1.norm1.weight": 2,
        "layers.0.downsample.reduction.weight": 2,
        "layers.0.downsample.norm.bias": 2,
        "layers.1.blocks.0.mlp.fc1.weight": 3,
        "layers.1.blocks.1.attn.logit_scale": 4,
        "norm.weight": 5,
        "head.weight": 5,
        "absolute_pos_embed": 5,  # the official map does not name it: it falls to the last id, as norm and head
    }
    assert {k: swin_layer_id(k, depths) for k in table} == table


def test_groups_scale_and_weight_decay():
    model = swinv2.SwinTransformerV2(**TINY, mask_token=True)
    groups = layer_decay_param_groups(model.named_parameters(), (2, 2), 0.05, 0.75, model.no_weight_decay())
    by_name = {n: g for g in groups for n in g["names"]}
    expected_scale = {
        "patch_embed.proj.weight": 0.75**5,
        "layers.0.blocks.0.attn.qkv.weight": 0.75**4,
        "layers.0.downsample.reduction.weight": 0.75**3,
        "layers.1.blocks.1.mlp.fc2.weight": 0.75**1,
        "head.weight": 1.0,
    }
    for name, scale in expected_scale.items():
        assert by_name[name]["lr_scale"] == pytest.approx(scale), name
        assert by_name[name]["weight_decay"] == 0.05
    for name in (
        "head.bias",
        "norm.weight",
        "mask_token",
        "layers.0.blocks.0.attn.logit_scale",
        "layers.0.blocks.0.attn.cpb_mlp.0.weight",
    ):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(isinstance(p, torch.nn.Parameter) for g in groups for p in g["params"])
