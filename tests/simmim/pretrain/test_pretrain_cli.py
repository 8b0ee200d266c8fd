"""The pretraining CLI end to end on tiny budgets: configs, bad keys, learning, resume, export."""

import importlib
import os
import warnings
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import image_folder, run_ddp_on_cpu
from omegaconf import OmegaConf

import swinv2
from simmim.pretrain import main

CONFIGS = sorted((Path(__file__).parents[3] / "configs" / "pretrain").glob("*.yaml"))
FAST = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--data.num_workers", "0"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_pretrain_config_parses_and_instantiates(config, tmp_path, digits):
    cfg = OmegaConf.load(config)
    # Large variants: check the recipe values, instantiate a shrunken copy so the test stays fast.
    args = ["fit", "--config", str(config), "--data.root", digits, "--trainer.default_root_dir", str(tmp_path)]
    args += ["--print_config"]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    assert cfg.model.arch.startswith("swinv2_")
    with torch.device("meta"):
        swinv2.create_model(
            cfg.model.arch,
            img_size=cfg.data.img_size,
            window_size=cfg.model.window_size,
            mask_token=True,
            **(cfg.model.get("encoder_kwargs") or {}),
        )


def test_unknown_config_key_names_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.learning_rat", "0.1", "--trainer.default_root_dir", str(tmp_path)])
    assert "learning_rat" in capsys.readouterr().err


def _fit(tmp_path, digits, *extra):
    return main(
        [
            "fit",
            "--data.root",
            digits,
            "--trainer.default_root_dir",
            str(tmp_path),
            "--data.batch_size",
            "32",
            *FAST,
            *extra,
        ]
    )


@pytest.mark.slow
def test_validation_loss_falls_and_encoder_is_exported(tmp_path, digits):
    before = main(["validate", "--data.root", digits, "--trainer.default_root_dir", str(tmp_path), *FAST])
    loss0 = before.trainer.callback_metrics["val/loss"].item()
    # fp32: on a CPU without native bf16 (emulated, ~400x slower matmuls) bf16-mixed made this test take minutes
    cli = _fit(
        tmp_path,
        digits,
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "20",
        "--trainer.precision",
        "32",
    )
    loss1 = cli.trainer.callback_metrics["val/loss"].item()
    assert loss1 < 0.95 * loss0, (loss0, loss1)  # 40 steps of 32 images: about 10% lower
    export = cli.export.path
    assert os.path.exists(export) and os.path.exists(cli.setting("grid").last_path)
    x, mask = torch.randn(2, 3, 64, 64), torch.rand(2, 16, 16) < 0.6
    with torch.no_grad():
        expected = cli.model.encoder.eval().forward_features(x, mask)
        for path in (export, cli.trainer.checkpoint_callback.last_model_path):  # the export, the Lightning checkpoint
            enc = swinv2.create_model_from_checkpoint(path).eval()  # from the file alone
            torch.testing.assert_close(enc.forward_features(x, mask), expected, atol=0, rtol=0)
    assert enc.load_report.prefix == "model.encoder."
    assert enc.load_report.windows == ((4, 4), (4, 4), (4, 4), (2, 2))  # stage 4 is 2x2 at 64 px


@pytest.mark.slow
def test_resume_from_last_continues_step_and_optimizer_state(tmp_path, digits):
    first = _fit(
        tmp_path,
        digits,
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "1",
    )
    assert first.trainer.global_step == 3
    saved = torch.load(os.path.join(tmp_path, "checkpoints", "last.ckpt"), weights_only=False)
    second = _fit(
        tmp_path,
        digits,
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--ckpt_path",
        "last",
    )
    assert second.trainer.global_step == 6
    assert saved["global_step"] == 3
    resumed = torch.load(os.path.join(tmp_path, "checkpoints", "last.ckpt"), weights_only=False)
    state = resumed["optimizer_states"][0]["state"]
    assert all(s["step"].item() == 6 for s in state.values())  # Adam moments continued, not restarted


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_default_root_dir_moves_the_logs_too(stage, tmp_path, capsys):
    """The default configs' TensorBoard folder follows `--trainer.default_root_dir` (an interpolation, not a copy)."""
    stage_main = importlib.import_module(f"simmim.{stage}").main
    root = tmp_path / "elsewhere"
    args = ["fit", "--trainer.default_root_dir", str(root)]
    if stage == "finetune":
        args += ["--model.pretrained", "null"]  # the default looks for the default pretraining export
    with pytest.raises(SystemExit):
        stage_main([*args, "--print_config"])
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.trainer.logger.init_args.save_dir == str(root)


