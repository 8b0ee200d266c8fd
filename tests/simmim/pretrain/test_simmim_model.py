"""MaskGenerator and SimMIM: exact counts, uniformity, and parity with transformers' Swinv2ForMaskedImageModeling."""

import math
from unittest.mock import patch

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, randomize_

import simmim.pretrain.model as model_module
import swinv2
from simmim import MaskGenerator, SimMIM, masked_l1_loss, normalize_target


def test_mask_generator_official_recipe_counts_and_shape():
    gen = MaskGenerator(192, 32, 4, 0.6)
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = gen(rng)
        assert m.shape == (48, 48) and m.dtype == np.uint8
        coarse = m[::8, ::8]
        assert coarse.sum() == math.ceil(36 * 0.6) == 22
        assert np.array_equal(m, coarse.repeat(8, 0).repeat(8, 1))  # whole 32 px mask patches


def test_mask_generator_is_uniform_over_positions():
    gen = MaskGenerator(64, 16, 4, 0.5)  # 16 mask patches, 8 masked
    rng = np.random.default_rng(1)
    freq = np.mean([gen(rng)[::4, ::4] for _ in range(4000)], axis=0)
    assert np.allclose(freq, 0.5, atol=0.04), freq  # 4000 draws: std of each frequency ~0.008


def test_mask_generator_non_square_and_errors():
    m = MaskGenerator((64, 96), 32, 4, 0.6)(np.random.default_rng(0))
    assert m.shape == (16, 24) and m[::8, ::8].sum() == math.ceil(6 * 0.6)
    with pytest.raises(ValueError, match="not divisible by mask_patch_size 32"):
        MaskGenerator(200, 32, 4)
    with pytest.raises(ValueError, match="mask_patch_size 30 is not divisible by model_patch_size 4"):
        MaskGenerator(120, 30, 4)
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskGenerator(64, 32, 4, 1.5)


def test_masked_l1_reduction_written_out():
    pred, target = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    target[0, :, 0, 0] = 5.0
    m = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert masked_l1_loss(pred, target, m).item() == pytest.approx(3 * 5.0 / (1 + 1e-5) / 3)


def test_normalize_target_is_local_zscore():
    x = torch.randn(1, 3, 16, 16) * 3 + 7
    t = normalize_target(x, 47)  # window larger than the image: global statistics per channel
    expected = (x - x.mean((2, 3), keepdim=True)) / (x.var((2, 3), keepdim=True, unbiased=True) + 1e-6).sqrt()
    torch.testing.assert_close(t, expected, atol=1e-4, rtol=1e-4)


