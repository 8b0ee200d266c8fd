"""The reconstruction grid shows images spread over the validation set, not its first batch."""

from types import SimpleNamespace

import torch

from simmim.pretrain.callbacks import ReconstructionGrid


def test_grid_images_are_spread_over_the_validation_set():
    """Five batches of 8 in file order (so, in a class-folder tree, the first batch is one class): the grid takes
    every fifth image, from every batch."""
    grid = ReconstructionGrid(num_images=8)
    trainer = SimpleNamespace(num_val_batches=[5], datamodule=SimpleNamespace(batch_size=8))
    module = SimpleNamespace()
    grid.on_validation_epoch_start(trainer, module)
    for b in range(5):
        positions = torch.arange(8 * b, 8 * b + 8, dtype=torch.float32)
        x = positions.view(8, 1, 1, 1).expand(8, 3, 4, 4)
        grid.on_validation_batch_end(trainer, module, None, (x, torch.zeros(8, 2, 2), ()), b)
    images, masks = grid.batch
    assert images[:, 0, 0, 0].tolist() == [0, 5, 10, 15, 20, 25, 30, 35] and masks.shape == (8, 2, 2)


def test_a_small_validation_set_gives_what_it_has():
    grid = ReconstructionGrid(num_images=8)
    trainer = SimpleNamespace(num_val_batches=[1], datamodule=SimpleNamespace(batch_size=8))
    module = SimpleNamespace()
    grid.on_validation_epoch_start(trainer, module)
    x = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 3, 4, 4)
    grid.on_validation_batch_end(trainer, module, None, (x, torch.zeros(3, 2, 2), ()), 0)
    assert grid.batch[0][:, 0, 0, 0].tolist() == [0, 1, 2]


def test_a_partial_last_batch_still_gives_a_full_grid():
    """10 validation images in batches of 8: the stride comes from the images, not from the batches' capacity."""
    grid = ReconstructionGrid(num_images=8)
    trainer = SimpleNamespace(
        num_val_batches=[2], world_size=1, datamodule=SimpleNamespace(batch_size=8, val_files=list(range(10)))
    )
    module = SimpleNamespace()
    grid.on_validation_epoch_start(trainer, module)
    for b, n in enumerate((8, 2)):
        x = torch.arange(8 * b, 8 * b + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4)
        grid.on_validation_batch_end(trainer, module, None, (x, torch.zeros(n, 2, 2), ()), b)
    assert grid.batch[0][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
