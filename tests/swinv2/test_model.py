"""SwinTransformerV2: variants, shapes, gradients, masking, memory features, paper-level facts."""

import pytest
import torch
from conftest import TINY, assert_same_values_and_grads, randomize_, values_and_grads

import swinv2
from swinv2.attention import CosineQKV, WindowAttention
from swinv2.blocks import clamp_window


@pytest.mark.parametrize("name", sorted(swinv2.VARIANTS))
def test_every_variant_builds_with_official_keys(name):
    with torch.device("meta"):
        model = swinv2.create_model(name)
    keys = model.state_dict().keys()
    assert "layers.0.downsample.reduction.weight" in keys and "layers.3.downsample.reduction.weight" not in keys
    assert "layers.0.blocks.1.attn_mask" in keys and "layers.0.blocks.0.attn_mask" not in keys
    assert {"head.weight", "norm.weight", "patch_embed.proj.weight", "layers.0.blocks.0.attn.cpb_mlp.2.weight"} <= keys
    has_norm3 = any(".norm3." in k for k in keys)
    assert has_norm3 == (name in ("swinv2_huge", "swinv2_giant"))


@pytest.mark.parametrize(
    "name,paper_millions", [("swinv2_tiny", 28), ("swinv2_small", 50), ("swinv2_base", 88), ("swinv2_large", 197)]
)
def test_parameter_counts_match_paper(name, paper_millions):
    with torch.device("meta"):
        model = swinv2.create_model(name, num_classes=1000)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - paper_millions) / paper_millions < 0.02, count


def test_huge_and_giant_sizes_and_extra_norm_positions():
    with torch.device("meta"):
        huge, giant = swinv2.create_model("swinv2_huge"), swinv2.create_model("swinv2_giant")
    assert abs(sum(p.numel() for p in huge.parameters()) / 1e6 - 658) / 658 < 0.02  # paper: 658M
    assert abs(sum(p.numel() for p in giant.parameters()) / 1e9 - 3.0) / 3.0 < 0.02  # paper: 3.0B
    # Every 6th block of a stage (stage-local, as timm's swinv2_cr and mmpretrain): blocks 5, 11, ..., 41.
    with_norm = [j for j, blk in enumerate(giant.layers[2].blocks) if isinstance(blk.norm3, torch.nn.LayerNorm)]
    assert with_norm == list(range(5, 42, 6))


@pytest.mark.parametrize("position_bias", ["log_cpb", "linear_cpb", "table"])
@pytest.mark.parametrize("extra_norm_period", [0, 2])
def test_forward_backward_every_parameter_gets_finite_gradient(position_bias, extra_norm_period):
    model = swinv2.SwinTransformerV2(
        **TINY, position_bias=position_bias, extra_norm_period=extra_norm_period, mask_token=True, ape=True
    )
    randomize_(model)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 8, 8) > 0.5
    feats = model.forward_features(x, mask)
    assert feats.shape == (2, 4, 4, 48)  # 2 stages: one patch merging
    logits = model.forward_head(feats)
    assert logits.shape == (2, 5)
    logits.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} receives no gradient"


def test_official_init_zeroes_post_norms_so_blocks_start_as_identity():
    model = swinv2.SwinTransformerV2(**TINY)
    blk = model.layers[0].blocks[0]
    x = torch.randn(2, 8, 8, 24)
    assert torch.equal(blk(x), x)
    assert torch.allclose(blk.attn.logit_scale, torch.log(torch.tensor(10.0)).expand(2, 1, 1))


def test_mask_token_replaces_masked_patches_only():
    model = randomize_(swinv2.SwinTransformerV2(**TINY, mask_token=True))
    x = torch.randn(1, 3, 32, 32)
    none = model.embed(x)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 2, 3] = True
    masked = model.embed(x, mask)
    assert torch.equal(masked[0, 2, 3], model.mask_token[0, 0])
    keep = ~mask[0]
    assert torch.equal(masked[0][keep], none[0][keep])
    assert torch.equal(model.embed(x, mask.float()), masked)  # 0/1 float masks behave as bool


