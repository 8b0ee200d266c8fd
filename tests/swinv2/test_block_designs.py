"""The Swin V1 block designs kept for the paper's comparison: pre-norm (`norm_position="pre"`) and scaled
dot-product attention (`attention="dot"`). Checked against timm's Swin V1, through every attention path, and
through the checkpoint contract; the SwinV2 defaults are checked unchanged by the timm V2 parity tests."""

import re

import pytest
import torch
from conftest import TINY, assert_same_values_and_grads, randomize_, values_and_grads
from timm.models.swin_transformer import SwinTransformer as TimmSwinV1

import swinv2
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
    ours = swinv2.SwinTransformerV2(**arch, num_classes=0, position_bias="table", **V1_DESIGN).eval()
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
    model = randomize_(swinv2.SwinTransformerV2(**TINY, **design))
    assert (model.layers[0].blocks[0].attn.logit_scale is None) == (design["attention"] == "dot")
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_pre_norm_init_keeps_unit_norms_and_blocks_are_not_identities():
    model = swinv2.SwinTransformerV2(**TINY, norm_position="pre")
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
    model = randomize_(swinv2.SwinTransformerV2(**{**TINY, "img_size": 48}, fused_attn=False, **V1_DESIGN))
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
    model = randomize_(swinv2.SwinTransformerV2(**TINY, **V1_DESIGN))
    x = torch.randn(2, 3, 32, 32)
    reference = values_and_grads(model, x)
    model.compile_attention()
    assert_same_values_and_grads(values_and_grads(model, x), reference, atol=1e-4)


def test_design_is_recorded_inferred_and_refused_when_it_does_not_match(tmp_path):
    model = randomize_(swinv2.SwinTransformerV2(**TINY, **V1_DESIGN))
    assert swinv2.SwinTransformerV2(**TINY).architecture()["norm_position"] == "post"
    path = swinv2.save_weights(tmp_path / "v1.safetensors", model)
    rebuilt = swinv2.create_model_from_checkpoint(path)
    assert rebuilt.architecture() == model.architecture()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))
    # Without the record (a plain state dict), the keys show both choices.
    inferred = swinv2.checkpoint.infer_architecture(model.state_dict())
    assert (inferred["norm_position"], inferred["attention"]) == ("pre", "dot")
    # Into a SwinV2 model of the same shapes: refused with both settings named, not loaded with another meaning.
    with pytest.raises(CheckpointMismatchError, match="norm_position='pre'.*attention='dot'"):
        swinv2.load_pretrained(swinv2.SwinTransformerV2(**TINY), path)
    with pytest.raises(ValueError, match="norm_position='pre'"):
        swinv2.to_timm_state_dict(model)
    assert swinv2.architecture(model)["variant"] == "custom"  # not recorded as a SwinV2 variant of its shape


def test_files_without_a_record_are_refused_by_their_keys():
    v2 = randomize_(swinv2.SwinTransformerV2(**TINY)).state_dict()
    dot = randomize_(swinv2.SwinTransformerV2(**TINY, attention="dot")).state_dict()
    with pytest.raises(CheckpointMismatchError, match="attention='dot' \\(the model has 'cosine'\\)"):
        swinv2.load_pretrained(swinv2.SwinTransformerV2(**TINY), dot)
    with pytest.raises(CheckpointMismatchError, match="attention='cosine' \\(the model has 'dot'\\)"):
        swinv2.load_pretrained(swinv2.SwinTransformerV2(**TINY, attention="dot"), v2)
    with pytest.raises(CheckpointMismatchError, match="downsample.norm.*different norm_position"):
        swinv2.load_pretrained(swinv2.SwinTransformerV2(**TINY, norm_position="pre"), v2)
    v1 = randomize_(swinv2.SwinTransformerV2(**TINY, **V1_DESIGN))
    report = swinv2.load_pretrained(swinv2.SwinTransformerV2(**TINY, **V1_DESIGN), v1.state_dict())
    assert report.missing_keys == [] and report.unexpected_keys == []


def test_bad_design_values_are_named():
    with pytest.raises(ValueError, match="norm_position must be one of"):
        swinv2.SwinTransformerV2(**TINY, norm_position="sandwich")
    with pytest.raises(ValueError, match="attention must be one of"):
        swinv2.SwinTransformerV2(**TINY, attention="linear")
