"""load_pretrained: every supported format, window transfer, clear errors, no code execution."""

import pytest
import torch
from conftest import TINY, randomize_
from safetensors.torch import save_file

import swinv2
from swinv2.attention import relative_coords_table
from swinv2.convert import CheckpointMismatchError

EMBED, DEPTHS, HEADS, WINDOW, CLASSES = TINY["embed_dim"], TINY["depths"], TINY["num_heads"], 4, TINY["num_classes"]


def official_layout(rpe_names=False):
    """A state dict written from the official layout (docs/checkpoints.md), not from our model."""
    g = torch.Generator().manual_seed(3)
    sd = {}

    def put(key, *shape):
        sd[key] = torch.randn(*shape, generator=g) * 0.05

    put("patch_embed.proj.weight", EMBED, 3, 4, 4)
    put("patch_embed.proj.bias", EMBED)
    put("patch_embed.norm.weight", EMBED)
    put("patch_embed.norm.bias", EMBED)
    n = WINDOW * WINDOW
    for i, (depth, heads) in enumerate(zip(DEPTHS, HEADS)):
        c = EMBED * 2**i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            mlp = "rpe_mlp" if rpe_names else "cpb_mlp"
            for norm in ("norm1", "norm2"):
                put(p + f"{norm}.weight", c)
                put(p + f"{norm}.bias", c)
            put(p + "attn.logit_scale", heads, 1, 1)
            put(p + "attn.q_bias", c)
            put(p + "attn.v_bias", c)
            put(p + "attn.qkv.weight", 3 * c, c)
            put(p + "attn.proj.weight", c, c)
            put(p + "attn.proj.bias", c)
            put(p + f"attn.{mlp}.0.weight", 512, 2)
            put(p + f"attn.{mlp}.0.bias", 512)
            put(p + f"attn.{mlp}.2.weight", heads, 512)
            put(p + "mlp.fc1.weight", 4 * c, c)
            put(p + "mlp.fc1.bias", 4 * c)
            put(p + "mlp.fc2.weight", c, 4 * c)
            put(p + "mlp.fc2.bias", c)
            sd[p + "attn.relative_coords_table"] = relative_coords_table((WINDOW, WINDOW), (0, 0))  # as saved
            sd[p + "attn.relative_position_index"] = torch.zeros(n, n, dtype=torch.long)
            if j % 2 and i == 0:
                put(p + "attn_mask", 4, n, n)
        if i < len(DEPTHS) - 1:
            put(f"layers.{i}.downsample.reduction.weight", 2 * c, 4 * c)
            put(f"layers.{i}.downsample.norm.weight", 2 * c)
            put(f"layers.{i}.downsample.norm.bias", 2 * c)
    put("norm.weight", EMBED * 2 ** (len(DEPTHS) - 1))
    put("norm.bias", EMBED * 2 ** (len(DEPTHS) - 1))
    put("head.weight", CLASSES, EMBED * 2 ** (len(DEPTHS) - 1))
    put("head.bias", CLASSES)
    return sd


def official_config():
    """The yacs config the official training scripts pickle into their checkpoints (nested, frozen)."""
    from yacs.config import CfgNode

    cfg = CfgNode()
    cfg.DATA = CfgNode(dict(IMG_SIZE=32, MASK_PATCH_SIZE=32))
    cfg.MODEL = CfgNode(dict(TYPE="swinv2", SWINV2=CfgNode(dict(EMBED_DIM=EMBED, DEPTHS=list(DEPTHS)))))
    cfg.freeze()
    return cfg


def _assert_loaded(model, source_sd, prefix=""):
    own = model.state_dict()
    for k, v in source_sd.items():
        k = k[len(prefix) :].replace("rpe_mlp", "cpb_mlp")
        if k in own and not k.endswith(("relative_coords_table", "relative_position_index", "attn_mask")):
            assert torch.equal(own[k], v), k


@pytest.mark.parametrize("rpe_names", [False, True])
def test_official_layout_loads_completely(tmp_path, rpe_names):
    sd = official_layout(rpe_names)
    path = tmp_path / "official.pth"
    torch.save({"model": sd, "optimizer": {}, "epoch": 99, "config": official_config()}, path)
    model = swinv2.SwinTransformerV2(**TINY)
    report = swinv2.load_pretrained(model, path)
    assert report.format == "official"
    assert report.missing_keys == [] and report.unexpected_keys == []
    _assert_loaded(model, sd)
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