def _official_norm_targets(targets, patch_size):
    """The official SimMIM `norm_targets`, written as it is there: square-window average pools."""
    pool = dict(kernel_size=patch_size, stride=1, padding=patch_size // 2)
    mean = F.avg_pool2d(targets, count_include_pad=False, **pool)
    square_mean = F.avg_pool2d(targets**2.0, count_include_pad=False, **pool)
    count = F.avg_pool2d(torch.ones_like(targets), count_include_pad=True, **pool) * patch_size**2
    var = torch.clamp((square_mean - mean**2.0) * (count / (count - 1)), min=0.0)
    return (targets - mean) / (var + 1.0e-6) ** 0.5


@pytest.mark.parametrize(
    "shape, window",
    [((2, 3, 64, 48), 47), ((1, 3, 96, 96), 47), ((3, 2, 20, 9), 5), ((1, 1, 7, 30), 3), ((2, 3, 5, 30), 47)],
)
def test_normalize_target_equals_the_official_square_window_code(shape, window):
    """Against the official pools run in float64 (exact to rounding), with flat regions, where the local std is
    near its floor of 1e-3 and rounding in the statistics shows most."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    x[..., : shape[-2] // 2, : shape[-1] // 2] = 0.25  # a flat quarter
    expected = _official_norm_targets(x.double(), window).float()
    torch.testing.assert_close(normalize_target(x, window), expected, atol=1e-4, rtol=1e-4)
    official_fp32 = _official_norm_targets(x, window)  # the official code's own float32 rounding, for comparison
    with patch.object(model_module, "_STATS_CHUNK", x[0].numel()):  # one image per chunk: the same result
        torch.testing.assert_close(normalize_target(x, window), expected, atol=1e-4, rtol=1e-4)
    assert (normalize_target(x, window) - expected).abs().max() <= (official_fp32 - expected).abs().max() + 1e-5


def _hf_state_dict(sd):
    """Our/official SimMIM keys -> transformers' Swinv2ForMaskedImageModeling keys (test-only oracle)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(("relative_coords_table", "relative_position_index", "attn_mask")):
            continue
        if k.startswith("decoder."):
            out[k] = v
            continue
        k = k[len("encoder.") :]
        if k == "mask_token":
            out["swinv2.embeddings.mask_token"] = v
            continue
        if k.startswith("patch_embed."):
            k = k.replace("patch_embed.proj", "embeddings.patch_embeddings.projection").replace(
                "patch_embed.norm", "embeddings.norm"
            )
        elif k.startswith("norm."):
            k = k.replace("norm.", "layernorm.")
        elif ".attn.qkv.weight" in k:
            p = "encoder." + k.replace("attn.qkv.weight", "attention.self.")
            for name, part in zip(("query", "key", "value"), v.chunk(3)):
                out[f"swinv2.{p}{name}.weight"] = part
            continue
        else:
            k = "encoder." + k
            for a, b in (
                ("attn.q_bias", "attention.self.query.bias"),
                ("attn.v_bias", "attention.self.value.bias"),
                ("attn.logit_scale", "attention.self.logit_scale"),
                ("attn.cpb_mlp", "attention.self.continuous_position_bias_mlp"),
                ("attn.proj", "attention.output.dense"),
                ("norm1", "layernorm_before"),
                ("norm2", "layernorm_after"),
                ("mlp.fc1", "intermediate.dense"),
                ("mlp.fc2", "output.dense"),
            ):
                k = k.replace(a, b)
        out["swinv2." + k] = v
    return out


def test_loss_and_reconstruction_match_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = dict(TINY, img_size=64, num_classes=0)
    model = SimMIM(swinv2.SwinTransformerV2(**cfg, mask_token=True), encoder_stride=8)
    randomize_(model, seed=4)
    hf_cfg = transformers.Swinv2Config(
        image_size=64, patch_size=4, embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=4, encoder_stride=8
    )
    hf = transformers.Swinv2ForMaskedImageModeling(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(_hf_state_dict(model.state_dict()), strict=False)
    assert unexpected == [] and all("relative" in k for k in missing)
    model.eval()

    x = torch.randn(2, 3, 64, 64)
    mask = torch.from_numpy(np.stack([MaskGenerator(64, 16, 4, 0.6)(np.random.default_rng(i)) for i in range(2)]))
    with torch.no_grad():
        out = hf(pixel_values=x, bool_masked_pos=mask.flatten(1).bool())
        loss = model(x, mask)
        rec = model.reconstruct(x, mask)
    assert abs(loss.item() - out.loss.item()) < 1e-4
    assert (rec - out.reconstruction).abs().max() < 1e-4
    assert rec.std() > 0.1


def test_simmim_state_dict_uses_official_layout():
    model = SimMIM(swinv2.SwinTransformerV2(**TINY, mask_token=True), encoder_stride=8)
    keys = set(model.state_dict())
    assert {"encoder.mask_token", "decoder.0.weight", "decoder.0.bias", "encoder.patch_embed.proj.weight"} <= keys
    report = swinv2.load_pretrained(swinv2.SwinTransformerV2(**TINY, mask_token=True), model.state_dict())
    assert report.format == "simmim" and report.missing_keys == [] and "decoder.0.weight" in report.dropped_keys
