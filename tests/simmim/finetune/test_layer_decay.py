"""Layer-wise LR decay groups against a hand-computed table (official `get_swin_layer` mapping), the depth rule of
the default recipe, and the from-scratch recipe."""

import pytest
import torch
from conftest import TINY
from omegaconf import OmegaConf

import swinv2
from simmim.cli import CONFIG_DIR
from simmim.finetune import main
from simmim.optim import depth_scaled_decay, layer_decay_param_groups, swin_layer_id


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


def test_depth_scaled_decay_keeps_the_lowest_layers_share():
    for depth in (4, 8, 12, 24, 48):
        decay = depth_scaled_decay(0.9, depth, 8)
        assert decay ** (depth + 1) == pytest.approx(0.9**9)
    assert depth_scaled_decay(0.75, 24, None) == 0.75  # the official recipes: as written, at their own depth
    with pytest.raises(ValueError, match="layer_decay_depth"):
        depth_scaled_decay(0.9, 8, 0)


def _fit_one_step(tmp_path, digits, pretrained, *extra):
    return main(
        [
            "--model.pretrained",
            str(pretrained),
            "--data.root",
            digits,
            "--data.img_size",
            "32",
            "--model.window_size",
            "4",
            "--trainer.max_steps",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--data.num_workers",
            "0",
            "--trainer.default_root_dir",
            str(tmp_path),
            *extra,
        ]
    )


@pytest.mark.slow
def test_default_recipe_scales_layer_decay_with_depth_and_scratch_gets_none(tmp_path, capsys, digits32):
    """The default config's optimizer: the lowest layer's share of the learning rate is the same at 8 and 12
    blocks (decay ** (layer_decay_depth + 1)); a run from scratch has no layer decay and says so."""
    digits = digits32
    recipe = OmegaConf.load(CONFIG_DIR / "finetune/default.yaml").model
    share = recipe.layer_decay ** (recipe.layer_decay_depth + 1)
    for depths in ([2, 2, 2, 2], [2, 2, 6, 2]):
        kwargs = dict(embed_dim=recipe.encoder_kwargs.embed_dim, depths=depths, num_heads=[2, 4, 8, 16])
        encoder = swinv2.create_model("swinv2_tiny", img_size=32, window_size=4, num_classes=0, **kwargs)
        export = swinv2.save_weights(tmp_path / f"{sum(depths)}" / "encoder.safetensors", encoder)
        cli = _fit_one_step(
            tmp_path / f"run{sum(depths)}", digits, export, "--model.encoder_kwargs.depths", str(depths)
        )
        scales = {g["layer_id"]: g["lr_scale"] for g in cli.trainer.optimizers[0].param_groups}
        assert scales[0] == pytest.approx(share), depths  # patch embedding and mask token: the lowest layer
        assert scales[sum(depths) + 1] == 1.0  # the head
        per_layer = share ** (1 / (sum(depths) + 1))  # the same step between neighbouring layers everywhere
        assert scales == pytest.approx({i: per_layer ** (sum(depths) + 1 - i) for i in range(sum(depths) + 2)})
    cli = _fit_one_step(tmp_path / "scratch", digits, "null")
    assert {g["lr_scale"] for g in cli.trainer.optimizers[0].param_groups} == {1.0}
    assert "from scratch (--model.pretrained null): the from-scratch recipe" in capsys.readouterr().out
    cli = _fit_one_step(tmp_path / "scratch_told", digits, "null", "--model.scratch_layer_decay", "null")
    assert min(g["lr_scale"] for g in cli.trainer.optimizers[0].param_groups) == pytest.approx(share)