def test_batch_size_one_survives_an_unreadable_file(tmp_path):
    """Training refills a bad file's slot, so even a batch of one never arrives empty; the file is counted."""
    names = [f"{i}.png" for i in range(6)] + ["3_broken.png"]
    folder = image_folder(tmp_path / "images", names, size=64, broken=["3_broken.png"])
    args = ["--data.batch_size", "1", "--data.val_fraction", "0", "--trainer.limit_val_batches", "0"]
    with pytest.warns(UserWarning, match="3_broken.png"):
        cli = _fit(tmp_path, str(folder), *args, "--trainer.max_epochs", "1")
    assert cli.trainer.global_step == 7  # every file's slot trained, the bad one with its neighbour
    assert cli.bad_images.bad == {4}  # 3_broken.png, the 5th file, counted once
    assert float(cli.trainer.callback_metrics["train/data_wait_ms"]) >= 0  # the CLI logs the wait for data


def _shards():
    """The training order's shares for seed 0 and epoch 0 over 16 files on 2 ranks."""
    from simmim.seeding import SeededSampler

    return tuple([i for i, _ in SeededSampler(16, seed=0, num_replicas=2, rank=r)] for r in (0, 1))


def _refilled_from_good(shard):
    return [i for i in shard if (i + 1) % 16 not in shard]  # its refill neighbour is read by the other rank


@pytest.mark.slow
def test_ddp_run_under_the_limit_completes(tmp_path, monkeypatch):
    """Two unreadable files, both in rank 1's shard: 2 of the 16 files (under the limit of 0.15), although 2 of
    rank 1's 8 (over it). Judged per rank, rank 1 would stop alone and leave rank 0 waiting."""
    bad = _refilled_from_good(_shards()[1])[:2]
    folder = image_folder(tmp_path / "images", [f"{i:02d}.png" for i in range(16)], 64, [f"{i:02d}.png" for i in bad])
    args = ["--data.root", str(folder), "--data.val_fraction", "0", "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.limit_val_batches", "0", "--trainer.max_epochs", "1", "--data.batch_size", "8"]
    knn_root = tmp_path / "labelled"  # 37 images (one unreadable), split 80/20: shares of unequal size per rank
    for c, n in enumerate((13, 12, 12)):
        image_folder(knn_root / f"class{c}", [f"{c}_{i}.png" for i in range(n)], 40, ["0_3.png"] if c == 0 else ())
    knn = ["--model.knn_root", str(knn_root), "--model.knn_every_n_epochs", "1", "--model.knn_k", "5"]
    knn += ["--trainer.precision", "32"]  # the same arithmetic as the check below on any CPU
    knn += ["--model.finetune_every_n_epochs", "1", "--model.finetune_steps", "3"]  # and the quick fine-tune
    out = run_ddp_on_cpu("simmim.pretrain", *args, "--bad_images.max_fraction", "0.15", *FAST, *knn)
    assert all(f"{i:02d}.png" in out.stderr for i in bad)  # both were warned about, on rank 1
    # the two ranks' features gathered = every readable image once: the kNN of the exported encoder in one process
    from simmim.data.folders import LabelledImageDataset, labelled_split
    from simmim.monitors import KNNMonitor, ResizeCenterCrop, embed, knn_top1

    encoder = swinv2.create_model_from_checkpoint(next(tmp_path.rglob("encoder.safetensors"))).eval()
    tf, tl, vf, vl, classes = labelled_split(str(knn_root), KNNMonitor(None, 64).val_fraction)
    with pytest.warns(UserWarning, match="0_3.png"):
        sets = [embed(encoder, _batches(LabelledImageDataset(f, y, ResizeCenterCrop(64))), torch.device("cpu"))
                for f, y in ((tf, tl), (vf, vl))]  # fmt: skip
    train, val = len(sets[0][0]), len(sets[1][0])
    assert train + val == 36
    expected = 100 * knn_top1(*sets[0], *sets[1], len(classes), k=5)
    summary = f"kNN top-1 (val/knn_acc1): {expected:.2f}% of {val} images, voting {train} labelled images"
    assert summary in out.stdout, out.stdout[-800:]
    # the quick fine-tune: every rank ran the same one over every readable labelled image; one process agrees
    from simmim.monitors import QuickFinetuneMonitor, load_images, quick_finetune_top1
    from simmim.seeding import monitor_generator

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # the run's seed (the default config's), whatever ran before

    monitor = QuickFinetuneMonitor(str(knn_root), 64)
    tf, tl, vf, vl, classes = labelled_split(str(knn_root), monitor.val_fraction, monitor.label_fraction)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # as each of the two ranks ran
    try:
        picked = {os.path.basename(f) for f in [*tf, *vf]}
        with pytest.warns(UserWarning, match="0_3.png") if "0_3.png" in picked else nullcontext():
            sets = load_images(tf, tl, 64), load_images(vf, vl, 64)
        quick = quick_finetune_top1(encoder, *sets, len(classes), 3, generator=monitor_generator())
    finally:
        torch.set_num_threads(threads)
    summary = f"quick fine-tune top-1 (val/finetune_acc1): {quick:.2f}%, from the initial weights "
    assert summary in out.stdout, out.stdout[-800:]
    assert f"fine-tuned for 3 steps on {len(sets[0][1])} labelled images, scored on {len(sets[1][1])}" in out.stdout


