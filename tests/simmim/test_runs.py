"""Run folders (`simmim.checkpointing.runs`): a second run never overwrites the first, `--ckpt_path last` resumes the
newest run in its own folder, a shared folder is claimed, and a used one stops a new run with what to do."""

import os
import subprocess
import sys

import pytest

from simmim.checkpointing.runs import LOCK_NAME, claim_folder
from simmim.pretrain import main

QUICK = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.precision", "32", "--data.num_workers", "0", "--data.batch_size", "16",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip


def test_a_second_run_gets_its_own_folder_and_last_resumes_the_newest_in_it(tmp_path, digits):
    args = ["--data.root", digits, "--trainer.default_root_dir", str(tmp_path), *QUICK]
    main(args)
    first = tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    before = first.read_bytes()
    main(args)  # `make pretrain` twice: a second run, not an error and not a lost first run
    second = tmp_path / "logs" / "version_1" / "checkpoints" / "last.ckpt"
    assert second.is_file() and first.read_bytes() == before
    cli = main([*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 4  # 2 steps trained, 2 more resumed
    assert not (tmp_path / "logs" / "version_2").exists() and first.read_bytes() == before
    assert not list(tmp_path.glob(f"**/{LOCK_NAME}"))  # claims are released at the end


def test_a_used_shared_folder_stops_a_new_run_and_keeps_resume_and_validate(tmp_path, digits):
    args = ["--data.root", digits, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", *QUICK]
    main(args)
    last, config = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "config.yaml"
    before, config_before = last.read_bytes(), config.read_text()
    with pytest.raises(SystemExit, match=r"^error: .*checkpoints holds another run's checkpoints: to resume .*"):
        main([*args, "--model.base_lr", "0.5"])
    assert last.read_bytes() == before and config.read_text() == config_before  # refused before writing anything
    main(["validate", *args, "--ckpt_path", "last"])
    cli = main([*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 4


def test_a_claim_by_a_live_run_is_refused_and_one_by_a_dead_run_taken_over(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        import json
        import socket

        lock = tmp_path / LOCK_NAME
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "started": "now"}))
        assert f"another run (pid {live.pid}" in claim_folder(tmp_path, resuming_here=True)
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "then"}))
        assert claim_folder(tmp_path, resuming_here=False) is None
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        live.kill()


def test_a_run_that_fails_releases_its_claim(tmp_path):
    from conftest import image_folder

    names = [f"{i:02d}.png" for i in range(12)]
    folder = image_folder(tmp_path / "images", names, size=64, broken=names[:6])
    args = ["--data.root", str(folder), "--trainer.default_root_dir", str(tmp_path / "run"), *QUICK]
    with pytest.warns(UserWarning), pytest.raises(SystemExit, match="could not be decoded"):
        main([*args, "--trainer.logger", "false", "--data.batch_size", "4", "--data.val_fraction", "0"])
    assert not list((tmp_path / "run").glob(f"**/{LOCK_NAME}"))


@pytest.mark.slow
def test_a_resume_from_an_epoch_end_checkpoint_reads_the_next_epoch(tmp_path):
    """1 epoch, then `--ckpt_path last` to 3 epochs, with 2 workers (which prefetch as soon as the loader is
    iterated, before Lightning sets the epoch): the same samples, crops, masks and losses as 3 epochs at once."""
    from conftest import image_folder
    from recording import read_log

    folder = image_folder(tmp_path / "images", [f"{i:02d}.png" for i in range(24)], size=40)
    common = [
        "--data.root", str(folder), "--data.img_size", "32", "--data.mask_patch_size", "8", "--data.batch_size", "8",
        "--data.val_fraction", "0.25", "--data.num_workers", "2", "--trainer.precision", "32",
        "--model.encoder_kwargs", '{"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}',
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=recording.BatchLog",
    ]  # fmt: skip
    whole = [*common, "--trainer.callbacks.path", str(tmp_path / "whole.jsonl")]
    main([*whole, "--trainer.default_root_dir", str(tmp_path / "a"), "--trainer.max_epochs", "3"])
    cut = [*common, "--trainer.callbacks.path", str(tmp_path / "cut.jsonl"), "--trainer.default_root_dir"]
    main([*cut, str(tmp_path / "b"), "--trainer.max_epochs", "1"])
    main([*cut, str(tmp_path / "b"), "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    a, b = read_log(tmp_path / "whole.jsonl"), read_log(tmp_path / "cut.jsonl")
    assert len(a) == 3 * 2 and [r["epoch"] for r in b] == [r["epoch"] for r in a]
    assert [(r["images"], r["masks"]) for r in b] == [(r["images"], r["masks"]) for r in a]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