def test_mask_errors_are_clear():
    model = swinv2.SwinTransformerV2(**TINY)
    with pytest.raises(ValueError, match="mask_token=True"):
        model.forward_features(torch.randn(1, 3, 32, 32), torch.zeros(1, 8, 8))
    model = swinv2.SwinTransformerV2(**TINY, mask_token=True)
    with pytest.raises(ValueError, match=r"mask shape \(1, 4, 4\) does not match the patch grid \(1, 8, 8\)"):
        model.forward_features(torch.randn(1, 3, 32, 32), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="not divisible by patch_size 4"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="unknown model"):
        swinv2.create_model("swinv2_tiniest")
    with pytest.raises(ValueError, match="one value per stage"):
        swinv2.SwinTransformerV2(**{**TINY, "window_size": (4, 4, 4)})


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_sequential_attention_matches_all_at_once(chunk):
    model = randomize_(swinv2.SwinTransformerV2(**{**TINY, "img_size": 48}))  # 12x12 tokens: 9 windows/image
    x = torch.randn(2, 3, 48, 48)
    reference = values_and_grads(model, x)
    for layer in model.layers:
        for blk in layer.blocks:
            blk.attn.chunk_size = chunk
    assert_same_values_and_grads(values_and_grads(model, x), reference)
    with torch.no_grad():  # inference path (no recomputation)
        torch.testing.assert_close(model.forward_features(x), reference[0], atol=1e-5, rtol=1e-4)


def test_activation_checkpointing_matches():
    model = randomize_(swinv2.SwinTransformerV2(**TINY))
    x = torch.randn(2, 3, 32, 32)
    reference = values_and_grads(model, x)
    model.set_grad_checkpointing(True)
    assert all(layer.use_checkpoint for layer in model.layers)
    assert_same_values_and_grads(values_and_grads(model, x), reference)