def _batches(dataset):
    from functools import partial

    from simmim.data.loaders import collate_readable

    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=partial(collate_readable, num_fields=3))
    return list(loader)


@pytest.mark.slow
def test_ddp_ranks_pool_what_they_found_and_stop_together(tmp_path):
    """One unreadable file in each rank's shard: 1 per rank is within the tolerated one, 2 over both ranks exceed
    0.1 x 16. Both ranks must stop at the same step with the message; a rank stopping alone would hang the other."""
    import subprocess
    import sys

    zero, one = _shards()
    first = _refilled_from_good(zero)[0]
    second = [j for j in _refilled_from_good(one) if (j - first) % 16 not in (1, 15)][0]  # not each other's refill
    bad = [first, second]
    folder = image_folder(tmp_path / "images", [f"{i:02d}.png" for i in range(16)], 64, [f"{i:02d}.png" for i in bad])
    args = ["--data.root", str(folder), "--data.val_fraction", "0", "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.limit_val_batches", "0", "--trainer.max_epochs", "1", "--data.batch_size", "8"]
    ddp = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    cmd = [sys.executable, "-m", "simmim.pretrain", *args, "--bad_images.max_fraction", "0.1", *ddp, *FAST]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert out.stderr.count("2 of the 16 training images could not be decoded") >= 1, out.stderr[-2000:]


def test_configured_callbacks_join_the_stages_own_and_the_saved_config_lists_every_one(tmp_path, digits):
    """A callback named on the command line (or in a config) reaches the trainer beside the stage's callbacks, and
    checkpoints are still read through the safe reader. The callbacks without a setting are the default
    `--trainer.callbacks`: the saved config.yaml lists them, a list that replaces the default gets them back, and a
    run from the saved config has each once."""
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

    from simmim.checkpointing.exports import ExportWeights, SafeCheckpointIO
    from simmim.checkpointing.runs import ClaimCheckpointFolders
    from simmim.data.watch import BadImageLimit, DataWaitTimer

    lr_monitor = "pytorch_lightning.callbacks.LearningRateMonitor"
    required = ["simmim.checkpointing.runs.ClaimCheckpointFolders", "simmim.data.watch.DataWaitTimer"]
    for i, how in enumerate([[], [f"--trainer.callbacks+={lr_monitor}"], [f"--trainer.callbacks=[{lr_monitor}]"]]):
        root = tmp_path / str(i)
        args = ["--data.root", digits, "--trainer.default_root_dir", str(root), "--trainer.limit_val_batches", "1"]
        cli = main(["validate", *args, *how, *FAST])
        kinds = [type(c) for c in cli.trainer.callbacks]
        assert {ModelCheckpoint, BadImageLimit, ExportWeights} <= set(kinds) and (LearningRateMonitor in kinds) == bool(
            how
        )
        assert kinds.count(ClaimCheckpointFolders) == kinds.count(DataWaitTimer) == 1
        assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)
        saved = next(root.rglob("config.yaml"))
        listed = [c["class_path"] for c in OmegaConf.load(saved).trainer.callbacks]
        assert listed == [*required, *([lr_monitor] if how else [])]
        again = main(["validate", "--config", str(saved), "--trainer.default_root_dir", str(tmp_path / "again")])
        assert [type(c) for c in again.trainer.callbacks] == kinds


