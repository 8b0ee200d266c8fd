"""Numerical parity with timm's SwinTransformerV2 (an independent implementation of the official model)."""

import pytest
import torch
from conftest import randomize_
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

import swinv2

CASES = {
    "tiny-256-w8": dict(variant="swinv2_tiny", img_size=256, window_size=8),
    "tiny-192-w12-clamped": dict(variant="swinv2_tiny", img_size=192, window_size=12),
    "small-224-w7": dict(variant="swinv2_small", img_size=224, window_size=7),
    "base-256-w16-from-w8": dict(
        variant="swinv2_base", img_size=256, window_size=16, pretrained_window_sizes=(8, 8, 8, 8)
    ),
    "tiny-nonsquare-192x256-w8": dict(variant="swinv2_tiny", img_size=(192, 256), window_size=8),
    "tiny-padded-160x224-w12": dict(variant="swinv2_tiny", img_size=(160, 224), window_size=12),
}


def _pair_of_models(variant, **kwargs):
    cfg = dict(swinv2.VARIANTS[variant])
    timm_model = TimmSwinV2(
        embed_dim=cfg["embed_dim"], depths=cfg["depths"], num_heads=cfg["num_heads"], num_classes=10, **kwargs
    )
    randomize_(timm_model, seed=1)
    ours = swinv2.create_model(variant, num_classes=10, **kwargs)
    report = swinv2.load_pretrained(ours, timm_model.state_dict())
    assert report.format == "timm"
    assert report.missing_keys == [] and report.unexpected_keys == []
    return ours.eval(), timm_model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_matches_timm_features_and_logits(case):
    kwargs = dict(CASES[case])
    ours, theirs = _pair_of_models(kwargs.pop("variant"), **kwargs)
    h, w = (kwargs["img_size"],) * 2 if isinstance(kwargs["img_size"], int) else kwargs["img_size"]
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        f_ours, f_timm = ours.forward_features(x), theirs.forward_features(x)
        assert f_ours.shape == f_timm.shape
        assert (f_ours - f_timm).abs().max() < 1e-4
        assert (ours.forward_head(f_ours) - theirs.forward_head(f_timm)).abs().max() < 1e-4
        assert f_ours.std() > 0.1  # the comparison is not between two near-constant tensors


def test_to_timm_state_dict_round_trips():
    ours, theirs = _pair_of_models("swinv2_tiny", img_size=64, window_size=8)
    exported = swinv2.to_timm_state_dict(ours)
    reference = theirs.state_dict()
    assert exported.keys() == reference.keys()
    for k in reference:
        assert torch.equal(exported[k], reference[k]), k
    fresh = TimmSwinV2(img_size=64, window_size=8, num_classes=10)
    fresh.load_state_dict(exported, strict=True)


def test_to_timm_state_dict_refuses_what_timm_cannot_hold():
    model = swinv2.SwinTransformerV2(
        img_size=32, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4, position_bias="table"
    )
    with pytest.raises(ValueError, match="position_bias='table'"):
        swinv2.to_timm_state_dict(model)
