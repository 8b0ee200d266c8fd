"""What both stages share (`simmim.stage.StageModule`): non-finite steps skipped, counted and logged; uint8 images
normalised by the module itself, with its own mean and std; opt-in attention compilation."""

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY

import swinv2
from simmim.errors import ConfigError

ENC = dict(embed_dim=24, depths=(2, 2), num_heads=(2, 4))


def _stage(name, root, **norm):
    """A tiny module and data module of one stage, on the digits at 32 px (`norm`: the module's mean and std)."""
    if name == "pretrain":
        from simmim.pretrain.data import PretrainDataModule
        from simmim.pretrain.module import SimMIMPretrainer

        module = SimMIMPretrainer(
            "swinv2_tiny", 32, window_size=4, encoder_kwargs=ENC, knn_every_n_epochs=0, finetune_every_n_epochs=0,
            **norm,
        )  # fmt: skip
        return module, PretrainDataModule(root, 32, mask_patch_size=8, batch_size=4, num_workers=0)
    from simmim.finetune.data import ClassificationDataModule
    from simmim.finetune.module import SwinV2Classifier

    module = SwinV2Classifier("swinv2_tiny", 10, 32, 4, encoder_kwargs=ENC, mixup=0.0, cutmix=0.0, **norm)
    return module, ClassificationDataModule(root, 32, batch_size=4, num_workers=0, augment="digits")


class _NanAtFirstStep(pl.Callback):
    """Puts a NaN into one gradient before the first optimizer step (callbacks run before the module's hook)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_both_stages_skip_count_and_log_a_non_finite_step(name, digits32, capsys):
    module, data = _stage(name, digits32)
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[_NanAtFirstStep()],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert module.skipped_steps == 1 and trainer.callback_metrics["train/skipped_steps"] == 1.0
    assert "step 0: non-finite gradients, optimizer step skipped (1 so far)" in capsys.readouterr().out


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not ImageNet's: a test that would pass with the defaults cannot


def _pixels(x, mean=MEAN, std=STD):
    """The 0-255 values that normalised images `x` came from, per channel."""
    return x.float() * (torch.tensor(std).view(1, 3, 1, 1) * 255) + torch.tensor(mean).view(1, 3, 1, 1) * 255


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_both_stages_normalise_uint8_images_with_their_own_mean_and_std(name, digits32):
    """Right after the copy to the device (the module's own hook, so a loader handed to fit() alone is covered too)
    and in the steps (`images`); floats are left alone; under bf16-true the images come in the weights' dtype."""
    from types import SimpleNamespace

    module, _ = _stage(name, digits32, mean=MEAN, std=STD)
    raw = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    rest = (torch.zeros(2, 8, 8, dtype=torch.bool), ()) if name == "pretrain" else (torch.zeros(2).long(), 0, ())
    x, *after = module.on_after_batch_transfer((raw, *rest), 0)
    assert x.dtype == torch.float32 and all(a is b for a, b in zip(after, rest))
    torch.testing.assert_close(_pixels(x), raw.float(), rtol=0, atol=1e-4)
    floats = torch.randn(2, 3, 32, 32)
    assert module.on_after_batch_transfer((floats, *rest), 0)[0] is floats
    empty = module.images(torch.empty(0, 3, 32, 32, dtype=torch.uint8))  # a batch with nothing readable
    assert empty.shape == (0, 3, 32, 32) and empty.dtype == torch.float32
    assert torch.equal(module.images(raw), x)  # what a step calls, for a data module with a hook of its own
    module._trainer = SimpleNamespace(precision="bf16-true")
    assert torch.equal(module.images(raw), x.to(torch.bfloat16))
    assert module.blank_images().dtype == torch.bfloat16  # the stand-in of an empty batch too


def test_a_data_module_normalising_with_other_values_is_refused(digits32):
    """Fine-tuning's loaders normalise (before random erasing); float batches pass the module untouched, so values
    that differ from the module's would go unnoticed: refused before the first step."""
    module, data = _stage("finetune", digits32, mean=MEAN, std=STD)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"the data module normalises with mean \[0.485, 0.456, 0.406\], the module"):
        trainer.fit(module, datamodule=data)


def test_nonfinite_gradients_skip_the_step():
    from simmim.optim import drop_nonfinite_grads

    model = swinv2.SwinTransformerV2(**TINY)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert not drop_nonfinite_grads(model) and model.head.weight.grad is not None
    model.head.weight.grad[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    assert drop_nonfinite_grads(model)
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_stages_can_compile_the_attention():
    from simmim.finetune.module import SwinV2Classifier
    from simmim.pretrain.module import SimMIMPretrainer

    enc = dict(embed_dim=24, depths=(2, 2), num_heads=(2, 4))
    pre = SimMIMPretrainer("swinv2_tiny", img_size=32, window_size=4, encoder_kwargs=enc, compile_attention=True)
    fine = SwinV2Classifier("swinv2_tiny", 10, 32, 4, encoder_kwargs=enc, compile_attention=True)
    for model in (pre.encoder, fine.model):
        assert all(blk.attn._compiled_call_impl is not None for layer in model.layers for blk in layer.blocks)
    assert (
        SwinV2Classifier("swinv2_tiny", 10, 32, 4, encoder_kwargs=enc)
        .model.layers[0]
        .blocks[0]
        .attn._compiled_call_impl
        is None
    )