def test_fused_and_explicit_attention_agree():
    model = randomize_(swinv2.SwinTransformerV2(**TINY, fused_attn=False))
    x = torch.randn(2, 3, 32, 32)
    reference = values_and_grads(model, x)
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = True
    assert_same_values_and_grads(values_and_grads(model, x), reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_sdpa_matches_explicit_attention():
    """On CUDA the default attention is SDPA; it must give the explicit path's values and gradients."""
    model = randomize_(swinv2.SwinTransformerV2(**TINY)).cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    sdpa = values_and_grads(model, x)
    for m in model.modules():
        if hasattr(m, "fused"):
            assert m.fused is None  # the default: SDPA because the tensors are on CUDA
            m.fused = False
    assert_same_values_and_grads(values_and_grads(model, x), sdpa, atol=1e-4)


def test_bf16_autocast_stays_close_to_fp32():
    model = randomize_(swinv2.SwinTransformerV2(**TINY))
    x = torch.randn(2, 3, 32, 32)
    ref, ref_grads = values_and_grads(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = values_and_grads(model, x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()
    flat = [torch.cat([g[n].flatten() for n in ref_grads]) for g in (grads, ref_grads)]
    assert (flat[0] - flat[1]).norm() < 0.05 * flat[1].norm()  # measured 0.023


def _qkv_and_scale(dtype, heads=2):
    """A qkv projection output viewed as (B*nW, N, 3, nH, hd), and a per-head scale (nH, 1, 1)."""
    qkv = torch.randn(4, 9, 3 * heads * 8, dtype=dtype).view(4, 9, 3, heads, 8)
    scale = torch.tensor([3.0, 20.0][:heads], dtype=dtype).view(heads, 1, 1)
    return qkv.requires_grad_(), scale.requires_grad_()


def _cosine_qkv_reference(qkv, scale):
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    normalize = torch.nn.functional.normalize
    return normalize(q, dim=-1) * scale, normalize(k, dim=-1), v


def test_cosine_qkv_gradient_is_exact():
    assert torch.autograd.gradcheck(CosineQKV.apply, _qkv_and_scale(torch.float64))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_cosine_qkv_matches_normalize(dtype, tol):
    qkv, scale = _qkv_and_scale(dtype)
    qkv32, scale32 = (t.detach().float().requires_grad_() for t in (qkv, scale))
    outs, refs = CosineQKV.apply(qkv, scale), _cosine_qkv_reference(qkv32, scale32)
    grads = [torch.randn(o.shape) for o in outs]
    grads[1] = grads[1].transpose(-1, -2).contiguous().transpose(-1, -2)  # k's gradient arrives transposed
    torch.autograd.backward([o.float() for o in outs], grads)
    torch.autograd.backward(refs, grads)
    pairs = list(zip(outs, refs)) + [(qkv.grad, qkv32.grad), (scale.grad, scale32.grad)]
    for a, b in pairs:
        assert a.dtype == dtype and a.shape == b.shape
        assert (a.float() - b).abs().max() <= tol * b.abs().max()
    assert all(o.is_contiguous() for o in outs)


def test_cosine_qkv_zero_vector_stays_finite():
    qkv, scale = _qkv_and_scale(torch.float32)
    qkv.data[1, 3, :2] = 0  # q = k = 0 for one token: F.normalize's eps case
    q, k, v = CosineQKV.apply(qkv, scale)
    (q.sum() + k.sum() + v.sum()).backward()
    assert q[1, :, 3].abs().max() == 0 and k[1, :, 3].abs().max() == 0
    assert torch.isfinite(qkv.grad).all() and torch.isfinite(scale.grad).all()


def test_window_clamps_to_small_stages_per_axis():
    assert clamp_window((6, 6), (12, 12), shift=True) == ((6, 6), (0, 0))
    assert clamp_window((6, 16), (8, 8), shift=True) == ((6, 8), (0, 4))
    model = swinv2.create_model("swinv2_tiny", img_size=192, window_size=12)
    assert model.window_sizes == ((12, 12), (12, 12), (12, 12), (6, 6))


def test_other_input_sizes_run_with_padding():
    model = randomize_(swinv2.SwinTransformerV2(**TINY)).eval()
    out = model.forward_features(torch.randn(1, 3, 40, 56))  # 10x14 tokens: windows padded
    assert out.shape == (1, 5, 7, 48) and torch.isfinite(out).all()


def test_no_weight_decay_names():
    model = swinv2.SwinTransformerV2(**TINY, mask_token=True)
    names = model.no_weight_decay()
    assert "mask_token" in names and "layers.0.blocks.0.attn.logit_scale" in names
    assert "layers.0.blocks.0.attn.cpb_mlp.0.weight" in names
    assert "layers.0.blocks.0.attn.qkv.weight" not in names


@pytest.mark.slow
def test_compiled_attention_matches_eager():
    model = randomize_(swinv2.SwinTransformerV2(**TINY))
    x = torch.randn(2, 3, 32, 32)
    reference = values_and_grads(model, x)
    model.compile_attention()
    assert_same_values_and_grads(values_and_grads(model, x), reference, atol=1e-4)


@pytest.mark.slow
def test_compiled_attention_has_no_graph_break():
    attn = WindowAttention(48, (4, 4), num_heads=3)
    x, mask = torch.randn(8, 16, 48), torch.zeros(4, 16, 16)
    assert torch._dynamo.explain(attn)(x, mask).graph_break_count == 0


def test_a_window_clamped_before_the_last_stage_is_warned_about_by_stage():
    import warnings

    import swinv2

    with pytest.warns(UserWarning, match=r"stage 1 \(16x16 map: window 16x16, not 32x32\), stage 2"):
        swinv2.create_model("swinv2_tiny", img_size=64, window_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recipes clamp only the last stage (192 px, window 12: 6x6)
        swinv2.create_model("swinv2_tiny", img_size=192, window_size=12)


def test_attention_dropout_is_recomputed_exactly_under_activation_checkpointing():
    """The recomputed forward of a checkpointed block drops the same attention weights as the first: equal values
    and gradients in training mode, and another draw drops others."""
    model = randomize_(swinv2.SwinTransformerV2(**{**TINY, "img_size": 48, "attn_drop_rate": 0.3}))
    x = torch.randn(2, 3, 48, 48)
    torch.manual_seed(1)
    reference = values_and_grads(model, x)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    assert_same_values_and_grads(values_and_grads(model, x), reference)
    torch.manual_seed(2)
    assert not torch.allclose(values_and_grads(model, x)[0], reference[0])


def test_sequential_attention_refuses_attention_dropout_in_one_line():
    with pytest.raises(ValueError, match=r"^attention dropout \(attn_drop_rate 0.3\) does not combine with "):
        swinv2.SwinTransformerV2(**{**TINY, "attn_drop_rate": 0.3, "attn_chunk_size": 2})
    model = swinv2.SwinTransformerV2(**{**TINY, "img_size": 48, "attn_drop_rate": 0.3})
    for layer in model.layers:  # chunked after construction: refused at the first training forward
        for blk in layer.blocks:
            blk.attn.chunk_size = 1
    model.eval()(torch.randn(2, 3, 48, 48))  # no dropout in evaluation: allowed
    with pytest.raises(ValueError, match="attn_chunk_size 1"):
        model.train()(torch.randn(2, 3, 48, 48))
