"""Swin V1's block design for the activation study (`simmim.eval.block_designs`): pre-norm blocks and merging
(`norm_position="pre"`) and scaled dot-product attention (`attention="dot"`). Checked against timm's Swin V1, through
every attention path, through its own record, and refused by `swinv2`'s loaders; SwinV2 itself is checked by the
timm V2 parity tests."""

import re

import pytest
import torch
from conftest import TINY, assert_same_values_and_grads, randomize_, values_and_grads
from timm.models.swin_transformer import SwinTransformer as TimmSwinV1

import swinv2
from simmim.eval.block_designs import build, design_of, load, save
from swinv2.checkpoint import CheckpointMismatchError

V1_DESIGN = dict(norm_position="pre", attention="dot")
DESIGNS = [
    dict(norm_position="post", attention="cosine"),
    dict(norm_position="pre", attention="cosine"),
    dict(norm_position="post", attention="dot"),
    V1_DESIGN,
]


def _from_timm_v1(sd):
    """timm Swin V1 keys -> ours: downsample at the end of the previous stage, qkv bias split into q and v (the
    k bias adds the same q.b_k to every logit of a row, which softmax ignores)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        if k.endswith("attn.qkv.bias"):
            c = v.shape[0] // 3
            out[k.replace("qkv.bias", "q_bias")], out[k.replace("qkv.bias", "v_bias")] = v[:c], v[2 * c :]
        elif not k.endswith("relative_position_index"):
            out[k] = v
    return out


@pytest.mark.parametrize("img_size", [64, 72])  # 72: 18x18 tokens, padded to whole windows
def test_pre_norm_dot_table_matches_timm_swin_v1(img_size):
    arch = dict(img_size=img_size, patch_size=4, embed_dim=24, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=4)
    theirs = randomize_(TimmSwinV1(**arch, num_classes=0), seed=3).eval()
    ours = build(**arch, num_classes=0, position_bias="table", **V1_DESIGN).eval()
    missing, unexpected = ours.load_state_dict(_from_timm_v1(theirs.state_dict()), strict=False)
    assert unexpected == [] and all(k.endswith(("relative_position_index", "attn_mask")) for k in missing)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        f_ours, f_timm = ours.forward_features(x), theirs.forward_features(x)
    assert f_ours.shape == f_timm.shape
    torch.testing.assert_close(f_ours, f_timm, atol=1e-4, rtol=1e-4)
    assert f_ours.std() > 0.1
    # The same weights read as post-norm cosine attention give something else: the options are live.
    v2 = swinv2.SwinTransformerV2(**arch, num_classes=0, position_bias="table")
    v2.load_state_dict({k: v for k, v in ours.state_dict().items() if "downsample.norm" not in k}, strict=False)
    with torch.no_grad():
        assert (v2.eval().forward_features(x) - f_timm).abs().max() > 0.1


@pytest.mark.parametrize("design", DESIGNS, ids=lambda d: f"{d['norm_position']}-{d['attention']}")
def test_every_design_trains_every_parameter(design):
    model = randomize_(build(**TINY, **design))
    assert (model.layers[0].blocks[0].attn.logit_scale is None) == (design["attention"] == "dot")
    assert design_of(model) == design
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_pre_norm_init_keeps_unit_norms_and_blocks_are_not_identities():
    model = build(**TINY, norm_position="pre")
    blk = model.layers[0].blocks[0]
    assert torch.equal(blk.norm1.weight, torch.ones(24)) and torch.equal(blk.norm2.weight, torch.ones(24))
    assert model.layers[0].downsample.norm.weight.shape == (4 * 24,)  # V1 merging: LayerNorm(4C), then reduction
    x = torch.randn(2, 8, 8, 24)
    with torch.no_grad():
        assert (blk(x) - x).abs().max() > 1e-3


def _set(model, **attrs):
    for m in model.modules():
        if hasattr(m, "chunk_size"):
            for k, v in attrs.items():
                setattr(m, k, v)


@pytest.mark.parametrize("path", ["chunked", "fused", "checkpointed"])
def test_v1_design_gives_the_same_values_and_gradients_on_every_attention_path(path):
    model = randomize_(build(**{**TINY, "img_size": 48}, fused_attn=False, **V1_DESIGN))
    x = torch.randn(2, 3, 48, 48)
    reference = values_and_grads(model, x)
    if path == "chunked":
        _set(model, chunk_size=2)
    elif path == "fused":
        _set(model, fused=True)
    else:
        model.set_grad_checkpointing(True)
    assert_same_values_and_grads(values_and_grads(model, x), reference)


@pytest.mark.slow
def test_v1_design_compiled_attention_matches_eager():
    model = randomize_(build(**TINY, **V1_DESIGN))
    x = torch.randn(2, 3, 32, 32)
    reference = values_and_grads(model, x)
    model.compile_attention()
    assert_same_values_and_grads(values_and_grads(model, x), reference, atol=1e-4)


def test_the_same_seed_gives_every_design_the_same_shared_weights():
    """The study compares designs from the same initial weights: the parts draw nothing of their own."""
    torch.manual_seed(0)
    v2 = swinv2.SwinTransformerV2(**TINY).state_dict()
    torch.manual_seed(0)
    v1 = build(**TINY, **V1_DESIGN).state_dict()
    shared = [k for k in v1 if "norm" not in k and k in v2]
    assert len(shared) > 20 and all(torch.equal(v1[k], v2[k]) for k in shared)


ONE_STAGE = {**TINY, "depths": (2,), "num_heads": (2,)}  # no patch merging: pre-norm shows in no tensor's shape


@pytest.mark.parametrize("arch", [TINY, ONE_STAGE], ids=["two stages", "one stage"])
@pytest.mark.parametrize("design", DESIGNS[1:], ids=lambda d: f"{d['norm_position']}-{d['attention']}")
def test_its_record_rebuilds_the_design_and_swinv2_refuses_the_file(tmp_path, design, arch):
    model = randomize_(build(**arch, **design))
    path = save(tmp_path / "design.safetensors", model)
    rebuilt = load(path)
    assert design_of(rebuilt) == design and rebuilt.architecture() == model.architecture()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))
    # Read as SwinV2, the weights would mean something else: swinv2 finds no SwinV2 weights in the file.
    with pytest.raises(CheckpointMismatchError, match="not a SwinV2 checkpoint"):
        swinv2.load_pretrained(swinv2.SwinTransformerV2(**arch), path)
    with pytest.raises(ValueError, match="not a SwinV2 checkpoint"):  # a MalformedRecordError saying so
        swinv2.create_model_from_checkpoint(path)


@pytest.mark.parametrize("design", DESIGNS[1:], ids=lambda d: f"{d['norm_position']}-{d['attention']}")
def test_swinv2_neither_records_exports_nor_loads_a_model_of_another_design(tmp_path, design):
    model = build(**TINY, **design)
    with pytest.raises(ValueError, match="cannot record the architecture: the model has parts of another"):
        swinv2.save_weights(tmp_path / "w.safetensors", model)
    with pytest.raises(ValueError, match="cannot record the architecture"):
        swinv2.architecture(model)
    with pytest.raises(ValueError, match="cannot export it in timm's layout"):
        swinv2.to_timm_state_dict(model)
    v2 = swinv2.save_weights(tmp_path / "v2.safetensors", swinv2.SwinTransformerV2(**TINY))
    with pytest.raises(ValueError, match="cannot load SwinV2 weights into it"):
        swinv2.load_pretrained(model, v2)
    assert not (tmp_path / "w.safetensors").exists()


def test_a_plain_state_dict_of_another_design_is_refused_by_its_keys_and_shapes():
    """Without any file (a state dict handed over): dot-product attention has no logit_scale, V1's merging a 4C
    norm. (A single-stage pre-norm state dict has neither: only the record of `save` can tell it.)"""
    for design, reason in (
        (dict(attention="dot"), "without logit_scale"),
        (dict(norm_position="pre"), "patch merging"),
    ):
        state = randomize_(build(**TINY, **design)).state_dict()
        with pytest.raises(CheckpointMismatchError, match=reason):
            swinv2.load_pretrained(swinv2.SwinTransformerV2(**TINY), state)


def test_a_file_without_its_record_is_refused_by_load(tmp_path):
    path = swinv2.save_weights(tmp_path / "v2.safetensors", swinv2.SwinTransformerV2(**TINY))
    with pytest.raises(swinv2.reading.MalformedRecordError, match="simmim.block_design"):
        load(path)


def test_bad_design_values_are_named():
    with pytest.raises(ValueError, match="norm_position must be one of"):
        build(**TINY, norm_position="sandwich")
    with pytest.raises(ValueError, match="attention must be one of"):
        build(**TINY, attention="linear")
