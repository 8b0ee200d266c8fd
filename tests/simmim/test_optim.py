"""The LR schedule: warmup, cosine, multistep, LR scaling, and lengths read from the trainer."""

import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import image_folder

from simmim.optim import lr_factor, scaled_lr, schedule_lengths
from simmim.pretrain.data import PretrainDataModule
from simmim.pretrain.module import SimMIMPretrainer

ENC = dict(embed_dim=24, depths=(2, 2), num_heads=(2, 4))


def test_warmup_is_linear_from_the_warmup_lr():
    f = [lr_factor(s, 10, 100, warmup_factor=0.01, min_factor=0.0) for s in (0, 5, 10)]
    assert f == pytest.approx([0.01, 0.505, 1.0])


def test_cosine_falls_to_the_minimum_at_the_last_step():
    f = [lr_factor(s, 10, 110, 0.0, min_factor=0.1) for s in (10, 60, 110, 200)]
    assert f == pytest.approx([1.0, 0.55, 0.1, 0.1])


def test_multistep_multiplies_by_gamma_at_each_milestone():
    f = [lr_factor(s, 0, 0, 0.0, 0.0, "multistep", milestones=(700, 750), gamma=0.1) for s in (699, 700, 749, 750)]
    assert f == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_lr_scales_with_the_total_batch():
    assert scaled_lr(1e-4, 2048) == pytest.approx(4e-4)  # the official SwinV2-B pretraining LR
    assert scaled_lr(1.25e-3, 2048) == pytest.approx(5e-3)
    assert scaled_lr(1e-4, 2048, enabled=False) == 1e-4


def test_lengths_count_world_size_and_accumulation():
    loader = SimpleNamespace(batch_size=128, batch_sampler=None)
    trainer = SimpleNamespace(
        train_dataloader=loader, accumulate_grad_batches=2, world_size=8, num_training_batches=11,
        max_epochs=800, max_steps=-1,
    )  # fmt: skip
    lengths = schedule_lengths(trainer)
    assert lengths.total_batch == 128 * 8 * 2 and lengths.steps_per_epoch == 6 and lengths.total_steps == 4800
    trainer.max_steps = 1000
    assert schedule_lengths(trainer).total_steps == 1000
    trainer.max_epochs, trainer.max_steps = -1, -1
    assert schedule_lengths(trainer).total_steps is None


@pytest.fixture(scope="module")
def sixteen_images(tmp_path_factory):
    return str(image_folder(tmp_path_factory.mktemp("imgs") / "a", [f"{i}.png" for i in range(16)], size=32))


def _fit(folder, **trainer_kwargs):
    """4 batches of 4 per epoch; warmup of 1 epoch; cosine."""
    dm = PretrainDataModule(folder, img_size=32, mask_patch_size=8, batch_size=4, num_workers=0, val_fraction=0.0)
    model = SimMIMPretrainer(
        "swinv2_tiny", img_size=32, window_size=4, encoder_kwargs=ENC, norm_target_patch_size=None,
        base_lr=1e-3, warmup_lr=1e-5, min_lr=1e-4, warmup_epochs=1, lr_schedule="cosine",
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    sched = trainer.lr_scheduler_configs[0].scheduler
    return trainer, sched.base_lrs[0], [sched.lr_lambdas[0](s) for s in range(9)]


@pytest.mark.parametrize(
    "kwargs, per_epoch, total",
    [
        (dict(max_epochs=10, max_steps=6), 4, 6),  # max_steps ends the run early: warmup stays one epoch
        (dict(max_epochs=10, max_steps=6, accumulate_grad_batches=2), 2, 6),
        (dict(max_epochs=-1, max_steps=5), 4, 5),  # no epoch limit
        (dict(max_epochs=2), 4, 8),
    ],
)
def test_schedule_follows_the_run_not_the_epoch_count(sixteen_images, kwargs, per_epoch, total):
    trainer, peak, factors = _fit(sixteen_images, **kwargs)
    accumulate = kwargs.get("accumulate_grad_batches", 1)
    assert trainer.global_step == total
    assert peak == pytest.approx(1e-3 * 4 * accumulate / 512)  # per-device batch 4 x 1 device x accumulation
    expected = [lr_factor(s, per_epoch, total, 1e-5 / 1e-3, 1e-4 / 1e-3) for s in range(9)]
    assert factors == pytest.approx(expected)
    assert factors[per_epoch] == pytest.approx(1.0) and factors[total] == pytest.approx(0.1)
    assert math.isclose(factors[0], 0.01)


def test_cosine_without_an_end_is_a_clear_error(sixteen_images):
    with pytest.raises(ValueError, match="cosine LR schedule needs the run's length: set --trainer.max_epochs"):
        _fit(sixteen_images, max_epochs=-1)


@pytest.mark.parametrize("given", ["the data module", "its loader alone"])
def test_training_batches_reach_the_step_normalised_with_the_modules_mean_and_std(sixteen_images, given):
    """The loaders deliver uint8 images; the module normalises them on the device with its own mean and std (its own
    hook), whether fit() gets the data module or only its training loader."""
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    dm = PretrainDataModule(sixteen_images, img_size=32, mask_patch_size=8, batch_size=4, num_workers=0)
    model = SimMIMPretrainer(
        "swinv2_tiny", img_size=32, window_size=4, encoder_kwargs=ENC, lr_schedule="multistep", mean=mean, std=std,
        knn_every_n_epochs=0,
    )  # fmt: skip
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0])

    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=2, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
    )  # fmt: skip
    if given == "the data module":
        trainer.fit(model, datamodule=dm)
    else:
        dm.setup("fit")
        trainer.fit(model, train_dataloaders=dm.train_dataloader())
    assert len(seen) == 2 and all(x.dtype == torch.float32 for x in seen)
    pixels = torch.cat(seen) * (torch.tensor(std).view(1, 3, 1, 1) * 255) + torch.tensor(mean).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(pixels, pixels.round().clamp(0, 255), rtol=0, atol=1e-3)  # whole 0-255 values
