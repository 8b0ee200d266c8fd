"""The weighted kNN classifier against a plain loop, and the resize it embeds images at."""

import math

import numpy as np
import torch

from simmim.monitors import ResizeCenterCrop, knn_top1


def _reference_top1(train, train_labels, val, val_labels, num_classes, k, temperature):
    """One validation image at a time, in float64 Python: cosine similarity to every training image, the k most
    similar vote exp(similarity / T) for their class."""
    correct = 0
    for v, label in zip(val.tolist(), val_labels.tolist()):
        sims = []
        for t, c in zip(train.tolist(), train_labels.tolist()):
            dot = sum(a * b for a, b in zip(v, t))
            sims.append((dot / math.sqrt(sum(a * a for a in v) * sum(b * b for b in t)), c))
        votes = [0.0] * num_classes
        for s, c in sorted(sims, reverse=True)[:k]:
            votes[c] += math.exp(s / temperature)
        correct += votes.index(max(votes)) == label
    return correct / len(val_labels)


def test_weighted_knn_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g)
    train_labels = torch.randint(0, 4, (120,), generator=g)
    val_labels = torch.randint(0, 4, (50,), generator=g)
    train = centres[train_labels] + 1.2 * torch.randn(120, 16, generator=g)
    val = centres[val_labels] + 1.2 * torch.randn(50, 16, generator=g)
    for k, temperature in ((20, 0.07), (1, 1.0), (7, 0.5)):
        got = knn_top1(train, train_labels, val, val_labels, 4, k, temperature, chunk=16)
        assert got == _reference_top1(train, train_labels, val, val_labels, 4, k, temperature)
    assert 0.4 < knn_top1(train, train_labels, val, val_labels, 4) < 1.0  # neither trivial nor chance


def test_k_larger_than_the_training_set_uses_all_of_it():
    train, labels = torch.eye(3), torch.tensor([0, 1, 1])
    assert knn_top1(train, labels, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0]), 2, k=20) == 1.0


def test_resize_center_crop_keeps_the_middle_of_the_short_side():
    image = np.zeros((60, 100, 3), np.uint8)
    image[:, 40:60] = 255  # a vertical band in the middle
    x = ResizeCenterCrop(30, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert x.shape == (3, 30, 30)
    band = x[0, 0]  # std 1 of the 0-1 range: pixels / 255
    assert band[10:20].min() > 0.9 and band[:8].max() < 0.1 and band[22:].max() < 0.1
    gray = ResizeCenterCrop(30, mean=(0,), std=(1,))(np.ascontiguousarray(image[:, :, 0]))  # (H, W), shrunk
    assert gray.shape == (1, 30, 30) and torch.equal(gray[0], x[0])


def test_both_monitors_read_their_images_normalised_as_the_module_trains(tmp_path, monkeypatch):
    """The kNN and quick fine-tune monitors embed images normalised with the pretraining module's mean and std (its
    training images' normalisation), not ImageNet's."""
    from types import SimpleNamespace

    from conftest import image_folder

    import simmim.monitors as monitors
    from simmim.pretrain.module import SimMIMPretrainer

    for c in range(2):
        image_folder(tmp_path / f"class{c}", [f"{i}.png" for i in range(5)], 40)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    module = SimMIMPretrainer("swinv2_tiny", img_size=32, window_size=4, mean=mean, std=std,
                              encoder_kwargs=dict(embed_dim=24, depths=(2, 2), num_heads=(2, 4)))  # fmt: skip
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    module._trainer = SimpleNamespace(global_rank=0, world_size=1, precision_plugin=None, strategy=cpu)
    images = []

    def record(encoder, batches, device, precision=None):
        batches = list(batches)
        images.extend(x for x, *_ in batches)
        return torch.zeros(sum(len(x) for x, *_ in batches), 24 * 2), torch.cat([y for _, y, *_ in batches])

    monkeypatch.setattr(monitors, "embed", record)
    knn = monitors.KNNMonitor(str(tmp_path), 32)
    knn.setup(module._trainer, module, "fit")
    knn._gathered_features(module, knn.val_files, knn.val_labels)
    quick = monitors.QuickFinetuneMonitor(str(tmp_path), 32, label_fraction=1.0)
    quick.setup(None, module, "fit")
    for x in (*images, quick.data[0][0], quick.data[1][0]):
        pixels = x * (torch.tensor(std).view(1, 3, 1, 1) * 255) + torch.tensor(mean).view(1, 3, 1, 1) * 255
        torch.testing.assert_close(pixels, pixels.round().clamp(0, 255), rtol=0, atol=1e-3)  # whole 0-255 values
    assert images
