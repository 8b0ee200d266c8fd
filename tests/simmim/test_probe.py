"""The linear probe on frozen features: it separates what the features separate, and no more."""

import cv2
import numpy as np
import pytest
from conftest import TINY, counted_walks

import swinv2
from simmim.probe import main


def _classes(root, colour_coded: bool, per_class: int = 12):
    """Two class folders of 32 px images: colour-coded (class 0 reddish, class 1 bluish) or both the same noise."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (32, 32, 3)).astype(np.float32)
            if colour_coded:
                img[..., 2 - 2 * c] = 0.5 * img[..., 2 - 2 * c] + 127  # BGR: red for c0, blue for c1
            cv2.imwrite(str(root / f"c{c}" / f"{i}.png"), img.astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def encoder_file(pretraining_run):
    """The session's pretraining export (32 px, window 4, two stages)."""
    return str(pretraining_run.export)


def test_separable_classes_are_separated_at_every_stage(tmp_path, encoder_file, capsys, monkeypatch):
    """... and the folder is read through its file index: walked by the first run, found in the cache after."""
    walks = counted_walks(monkeypatch)
    root = str(_classes(tmp_path / "coded", colour_coded=True))
    assert main(["--checkpoint", encoder_file, "--data.root", root, "--epochs", "30"]) == 100.0
    assert len(walks) == 1
    assert "last stage, after the final norm" in capsys.readouterr().out
    assert main(["--checkpoint", encoder_file, "--data.root", root, "--epochs", "30", "--stage", "0"]) == 100.0
    assert main(["--checkpoint", encoder_file, "--data.root", root, "--random_init", "--no_final_norm"]) == 100.0
    assert len(walks) == 1


def test_classes_the_features_cannot_tell_apart_stay_near_chance(tmp_path, encoder_file):
    """Both folders hold the same kind of noise: 2 classes, 10 validation images; above 80% would mean the probe
    sees the labels some other way."""
    root = str(_classes(tmp_path / "same", colour_coded=False, per_class=25))
    assert main(["--checkpoint", encoder_file, "--data.root", root, "--epochs", "30"]) <= 80.0


def test_a_stage_the_encoder_does_not_have_is_refused(tmp_path, encoder_file):
    from simmim.errors import ConfigError

    root = str(_classes(tmp_path / "coded", colour_coded=True, per_class=3))
    with pytest.raises(ConfigError, match="--stage 5: the encoder has stages 0 to 1"):
        main(["--checkpoint", encoder_file, "--data.root", root, "--stage", "5"])


def test_the_probe_uses_the_checkpoints_weights(tmp_path):
    """An encoder whose patch embedding is zeroed sees every image alike: its probe cannot beat chance, while a
    random init of the same architecture separates the colours."""
    import torch

    blind = swinv2.SwinTransformerV2(**TINY)
    with torch.no_grad():
        blind.patch_embed.proj.weight.zero_()
    path = swinv2.save_weights(tmp_path / "blind.safetensors", blind)
    root = str(_classes(tmp_path / "coded", colour_coded=True))
    assert main(["--checkpoint", path, "--data.root", root, "--epochs", "30"]) <= 60.0
    assert main(["--checkpoint", path, "--data.root", root, "--epochs", "30", "--random_init"]) == 100.0
