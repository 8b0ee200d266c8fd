"""The activation study: the magnitudes it reports are those of the blocks' outputs, and on a small labelled set
it shows the paper's effect: a pre-norm, dot-product model's main branch grows over a deep stage in training while
the post-norm, cosine one stays flat (3.5x-4.3x against 1.1x-1.2x over seeds 0-2 when this test was written)."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_probe import _classes

import swinv2
from simmim.activations import main
from simmim.errors import ConfigError
from simmim.eval.activations import DESIGNS, block_magnitudes, build, deepest_stage_growth, probe_batch


def test_post_norm_blocks_start_as_identities_and_the_hooks_see_their_outputs():
    model = swinv2.SwinTransformerV2(img_size=32, embed_dim=16, depths=(3, 2), num_heads=(1, 2), window_size=4)
    x = torch.randn(4, 3, 32, 32)
    m = block_magnitudes(model, x)
    assert m["blocks"] == ["1.1", "1.2", "1.3", "2.1", "2.2"]
    with torch.no_grad():
        embedded = model.embed(x)  # official init: every post-norm block passes its input through unchanged
        merged = model.layers[0].downsample(embedded)
    assert m["mean"][:3] == [embedded.abs().mean().item()] * 3 and m["max"][0] == embedded.abs().max().item()
    assert m["mean"][3:] == [merged.abs().mean().item()] * 2


def test_pre_norm_dot_grows_over_the_deep_stage_and_post_norm_cosine_does_not(tmp_path, capsys):
    root = str(_classes(tmp_path / "coded", colour_coded=True, per_class=16))
    args = ["--data.root", root, "--img_size", "32", "--window", "4", "--epochs", "4", "--lr", "3e-3"]
    args += ["--batch_size", "8", "--embed_dim", "16", "--depths", "1", "8", "--num_heads", "1", "2"]
    args += ["--probe_images", "16", "--out", str(tmp_path / "a.md")]
    results = main(args)
    pre, post = results["pre+dot"], results["post+cosine"]
    assert deepest_stage_growth(post.blocks, post.init_mean) == 1.0
    grown, flat = (
        deepest_stage_growth(pre.blocks, pre.trained_mean),
        deepest_stage_growth(post.blocks, post.trained_mean),
    )
    assert grown > 2.5 and flat < 1.5, (grown, flat)
    assert pre.top1 == post.top1 == 100.0  # both trained (the classes are colour-coded)
    out = capsys.readouterr().out
    assert "| block | pre+dot init mean|x| | pre+dot trained mean|x| |" in out and "| 2.8 |" in out
    assert "pre+dot: deepest-stage growth of mean|x|" in (tmp_path / "a.md").read_text()


def test_every_design_starts_from_the_same_weights():
    arch = dict(img_size=32, embed_dim=16, depths=(1, 2), num_heads=(1, 2), window_size=4, num_classes=3)
    models = {name: build(name, 7, **arch).state_dict() for name in DESIGNS}
    reference = models["post+cosine"]
    for name, state in models.items():
        shared = [k for k in state if k in reference and state[k].shape == reference[k].shape and "norm" not in k]
        assert len(shared) > 20
        assert all(torch.equal(state[k], reference[k]) for k in shared), name


def test_the_deepest_stage_is_the_first_of_the_longest():
    """Stages of equal depth: the first one, in stage order (a set's order would change with the hash seed)."""
    assert deepest_stage_growth(["1.1", "1.2", "2.1", "2.2"], [1.0, 2.0, 1.0, 4.0]) == 2.0
    assert deepest_stage_growth(["1.1", "2.1", "2.2", "2.3", "3.1"], [1.0, 1.0, 2.0, 3.0, 9.0]) == 3.0


def test_the_probe_images_cover_every_class(tmp_path):
    """40 files sorted by class, 10 each, class c a flat grey of level 60c: 8 images take 2 of every class (the first 8
    would all be class 0)."""
    files, labels = [], []
    for c in range(4):
        (tmp_path / str(c)).mkdir()
        for i in range(10):
            files.append(str(tmp_path / str(c) / f"{i}.png"))
            labels.append(c)
            Image.fromarray(np.full((8, 8, 3), 60 * c, np.uint8)).save(files[-1])
    batch = probe_batch(files, labels, 8, 16, seed=0)
    assert batch.shape == (8, 3, 16, 16)
    levels = sorted(round(v) for v in batch[:, 0].mean(dim=(1, 2)).mul(0.229).add(0.485).mul(255).tolist())
    assert levels == [0, 0, 60, 60, 120, 120, 180, 180]
    with pytest.raises(ConfigError, match="--probe_images 0"):
        probe_batch(files, labels, 0, 16, seed=0)