def test_simmim_checkpoint_with_encoder_prefix(tmp_path):
    sd = {f"encoder.{k}": v for k, v in official_layout().items() if not k.startswith("head.")}
    sd["encoder.mask_token"] = torch.randn(1, 1, EMBED)
    sd["decoder.0.weight"] = torch.randn(32 * 32 * 3 // 4, 48, 1, 1)
    sd["decoder.0.bias"] = torch.randn(32 * 32 * 3 // 4)
    torch.save({"model": sd, "epoch": 800}, tmp_path / "simmim.pth")

    model = swinv2.SwinTransformerV2(**{**TINY, "num_classes": 0}, mask_token=True)
    report = swinv2.load_pretrained(model, tmp_path / "simmim.pth")
    assert report.format == "simmim" and report.prefix == "encoder."
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert "decoder.0.weight" in report.dropped_keys
    _assert_loaded(model, sd, prefix="encoder.")

    finetune = swinv2.SwinTransformerV2(**TINY)  # fine-tuning model: new head, no mask token
    report = swinv2.load_pretrained(finetune, sd)
    assert report.unexpected_keys == [] and "mask_token" in report.dropped_keys
    assert report.missing_keys == ["head.bias", "head.weight"]


def test_ours_timm_and_safetensors_round_trip(tmp_path):
    source = randomize_(swinv2.SwinTransformerV2(**TINY)).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = source(x)
    save_file(source.state_dict(), tmp_path / "encoder.safetensors")
    for src in (source.state_dict(), tmp_path / "encoder.safetensors", {"module": source.state_dict()}):
        model = swinv2.SwinTransformerV2(**TINY).eval()
        report = swinv2.load_pretrained(model, src)
        assert report.missing_keys == [] and report.unexpected_keys == []
        torch.testing.assert_close(model(x), expected)


def _transformers_model(cls_name, **overrides):
    """A transformers Swinv2 model with TINY's configuration and every parameter randomised."""
    import transformers

    config = dict(image_size=32, patch_size=4, embed_dim=EMBED, depths=list(DEPTHS), num_heads=list(HEADS))
    config.update(window_size=WINDOW, num_labels=CLASSES, drop_path_rate=0.0, encoder_stride=16, **overrides)
    return randomize_(getattr(transformers, cls_name)(transformers.Swinv2Config(**config)), seed=5).eval()


def test_transformers_classifier_loads_and_matches(tmp_path):
    hf = _transformers_model("Swinv2ForImageClassification")
    hf.save_pretrained(tmp_path)  # a hub folder: config.json + model.safetensors
    kwargs = swinv2.transformers_config_kwargs(tmp_path / "config.json")
    assert kwargs == {**TINY, "in_chans": 3, "pretrained_window_sizes": (0, 0), "mlp_ratio": 4.0, "qkv_bias": True,
                      "drop_rate": 0.0, "attn_drop_rate": 0.0}  # fmt: skip
    model = swinv2.SwinTransformerV2(**kwargs).eval()
    report = swinv2.load_pretrained(model, tmp_path)  # the folder: its model.safetensors
    assert report.format == "transformers" and report.prefix == "swinv2."
    assert report.missing_keys == [] and report.unexpected_keys == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf.swinv2(x)
        feats = model.forward_features(x)
        torch.testing.assert_close(feats.flatten(1, 2), out.last_hidden_state, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_transformers_mim_checkpoint_loads_encoder_and_mask_token():
    hf = _transformers_model("Swinv2ForMaskedImageModeling")
    model = swinv2.SwinTransformerV2(**{**TINY, "num_classes": 0}, mask_token=True).eval()
    report = swinv2.load_pretrained(model, {"state_dict": hf.state_dict()})
    assert report.format == "transformers"
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert any(k.startswith("decoder.") for k in report.dropped_keys)
    torch.testing.assert_close(model.mask_token, hf.swinv2.embeddings.mask_token)
    mask = torch.rand(2, 8, 8) < 0.5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf.swinv2(x, bool_masked_pos=mask.flatten(1)).last_hidden_state
        torch.testing.assert_close(model.forward_features(x, mask).flatten(1, 2), expected, atol=1e-4, rtol=0)


def test_folder_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder without model.safetensors or pytorch_model.bin"):
        swinv2.load_pretrained(swinv2.SwinTransformerV2(**TINY), tmp_path)


def test_transformers_config_with_unsupported_settings_is_refused():
    with pytest.raises(ValueError, match="hidden_act='relu'.*only 'gelu'"):
        swinv2.transformers_config_kwargs({"hidden_act": "relu", "embed_dim": 24})


def test_transformers_checkpoint_of_another_size_raises_clear_error():
    hf = _transformers_model("Swinv2Model", embed_dim=32)
    with pytest.raises(CheckpointMismatchError, match=r"patch_embed\.proj\.weight.*\(32, 3, 4, 4\).*embed_dim"):
        swinv2.load_pretrained(swinv2.SwinTransformerV2(**TINY), hf.state_dict())


def test_larger_window_loads_and_recomputes_buffers():
    source = randomize_(swinv2.SwinTransformerV2(**TINY))
    target = swinv2.SwinTransformerV2(**{**TINY, "img_size": 64, "window_size": 8}, pretrained_window_sizes=(4, 4))
    report = swinv2.load_pretrained(target, source.state_dict())
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert target.layers[0].blocks[0].attn.relative_coords_table.shape == (1, 15, 15, 2)
    assert target.layers[0].blocks[1].attn_mask.shape == (4, 64, 64)
    assert torch.isfinite(target(torch.randn(1, 3, 64, 64))).all()


def test_bias_table_variant_is_interpolated_to_new_window():
    source = randomize_(swinv2.SwinTransformerV2(**TINY, position_bias="table"))
    target = swinv2.SwinTransformerV2(**{**TINY, "img_size": 64, "window_size": 8}, position_bias="table")
    report = swinv2.load_pretrained(target, source.state_dict())
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert key in report.resized_keys and report.missing_keys == []
    table = target.state_dict()[key]
    assert table.shape == (15 * 15, 2)
    # The centre of the resized table (relative offset 0) keeps the source's centre value up to interpolation.
    src = source.state_dict()[key].view(7, 7, 2)
    assert torch.allclose(table.view(15, 15, 2)[7, 7], src[3, 3], atol=0.05)
    assert torch.isfinite(target(torch.randn(1, 3, 64, 64))).all()


def test_mismatched_architecture_raises_clear_error():
    source = swinv2.SwinTransformerV2(**{**TINY, "embed_dim": 32})
    model = swinv2.SwinTransformerV2(**TINY)
    with pytest.raises(CheckpointMismatchError) as err:
        swinv2.load_pretrained(model, source.state_dict())
    msg = str(err.value)
    assert "'patch_embed.proj.weight'" in msg and "(32, 3, 4, 4)" in msg and "(24, 3, 4, 4)" in msg
    assert "embed_dim" in msg


def test_classifier_of_another_size_is_dropped():
    source = randomize_(swinv2.SwinTransformerV2(**{**TINY, "num_classes": 1000}))
    model = swinv2.SwinTransformerV2(**TINY)
    report = swinv2.load_pretrained(model, source.state_dict())
    assert "head.weight" in report.dropped_keys and report.missing_keys == ["head.bias", "head.weight"]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        swinv2.load_pretrained(swinv2.SwinTransformerV2(**TINY), tmp_path / "nothing.pth")
    with pytest.raises(CheckpointMismatchError, match="not a SwinV2 checkpoint"):
        swinv2.load_pretrained(swinv2.SwinTransformerV2(**TINY), {"conv1.weight": torch.zeros(1)})


@pytest.mark.parametrize("bands", [13, 6, 3, 2, 1])
def test_rgb_weights_adapted_to_other_channels_embed_repeated_images_as_the_rgb_model(bands):
    """An official-layout 3-channel checkpoint into a model of `bands` channels with `adapt_channels`. More bands: an
    image whose band k is RGB channel k mod 3 gives the RGB model's features on the RGB image. Fewer: a `bands`-band
    image gives the RGB model's features on the RGB image whose channel c is its band c mod `bands` (one band: gray).
    Without `adapt_channels` another channel count is refused in one line."""
    sd = official_layout()
    rgb = swinv2.SwinTransformerV2(**TINY).eval()
    swinv2.load_pretrained(rgb, sd)
    model = swinv2.SwinTransformerV2(**{**TINY, "in_chans": bands}).eval()
    if bands != 3:
        with pytest.raises(CheckpointMismatchError, match=f"3-channel images and the model takes {bands} channels"):
            swinv2.load_pretrained(model, sd)
    report = swinv2.load_pretrained(model, sd, adapt_channels=True)
    expected = {} if bands == 3 else {"patch_embed.proj.weight": f"3 -> {bands} input channels (adapt_in_chans)"}
    assert report.adapted_keys == expected and report.missing_keys == [] and report.unexpected_keys == []
    if bands >= 3:
        x_rgb = torch.randn(2, 3, 32, 32)
        x_banded = x_rgb[:, [k % 3 for k in range(bands)]]
    else:
        x_banded = torch.randn(2, bands, 32, 32)
        x_rgb = x_banded[:, [c % bands for c in range(3)]]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x_banded), rgb.forward_features(x_rgb), atol=1e-5, rtol=1e-5)
    if bands == 13:  # timm's rule (repeat, scale by 3/13) embeds it otherwise: five bands share channel 0's weights
        timm_rule = sd["patch_embed.proj.weight"].repeat(1, 5, 1, 1)[:, :13] * 3 / 13
        ours = swinv2.adapt_in_chans(sd["patch_embed.proj.weight"], 13)
        conv = torch.nn.functional.conv2d
        assert (conv(x_banded, ours) - conv(x_banded, timm_rule)).abs().max() > 1e-3


def test_only_the_input_channels_are_adapted():
    """A patch embedding that differs in more than its channels (another patch size) is a mismatch, adapted or not."""
    sd = {**official_layout(), "patch_embed.proj.weight": torch.randn(EMBED, 3, 8, 8)}
    with pytest.raises(CheckpointMismatchError, match="patch_size"):
        swinv2.load_pretrained(swinv2.SwinTransformerV2(**{**TINY, "in_chans": 13}), sd, adapt_channels=True)
