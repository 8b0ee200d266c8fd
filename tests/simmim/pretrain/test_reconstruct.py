"""The reconstruction viewer: a grid from a pretraining checkpoint and a folder, the run's settings read back."""

import pytest
import torch
from conftest import RUN_MEAN, RUN_STD, image_folder

from simmim.reconstruct import main

MEAN, STD = RUN_MEAN, RUN_STD  # the run's own normalisation, not ImageNet's


@pytest.fixture(scope="module")
def run(pretraining_run):
    """The session's pretraining run folder: checkpoints/last.ckpt, encoder.safetensors and config.yaml with the
    data settings (mask ratio 0.5, not the default 0.6)."""
    assert (pretraining_run.folder / "encoder.safetensors").is_file()
    return pretraining_run.folder


def test_a_grid_of_every_image_in_four_columns(run, tmp_path, monkeypatch):
    from simmim.pretrain.model import SimMIM

    seen, reconstruct = [], SimMIM.reconstruct
    monkeypatch.setattr(SimMIM, "reconstruct", lambda self, x, mask: seen.append(x) or reconstruct(self, x, mask))
    images = image_folder(tmp_path / "imgs", [f"{i}.png" for i in range(5)], size=48)
    out = tmp_path / "grid.png"
    grid = main(["--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--images", str(images), "--out", str(out)])
    assert out.is_file() and grid.shape == (3, 5 * 34 + 2, 4 * 34 + 2)  # 32 px tiles, 2 px padding
    pixels = seen[0] * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(pixels, pixels.round(), rtol=0, atol=1e-3)  # normalised with the run's values
    original, pasted = grid[:, 2:34, 2:34], grid[:, 2:34, 2 + 3 * 34 : 34 + 3 * 34]
    torch.testing.assert_close(original * 255, (original * 255).round(), rtol=0, atol=1e-3)  # and back
    visible = (original - pasted).abs().amax(0) < 1e-5  # the pasted column keeps the visible pixels
    assert visible.float().mean() == 0.5  # mask ratio 0.5 from the run's config.yaml (default 0.6): 8 of 16
    other = main(["--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--images", str(images), "--out",
                  str(out), "--seed", "1", "--num_images", "2"])  # fmt: skip
    assert other.shape == (3, 2 * 34 + 2, 4 * 34 + 2)


def test_an_encoder_export_is_refused_with_the_file_it_needs(run, tmp_path):
    from simmim.errors import ConfigError

    images = image_folder(tmp_path / "imgs", ["0.png"], size=32)
    with pytest.raises(ConfigError, match="the decoder, which is in the run's checkpoints/\\*.ckpt"):
        main(["--checkpoint", str(run / "encoder.safetensors"), "--images", str(images)])
