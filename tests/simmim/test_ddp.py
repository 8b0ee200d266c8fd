"""DDP runs that cannot hang: a stuck collective ends the run with a clear message, and data-loader workers are
started from a forkserver once a process group is up."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import image_folder

from simmim.data.loaders import worker_context

TESTS = str(Path(__file__).resolve().parents[1])  # recording.py
TINY = [
    "--data.img_size", "32", "--data.mask_patch_size", "8", "--data.batch_size", "4", "--data.val_fraction", "0",
    "--model.encoder_kwargs", '{"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}',
    "--trainer.limit_val_batches", "0", "--trainer.precision", "32", "--trainer.logger", "false",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
]  # fmt: skip


def test_workers_start_from_a_forkserver_once_a_process_group_is_up(tmp_path):
    """Without a process group workers fork as usual; with one (gloo, one process here) they start from a
    forkserver, and the datasets, transforms and sampler keys survive the pickling that needs."""
    import torch.distributed as dist

    from simmim.pretrain.data import PretrainDataModule

    assert worker_context(2) is None and worker_context(0) is None
    root = str(image_folder(tmp_path / "imgs", [f"{i}.png" for i in range(8)], size=40))
    dm = PretrainDataModule(root, img_size=32, mask_patch_size=8, batch_size=4, num_workers=2, val_fraction=0)
    dm.setup("fit")
    forked = [x for x, _, _ in dm.train_dataloader()]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert worker_context(2) == "forkserver" and worker_context(0) is None
        loader = dm.train_dataloader()
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
        served = [x for x, _, _ in loader]
    finally:
        dist.destroy_process_group()
    assert len(served) == 2 and all(torch.equal(a, b) for a, b in zip(forked, served))


@pytest.mark.slow
def test_a_stuck_collective_fails_with_a_clear_message(tmp_path):
    root = str(image_folder(tmp_path / "imgs", [f"{i}.png" for i in range(16)], size=40))
    stall = ["--trainer.callbacks+=recording.Stall", "--trainer.callbacks.seconds", "12"]  # > the 5 s limit
    args = ["--data.root", root, "--data.num_workers", "0", "--trainer.max_steps", "3", *TINY, *stall]
    args += ["--trainer.default_root_dir", str(tmp_path / "run"), "--collective_timeout_s", "5"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "simmim.pretrain", *args], capture_output=True, text=True, timeout=240, env=env
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert "error: a collective operation (gradient all-reduce, barrier, broadcast) timed out" in out.stderr
    assert time.monotonic() - start < 120


def test_the_timeout_option_names_the_strategy_it_needs(tmp_path):
    from simmim.pretrain import main

    with pytest.raises(SystemExit, match="--collective_timeout_s applies to a data-parallel .* not 'auto'"):
        main(["--collective_timeout_s", "5", "--trainer.default_root_dir", str(tmp_path), "--data.num_workers", "0"])
