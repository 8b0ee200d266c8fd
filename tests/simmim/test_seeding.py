"""Where random draws come from (`simmim.seeding`): workers and ranks draw differently, the same seed repeats a
run with any number of workers, another seed does not, and a run killed mid-epoch resumes exactly."""

import shutil
import subprocess

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import image_folder, recorded_command, run_recorded

from simmim.pretrain.data import PretrainDataModule
from simmim.pretrain.module import SimMIMPretrainer
from simmim.seeding import SEED_ENV, SeededSampler, seed_step

ENC = dict(embed_dim=24, depths=(2, 2), num_heads=(2, 4))


def test_ranks_share_out_each_epoch_and_the_sampler_continues_a_position_at_any_world_size():
    size = 10
    for world in (1, 2, 3):
        shares = [list(SeededSampler(size, seed=5, num_replicas=world, rank=r)) for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # every rank reads as many samples (a padded tail)
        assert {i for s in shares for i, _ in s} == set(range(size))
    one = SeededSampler(size, seed=5)
    epoch0, epoch1 = list(one), (one.set_epoch(1), list(one))[1]
    assert [i for i, _ in epoch0] != [i for i, _ in epoch1]  # a new order each epoch
    assert len({s for _, s in epoch0 + epoch1}) == 2 * size  # every draw its own seed
    # 4 samples of epoch 1 consumed by 2 ranks, resumed on 3: the rest of the same order, the same seeds
    resumed = []
    for r in range(3):
        s = SeededSampler(size, seed=5, num_replicas=3, rank=r)
        s.pin(1, start=4)
        resumed += list(s)
    assert set(resumed) >= set(epoch1[4:]) and not set(resumed) & set(epoch1[:4])


def _copies_of_one_image(folder, n=16):
    src = image_folder(folder / "src", ["one.png"], size=48)
    (folder / "copies").mkdir()
    for i in range(n):
        shutil.copy(src / "one.png", folder / "copies" / f"{i:02d}.png")
    return str(folder / "copies")


def _all_train_images(root, workers):
    dm = PretrainDataModule(root, img_size=32, mask_patch_size=8, batch_size=4, num_workers=workers, val_fraction=0)
    dm.setup("fit")
    return torch.cat([x for x, _, _ in dm.train_dataloader()]), torch.cat([m for _, m, _ in dm.train_dataloader()])


def test_two_workers_give_distinct_crops_and_the_same_ones_as_no_workers(tmp_path, monkeypatch):
    """16 copies of one image: each sample its own crop, flip and mask; 2 workers or none, the same draws."""
    monkeypatch.setenv(SEED_ENV, "3")
    root = _copies_of_one_image(tmp_path)
    x2, m2 = _all_train_images(root, workers=2)
    assert len({x.numpy().tobytes() for x in x2}) == 16
    x0, m0 = _all_train_images(root, workers=0)
    assert torch.equal(x0, x2) and torch.equal(m0, m2)


def test_step_draws_differ_between_ranks_and_repeat_for_the_same_step():
    def draws(rank, epoch, batch):
        seed_step(rank, epoch, batch)
        return torch.rand(3).tolist(), float(np.random.rand())

    assert draws(0, 2, 5) == draws(0, 2, 5)
    assert draws(1, 2, 5)[0] != draws(0, 2, 5)[0] and draws(1, 2, 5)[1] != draws(0, 2, 5)[1]
    assert draws(0, 2, 6) != draws(0, 2, 5)


def _losses(root, seed, workers, steps=10):
    pl.seed_everything(seed)  # sets PL_GLOBAL_SEED as --seed_everything does
    dm = PretrainDataModule(root, img_size=32, mask_patch_size=8, batch_size=4, num_workers=workers, val_fraction=0)
    model = SimMIMPretrainer(
        "swinv2_tiny", img_size=32, window_size=4, encoder_kwargs=ENC, norm_target_patch_size=None,
        drop_path_rate=0.2, warmup_epochs=0,
    )  # fmt: skip
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[Record()],
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    return losses


def test_same_seed_repeats_the_losses_with_any_worker_count_and_another_seed_does_not(tmp_path, monkeypatch):
    monkeypatch.delenv(SEED_ENV, raising=False)
    root = str(image_folder(tmp_path / "imgs", [f"{i}.png" for i in range(24)], size=40))
    first = _losses(root, seed=7, workers=0)
    assert len(first) == 10
    assert _losses(root, seed=7, workers=0) == first
    assert _losses(root, seed=7, workers=2) == first  # 6 batches per epoch: crosses an epoch, reshuffled
    other = _losses(root, seed=8, workers=0)
    assert all(a != b for a, b in zip(other, first))


TINY_RUN = [
    "--data.img_size", "32", "--data.mask_patch_size", "8", "--data.batch_size", "4", "--data.val_fraction", "0",
    "--model.encoder_kwargs", '{"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}',
    "--model.drop_path_rate", "0.2", "--trainer.limit_val_batches", "0", "--trainer.precision", "32",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_exactly(tmp_path):
    """SIGKILL in the second epoch (2 workers, a checkpoint every step), then `--ckpt_path last`: together the two
    runs train on the samples, crops, masks and losses of an uninterrupted run, in its order, and end with its
    weights; the resume continues in the killed run's folder and does not warn about resuming mid-epoch."""
    from recording import read_log
    from safetensors.torch import load_file

    root = str(image_folder(tmp_path / "imgs", [f"{i}.png" for i in range(24)], size=40))
    common = ["--data.root", root, "--data.num_workers", "2", "--trainer.max_epochs", "2", *TINY_RUN]
    cut = [*common, "--trainer.default_root_dir", str(tmp_path / "cut"), "--checkpoint_every_n_steps", "1"]
    whole_cmd = recorded_command(
        [*common, "--trainer.default_root_dir", str(tmp_path / "whole")], tmp_path / "whole.jsonl"
    )
    killed_cmd = recorded_command(cut, tmp_path / "cut.jsonl", kill_at_step=8)  # 6 batches an epoch: epoch 1, batch 2
    results = []
    for name, (cmd, env) in (("whole", whole_cmd), ("killed", killed_cmd)):  # independent: side by side
        with open(tmp_path / f"{name}.err", "w") as err:
            results.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env), name))
    whole, killed = (p.wait(timeout=600) for p, _ in results)
    assert whole == 0, (tmp_path / "whole.err").read_text()[-3000:]
    assert killed == -9, (tmp_path / "killed.err").read_text()[-3000:]
    assert len(read_log(tmp_path / "cut.jsonl")) == 8
    resumed = run_recorded([*cut, "--ckpt_path", "last"], tmp_path / "cut.jsonl")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr and "resuming from a checkpoint that ended" not in resumed.stderr

    a, b = read_log(tmp_path / "whole.jsonl"), read_log(tmp_path / "cut.jsonl")
    assert [(r["epoch"], r["batch"], r["images"], r["masks"]) for r in b] == [
        (r["epoch"], r["batch"], r["images"], r["masks"]) for r in a
    ]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert not (tmp_path / "cut" / "logs" / "version_1").exists()  # one run, one folder
    wa = load_file(tmp_path / "whole" / "logs" / "version_0" / "encoder.safetensors")
    wb = load_file(tmp_path / "cut" / "logs" / "version_0" / "encoder.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_a_pinned_epoch_wins_over_a_later_set_epoch():
    """Lightning calls `set_epoch` after the loader is iterated; without workers the order is drawn at the first
    batch, after that call. The loader pins the epoch at `iter()`, so 0 and N workers read the same epoch."""
    s = SeededSampler(10, seed=1)
    s.set_epoch(2)
    expected = list(s)
    s.pin(2)
    s.set_epoch(3)
    assert list(s) == expected
    assert list(s) != expected  # the pin applied once: epoch 3 now
