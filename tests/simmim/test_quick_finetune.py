"""The quick fine-tune monitor's fine-tune: it trains a copy (the encoder is untouched), learns what the labels
separate, and repeats itself exactly under the same draws (so two checkpoints are compared under the same draws)."""

import torch
from conftest import TINY

import swinv2
from simmim.monitors import _spread, quick_finetune_top1


def _four_classes(n: int, seed: int, noise: float = 0.5):
    """Images whose class is a colour offset (red up, red down, green up, green down), under noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    offset = torch.zeros(n, 3)
    offset[torch.arange(n), labels // 2] = (labels % 2) * 2.0 - 1.0
    return torch.randn(n, 3, 32, 32, generator=g) * noise + offset[:, :, None, None], labels


def test_fine_tunes_a_copy_and_repeats_itself():
    encoder = swinv2.SwinTransformerV2(**{**TINY, "num_classes": 0, "drop_path_rate": 0.2})  # draws of its own
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    train, val = _four_classes(64, 0), _four_classes(64, 1)
    untrained, *trained = (
        quick_finetune_top1(encoder, train, val, 4, steps=steps, generator=torch.Generator().manual_seed(3))
        for steps in (0, 30, 30)
    )
    assert untrained < 60 and trained[0] > 95  # it learns what the labels separate; the fresh head does not know it
    assert trained[0] == trained[1]  # the same draws, the same value
    # unconverged (a few steps on noisier data), so the value depends on every draw: the same generator seed gives
    # the same value whatever the global generators hold, and leaves them as they were
    noisy = _four_classes(64, 0, noise=6.0), _four_classes(64, 1, noise=6.0)
    values = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        values.append(quick_finetune_top1(encoder, *noisy, 4, steps=4, generator=torch.Generator().manual_seed(5)))
        assert torch.equal(torch.get_rng_state(), state)
    others = {
        quick_finetune_top1(encoder, *noisy, 4, steps=4, generator=torch.Generator().manual_seed(s)) for s in range(4)
    }
    assert values[0] == values[1] and 0 < values[0] < 100 and len(others) > 1
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # the encoder is untouched
    assert isinstance(encoder.head, torch.nn.Identity)


def test_spread_keeps_every_class_of_a_sorted_list():
    items = [c for c in range(5) for _ in range(100)]  # 5 classes, folder order
    picked = _spread(items, 20)
    assert len(picked) == 20 and sorted(set(picked)) == [0, 1, 2, 3, 4]
    assert _spread(items[:7], 20) == items[:7]
