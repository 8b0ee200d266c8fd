"""What both stages share: skipping non-finite steps, opt-in attention compilation."""

import torch
from conftest import TINY

import swinv2


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
