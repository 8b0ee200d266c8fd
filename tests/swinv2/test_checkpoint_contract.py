"""The checkpoint contract: a file records its architecture, rebuilds the model alone, and warns on window mismatch."""

import warnings

import pytest
import torch
from conftest import TINY, randomize_

import swinv2
from swinv2.checkpoint import ARCH_KEY, infer_architecture
from swinv2.reading import read_checkpoint
from swinv2.windows import implied_windows

TRANSFERRED = {**TINY, "img_size": 64, "window_size": 8, "pretrained_window_sizes": (4, 4)}


def _same_logits(a, b, size):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs", [TINY, TRANSFERRED, {**TINY, "position_bias": "linear_cpb", "mask_token": True}])
def test_saved_file_rebuilds_the_same_model_alone(tmp_path, kwargs):
    model = randomize_(swinv2.SwinTransformerV2(**kwargs))
    path = swinv2.save_weights(tmp_path / "w.safetensors", model)
    rebuilt = swinv2.create_model_from_checkpoint(path)
    assert rebuilt.architecture() == model.architecture()
    assert rebuilt.load_report.windows == ((4, 4), (4, 4))
    _same_logits(model, rebuilt, kwargs["img_size"])


def test_record_names_the_variant(tmp_path):
    model = swinv2.create_model("swinv2_tiny", img_size=64, window_size=4, num_classes=0)
    raw = read_checkpoint(swinv2.save_weights(tmp_path / "t.safetensors", model))
    assert '"variant": "swinv2_tiny"' in raw[ARCH_KEY]
    assert swinv2.architecture(swinv2.SwinTransformerV2(**TINY))["variant"] == "custom"


def test_timm_layout_file_carries_the_record_and_loads_strictly_into_timm(tmp_path):
    from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

    model = randomize_(swinv2.SwinTransformerV2(**TRANSFERRED))
    path = swinv2.save_weights(tmp_path / "timm.safetensors", model, layout="timm")
    theirs = TimmSwinV2(img_size=64, window_size=8, pretrained_window_sizes=(4, 4), **{
        k: TINY[k] for k in ("patch_size", "embed_dim", "depths", "num_heads", "num_classes")})  # fmt: skip
    theirs.load_state_dict(read_checkpoint(path)["state_dict"], strict=True)
    rebuilt = swinv2.create_model_from_checkpoint(path)  # the record, although timm's keys hold no window buffers
    _same_logits(model, rebuilt, 64)


def test_window_override_keeps_the_files_windows_as_pretraining_windows(tmp_path):
    path = swinv2.save_weights(tmp_path / "w4.safetensors", randomize_(swinv2.SwinTransformerV2(**TINY)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no window warning: the transfer is set up right
        bigger = swinv2.create_model_from_checkpoint(path, img_size=64, window_size=8)
    assert bigger.window_sizes == ((8, 8), (8, 8))
    assert bigger.architecture()["pretrained_window_sizes"] == [[4, 4], [4, 4]]


@pytest.mark.parametrize("recorded", [True, False])
def test_wrong_pretrained_window_sizes_warn_naming_both(tmp_path, recorded):
    """Recorded in the file's header, or implied by the `relative_coords_table` of a plain state dict."""
    source = randomize_(swinv2.SwinTransformerV2(**TINY))  # trained at window 4
    src = swinv2.save_weights(tmp_path / "w4.safetensors", source) if recorded else source.state_dict()
    wrong = swinv2.SwinTransformerV2(**{**TRANSFERRED, "pretrained_window_sizes": (6, 6)})
    how = "recorded in the file" if recorded else "implied by its relative_coords_table"
    with pytest.warns(UserWarning, match=rf"windows \[\(4, 4\), \(4, 4\)\] \({how}\).*by \[\(6, 6\), \(6, 6\)\]"):
        swinv2.load_pretrained(wrong, src)
    right = swinv2.SwinTransformerV2(**TRANSFERRED)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swinv2.load_pretrained(right, src)


@pytest.mark.parametrize("bias", ["log_cpb", "linear_cpb"])
@pytest.mark.parametrize("pretrained", [0, (4, 4), (3, 5)])
def test_relative_coords_table_implies_its_window(bias, pretrained):
    model = swinv2.SwinTransformerV2(
        **{
            **TRANSFERRED,
            "pretrained_window_sizes": [pretrained] * 2 if pretrained else 0,
            "window_size": [(8, 6)] * 2,
        },
        position_bias=bias,
    )
    expected = (8, 6) if pretrained == 0 else tuple(pretrained)
    assert implied_windows(model.state_dict(), bias == "log_cpb") == (expected, expected)


def test_official_state_dict_without_record_rebuilds_from_its_keys():
    model = randomize_(swinv2.SwinTransformerV2(**{**TRANSFERRED, "extra_norm_period": 1}, mask_token=True))
    arch = infer_architecture(model.state_dict())
    assert {k: arch[k] for k in arch} == {k: model.architecture()[k] for k in arch}
    rebuilt = swinv2.create_model_from_checkpoint({"model": model.state_dict()})  # as the official scripts save
    _same_logits(model, rebuilt, 64)


def test_file_without_record_or_buffers_asks_for_what_it_cannot_show(tmp_path):
    timm_sd = swinv2.to_timm_state_dict(swinv2.SwinTransformerV2(**TINY))
    with pytest.raises(ValueError, match=r"do not show img_size or window_size: pass img_size=\.\.\., window_size="):
        swinv2.create_model_from_checkpoint(timm_sd)
    model = swinv2.create_model_from_checkpoint(timm_sd, img_size=32, window_size=4)
    assert model.architecture() == swinv2.SwinTransformerV2(**TINY).architecture()


def test_strict_rebuild_refuses_a_partial_fill(tmp_path):
    path = swinv2.save_weights(tmp_path / "w.safetensors", swinv2.SwinTransformerV2(**TINY))
    with pytest.raises(swinv2.CheckpointMismatchError, match="strict=False"):
        swinv2.create_model_from_checkpoint(path, mask_token=True)
    assert swinv2.create_model_from_checkpoint(path, strict=False, num_classes=3).num_classes == 3


def test_equivalent_windows_do_not_warn():
    """R = 1 and R = 2 give the same coordinates (the divisor is max(R - 1, 1)), and a stage whose window is 1 has
    only the offset 0: neither is a mismatch."""
    kwargs = {**TINY, "img_size": 64, "window_size": [8, 1], "pretrained_window_sizes": [(4, 4), (1, 1)]}
    source = swinv2.SwinTransformerV2(**{**kwargs, "window_size": [8, 2]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swinv2.load_pretrained(swinv2.SwinTransformerV2(**{**kwargs, "window_size": [8, 2]}), source.state_dict())
        swinv2.load_pretrained(swinv2.SwinTransformerV2(**{**kwargs, "pretrained_window_sizes": [(4, 4), (2, 2)]}),
                               source.state_dict())  # fmt: skip


@pytest.mark.parametrize("bias", ["log_cpb", "linear_cpb"])
def test_plain_state_dict_shows_its_spacing_and_non_square_windows(bias):
    model = randomize_(swinv2.SwinTransformerV2(**{**TRANSFERRED, "window_size": [(8, 6)] * 2}, position_bias=bias))
    arch = infer_architecture(model.state_dict())
    assert arch["position_bias"] == bias and arch["window_size"] == [[8, 6], [8, 6]]
    assert swinv2.checkpoint_windows(model.state_dict()) == ((4, 4), (4, 4))
    _same_logits(model, swinv2.create_model_from_checkpoint(model.state_dict(), img_size=64), 64)
