"""What both stages share (`simmim.stage.StageModule`): non-finite steps skipped, counted and logged; raw images
refused with advice; opt-in attention compilation."""

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY

import swinv2
from simmim.errors import ConfigError

ENC = dict(embed_dim=24, depths=(2, 2), num_heads=(2, 4))


def _stage(name, root):
    """A tiny module and data module of one stage, on the digits at 32 px."""
    if name == "pretrain":
        from simmim.pretrain.data import PretrainDataModule
        from simmim.pretrain.module import SimMIMPretrainer

        module = SimMIMPretrainer(
            "swinv2_tiny", 32, window_size=4, encoder_kwargs=ENC, knn_every_n_epochs=0, finetune_every_n_epochs=0
        )
        return module, PretrainDataModule(root, 32, mask_patch_size=8, batch_size=4, num_workers=0)
    from simmim.finetune.data import ClassificationDataModule
    from simmim.finetune.module import SwinV2Classifier

    module = SwinV2Classifier("swinv2_tiny", 10, 32, 4, encoder_kwargs=ENC, mixup=0.0, cutmix=0.0)
    return module, ClassificationDataModule(root, 32, batch_size=4, num_workers=0, augment="digits")


class _NanAtFirstStep(pl.Callback):
    """Puts a NaN into one gradient before the first optimizer step (callbacks run before the module's hook)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


@pytest.fixture(scope="module")
def digits32(tmp_path_factory):
    from simmim.data.builtin import prepare_digits

    return str(prepare_digits(tmp_path_factory.mktemp("digits"), size=32))


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


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_both_stages_refuse_raw_images_with_what_to_do(name, digits32):
    module, _ = _stage(name, digits32)
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    batch = (images, torch.zeros(2, 8, 8), ()) if name == "pretrain" else (images, torch.zeros(2).long(), 0, ())
    with pytest.raises(ConfigError, match=r"uint8 images.*pass the data module itself"):
        module.training_step(batch, 0)


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