def test_the_runs_checkpoints_and_grids_are_options_in_the_saved_config(tmp_path, digits):
    """`--checkpoint.*` (the run's ModelCheckpoint), `--checkpoint_every_n_steps` (the StepCheckpoint beside it, in
    the same folder), `--grid.*`, `--bad_images.*`, `--export.*` and the plugins default reach the trainer and the
    saved config.yaml."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from simmim.cli import StepCheckpoint
    from simmim.pretrain.callbacks import ReconstructionGrid

    folder = str(tmp_path / "ckpts")
    args = ["--data.root", digits, "--trainer.default_root_dir", str(tmp_path), "--trainer.limit_val_batches", "1"]
    args += ["--checkpoint.dirpath", folder, "--checkpoint.save_top_k", "-1", "--checkpoint_every_n_steps", "3"]
    args += ["--bad_images.max_fraction", "0.3", "--export.files", "{e.safetensors: timm}"]
    cli = main(["validate", *args, "--grid.every_n_epochs", "4", "--trainer.logger", "true", *FAST[2:]])
    assert cli.bad_images.max_fraction == 0.3 and cli.export.files == {"e.safetensors": "timm"}
    assert cli.bad_images in cli.trainer.callbacks and cli.export in cli.trainer.callbacks
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    step = next(c for c in checkpoints if isinstance(c, StepCheckpoint))
    assert [c.dirpath for c in checkpoints] == [folder, folder] and checkpoints[0].save_top_k == -1
    assert step._every_n_train_steps == 3 and step.save_last
    assert next(c for c in cli.trainer.callbacks if isinstance(c, ReconstructionGrid)).every_n_epochs == 4
    saved = OmegaConf.load(next(tmp_path.rglob("config.yaml")))
    assert saved.checkpoint.dirpath == folder and saved.checkpoint.save_top_k == -1 and saved.grid.every_n_epochs == 4
    assert saved.checkpoint_every_n_steps == 3 and saved.bad_images.max_fraction == 0.3
    assert dict(saved.export.files) == {"e.safetensors": "timm"}
    assert [p["class_path"] for p in saved.trainer.plugins] == ["simmim.checkpointing.exports.SafeCheckpointIO"]


def test_unsafe_checkpoint_reading_or_a_clashing_checkpoint_callback_is_refused_in_one_line(tmp_path, digits):
    args = ["validate", "--data.root", digits, "--trainer.default_root_dir", str(tmp_path), *FAST]
    with pytest.raises(SystemExit, match=r"^error: --trainer.plugins leaves checkpoint reading to .*give AsyncCheck"):
        main([*args, "--trainer.plugins", "pytorch_lightning.plugins.io.AsyncCheckpointIO"])
    wrapped = '{"class_path": "pytorch_lightning.plugins.io.AsyncCheckpointIO", "init_args": {"checkpoint_io": '
    wrapped += '{"class_path": "simmim.checkpointing.exports.SafeCheckpointIO"}}}'
    main([*args, "--trainer.plugins", f"[{wrapped}]", "--trainer.limit_val_batches", "1"])  # the advice works
    with pytest.raises(SystemExit, match=r"^error: --checkpoint.\* and --trainer.callbacks are ModelCheckpoints with"):
        main([*args, "--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint"])
    with pytest.raises(SystemExit, match=r"^error: --grid.every_n_epochs 0: must be at least 1"):
        main([*args, "--grid.every_n_epochs", "0"])
    with pytest.raises(SystemExit, match=r"^error: ModelCheckpoint\(save_top_k=2, monitor=None\) is not a valid"):
        main([*args, "--checkpoint.save_top_k", "2"])


def test_a_validation_split_left_empty_says_so(tmp_path, capsys):
    """A split of only unreadable files warns that validation saw nothing; no split at all is said at the start;
    the closing summary says why there is no grid instead of `None`."""
    from simmim.pretrain.data import PretrainDataModule

    names = [f"{i:02d}.png" for i in range(20)]
    dm = PretrainDataModule(str(image_folder(tmp_path / "probe", names, size=64)), img_size=64, val_fraction=0.1)
    dm.setup()
    val = {os.path.basename(f) for f in dm.val_files}
    folder = image_folder(tmp_path / "images", names, size=64, broken=sorted(val))
    args = ["--data.val_fraction", "0.1", "--trainer.limit_train_batches", "1", "--trainer.max_epochs", "1"]
    args += ["--data.batch_size", "4", "--bad_images.max_fraction", "0.2"]
    with pytest.warns(UserWarning, match="no validation image could be decoded"):
        _fit(tmp_path / "a", str(folder), *args)
    assert "reconstruction grid: none: no validation image could be decoded" in capsys.readouterr().out
    with warnings.catch_warnings(record=True) as caught:  # the filters in force, as a user has them
        _fit(tmp_path / "b", str(folder), *args, "--data.val_fraction", "0")
    assert not [w for w in caught if "across ranks is zero" in str(w.message)]
    out = capsys.readouterr().out
    assert "reconstruction grid: none: no validation images (--data.val_fraction)" in out
