"""The fine-tuning CLI end to end on tiny budgets: window transfer, validate, predict, exports, bad input."""

import csv
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import image_folder, run_ddp_on_cpu
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

import swinv2
from simmim.finetune import main
from simmim.finetune.data import ClassificationDataModule

FAST = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--data.num_workers", "0"]
ENC = dict(embed_dim=24, depths=(2, 2), num_heads=(2, 4))
SMALL = ["--model.arch", "swinv2_tiny", "--model.encoder_kwargs", "{embed_dim: 24, depths: [2, 2], num_heads: [2, 4]}"]


@pytest.fixture(scope="module")
def pretrained_w4(pretraining_run):
    """The session's pretraining export: 32 px, window 4, ENC's encoder, with the architecture record it writes."""
    return str(pretraining_run.export)


def _args(tmp_path, digits32, *extra):
    return [
        "--data.root",
        digits32,
        "--data.img_size",
        "32",
        "--data.batch_size",
        "32",
        "--model.num_classes",
        "10",
        "--trainer.default_root_dir",
        str(tmp_path),
        *SMALL,
        *FAST,
        *extra,
    ]


@pytest.mark.slow
def test_fit_at_double_window_then_validate_and_predict(tmp_path, digits32, pretrained_w4):
    w8 = ["--model.window_size", "8", "--model.pretrained", pretrained_w4, "--trainer.limit_train_batches", "4"]
    w8 += ["--trainer.val_check_interval", "4"]  # the default recipe validates every 100 steps
    norm = ["--model.mean", "[0.5, 0.4, 0.3]", "--model.std", "[0.2, 0.25, 0.3]"]  # the loaders take them too
    cli = main(["fit", *_args(tmp_path, digits32, *w8, *norm, "--trainer.max_epochs", "1")])
    assert cli.datamodule.mean == (0.5, 0.4, 0.3) and cli.datamodule.std == (0.2, 0.25, 0.3)
    report = cli.model.load_report
    assert report.missing_keys == ["head.bias", "head.weight"] and report.unexpected_keys == []
    assert cli.model.hparams.pretrained_window_sizes == ((4, 4), (4, 4))
    assert cli.model.model.layers[0].blocks[0].attn.relative_coords_table.shape == (1, 15, 15, 2)
    acc_fit = cli.trainer.callback_metrics["val/acc1"].item()
    last = cli.trainer.checkpoint_callback.last_model_path
    val = main(["validate", *_args(tmp_path, digits32, "--model.window_size", "8", "--ckpt_path", last)])
    assert val.datamodule.mean == (0.5, 0.4, 0.3)  # from the checkpoint, so the accuracy is the same
    assert val.trainer.callback_metrics["val/acc1"].item() == pytest.approx(acc_fit, abs=1e-4)

    official_path, timm_path = cli.export.paths
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the export alone rebuilds the window-transferred model: same logits
        rebuilt = swinv2.create_model_from_checkpoint(official_path).eval()
        torch.testing.assert_close(rebuilt(x), cli.model.model.eval()(x), atol=0, rtol=0)
    assert rebuilt.architecture()["pretrained_window_sizes"] == [[4, 4], [4, 4]]
    theirs = TimmSwinV2(img_size=32, window_size=8, num_classes=10, pretrained_window_sizes=(4, 4), **ENC).eval()
    theirs.load_state_dict(load_file(timm_path), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), cli.model.model.eval()(x), atol=1e-4, rtol=1e-4)
    for path in (official_path, timm_path, last):  # the class names travel with the weights
        assert swinv2.read_labels(swinv2.read_checkpoint(path)) == cli.datamodule.classes
    import transformers

    from simmim.eval.export import main as export

    export([last, "--to", "transformers", str(tmp_path / "hf")])  # fine-tuned at window 8, pretrained at 4
    hf = transformers.Swinv2ForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert [hf.config.id2label[i] for i in range(10)] == cli.datamodule.classes
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, cli.model.model.eval()(x), atol=1e-5, rtol=0)

    ckpt_dir = os.path.dirname(last)
    assert any(f.startswith("best-") for f in os.listdir(ckpt_dir))
    resumed = main(["fit", *_args(tmp_path, digits32, *w8, "--trainer.max_epochs", "2", "--ckpt_path", "last")])
    assert resumed.trainer.global_step == 2 * cli.trainer.global_step

    pred = main(["predict", *_args(tmp_path, digits32, "--model.window_size", "8", "--ckpt_path", last)])
    from simmim.finetune.callbacks import PredictionCSV

    with open(pred.callback(PredictionCSV).path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(pred.datamodule.val_files) and rows[0]["pred"] in [str(d) for d in range(10)]


def test_a_callback_list_of_your_own_keeps_the_runs_callbacks_once(tmp_path, digits32, pretrained_w4):
    """A `--trainer.callbacks` list that leaves out the callbacks every fine-tuning run has gets them back (a
    subclass of one stands in for it); the saved config.yaml lists what ran, and a run from it has each once."""
    from pytorch_lightning.callbacks import LearningRateMonitor

    from simmim.checkpointing.runs import ClaimCheckpointFolders
    from simmim.data.watch import DataWaitTimer
    from simmim.finetune.callbacks import PredictionCSV

    own = "[pytorch_lightning.callbacks.LearningRateMonitor, recording.QuietDataWaitTimer]"
    args = _args(tmp_path / "a", digits32, "--model.pretrained", pretrained_w4, "--trainer.limit_val_batches", "1")
    cli = main(["validate", *args, f"--trainer.callbacks={own}"])
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert [kinds.count(k) for k in (ClaimCheckpointFolders, PredictionCSV, LearningRateMonitor)] == [1, 1, 1]
    assert sum(issubclass(k, DataWaitTimer) for k in kinds) == 1
    saved = next((tmp_path / "a").rglob("config.yaml"))
    listed = [c["class_path"].rsplit(".", 1)[1] for c in OmegaConf.load(saved).trainer.callbacks]
    assert listed == ["ClaimCheckpointFolders", "PredictionCSV", "LearningRateMonitor", "QuietDataWaitTimer"]
    again = main(["validate", "--config", str(saved), "--trainer.default_root_dir", str(tmp_path / "b")])
    assert [type(c) for c in again.trainer.callbacks] == kinds


def test_checkpoint_of_another_architecture_is_refused(tmp_path, digits32):
    other = swinv2.create_model(
        "swinv2_tiny", img_size=32, window_size=4, num_classes=0, embed_dim=32, depths=(2, 2), num_heads=(2, 4)
    )
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), path)
    with pytest.raises(SystemExit, match=r"^error: .*patch_embed.proj.weight.*\(32, 3, 4, 4\).*\(24, 3, 4, 4\)"):
        main(["fit", *_args(tmp_path, digits32, "--model.window_size", "4", "--model.pretrained", str(path))])


def test_num_classes_must_match_the_data(tmp_path, digits32):
    """Checked before any model is built, in one line."""
    args = _args(
        tmp_path, digits32, "--model.window_size", "4", "--model.pretrained", "null", "--model.num_classes", "7"
    )
    with pytest.raises(SystemExit, match=r"^error: --model.num_classes 7 disagrees with the data: 10 class folders"):
        main(["fit", *args, "--trainer.max_epochs", "1"])


def test_num_classes_is_read_from_the_data(tmp_path):
    """Any class-folder tree fine-tunes without --model.num_classes (flat, or train/ and val/)."""
    for split in ("train", "val"):
        for c in ("cat", "dog", "emu"):
            image_folder(tmp_path / "tree" / split / c, [f"{i}.png" for i in range(4)], size=32)
    args = [a for a in _args(tmp_path, str(tmp_path / "tree")) if a not in ("--model.num_classes", "10")]
    args += ["--model.window_size", "4", "--model.pretrained", "null", "--trainer.max_steps", "1"]
    cli = main(["fit", *args, "--trainer.limit_val_batches", "1", "--data.batch_size", "4"])
    assert cli.model.hparams.num_classes == 3 and cli.model.model.head.out_features == 3
    assert cli.datamodule.classes == ["cat", "dog", "emu"]


def test_the_best_checkpoint_follows_the_runs_checkpoint_folder(tmp_path, digits32):
    """`--best_checkpoint.*` (the best val/acc1) writes beside `--checkpoint.*` unless given its own folder."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    folder = str(tmp_path / "ckpts")
    args = [*_args(tmp_path, digits32), "--model.window_size", "4", "--model.pretrained", "null"]
    cli = main(["validate", *args, "--checkpoint.dirpath", folder, "--trainer.limit_val_batches", "1"])
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    best = next(c for c in checkpoints if c.monitor == "val/acc1")
    assert {c.dirpath for c in checkpoints} == {folder} and best.mode == "max" and len(checkpoints) == 3
    same = ["--checkpoint.monitor", "val/acc1", "--checkpoint.mode", "max"]  # the best checkpoint's triggers
    with pytest.raises(SystemExit, match=r"^error: --checkpoint.\* and --best_checkpoint.\* are ModelCheckpoints"):
        main(["validate", *args, *same])


def test_class_folders_must_agree_between_train_and_val(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    for split, classes in (("train", ["cat", "dog"]), ("val", ["cat", "emu"])):
        for c in classes:
            os.makedirs(tmp_path / split / c)
            cv2.imwrite(str(tmp_path / split / c / "a.png"), img)
    with pytest.raises(ValueError, match=r"only in train \['dog'\], only in val \['emu'\]"):
        ClassificationDataModule(root=str(tmp_path))


def test_label_fraction_keeps_every_class(digits32):
    full = ClassificationDataModule(root=digits32, img_size=32, val_fraction=0.2)
    tenth = ClassificationDataModule(root=digits32, img_size=32, val_fraction=0.2, label_fraction=0.1)
    full.setup("fit"), tenth.setup("fit")
    assert list(tenth.val_files) == list(full.val_files)
    assert abs(len(tenth.train_files) - 0.1 * len(full.train_files)) <= 10
    assert set(tenth.train_labels) == set(range(10))


def test_missing_pretraining_export_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="run pretraining first"):
        main([])


def test_train_and_eval_transforms(digits32):
    dm = ClassificationDataModule(root=digits32, img_size=32, batch_size=4, num_workers=0)
    dm.setup("fit")
    x, y, idx, skipped = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long and skipped == ()
    x, *_ = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 32, 32)


@pytest.mark.slow
def test_no_arguments_finetunes_the_default_export_at_a_larger_window(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    enc = swinv2.create_model(
        "swinv2_tiny",
        img_size=64,
        window_size=4,
        num_classes=0,
        mask_token=True,
        embed_dim=48,
        depths=(2, 2, 2, 2),
        num_heads=(2, 4, 8, 16),
    )
    export = tmp_path / "runs/pretrain_default/logs/version_0/encoder.safetensors"
    export.parent.mkdir(parents=True)
    swinv2.save_weights(export, enc)
    cli = main(
        ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", *FAST]
    )
    assert cli.model.hparams.pretrained == str(export.relative_to(tmp_path))
    assert cli.model.model.window_sizes[0] == (8, 8)  # default config: window 8, pretrained at 4
    assert cli.model.hparams.pretrained_window_sizes == ((4, 4), (4, 4), (4, 4), (2, 2))
    assert cli.model.load_report.unexpected_keys == [] and cli.model.load_report.missing_keys == [
        "head.bias",
        "head.weight",
    ]


@pytest.mark.slow
def test_ddp_predict_writes_every_file_once_in_order(tmp_path, digits32):
    """Two CPU processes over gloo, an odd number of files and one corrupt file alone in its batch: every file keeps
    exactly one row."""
    names = [f"{i}.png" for i in range(5)] + ["2_broken.png"]
    folder = image_folder(tmp_path / "to_classify", names, size=32, broken=["2_broken.png"])
    predict = ["--model.pretrained", "null", "--model.window_size", "4", "--data.predict_root", str(folder)]
    args = _args(tmp_path, digits32, *predict)
    args[args.index("--data.batch_size") + 1] = "1"  # the corrupt file is a batch of its own
    run_ddp_on_cpu("simmim.finetune", "predict", *args)
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [os.path.basename(r["path"]) for r in rows] == ["0.png", "1.png", "2.png", "2_broken.png", "3.png", "4.png"]
    assert rows[3]["pred"] == "" and all(r["pred"] in [str(d) for d in range(10)] for r in rows if r is not rows[3])


def test_every_finetune_config_parses(tmp_path, capsys):
    """Every recipe parses, and its config lists the callbacks every fine-tuning run has."""
    required = ["ClaimCheckpointFolders", "DataWaitTimer", "PredictionCSV"]
    for config in sorted((Path(__file__).parents[3] / "configs" / "finetune").glob("*.yaml")):
        with pytest.raises(SystemExit) as done:
            main(["fit", "--config", str(config), "--model.pretrained", "null", "--print_config"])
        assert done.value.code == 0, config
        callbacks = OmegaConf.create(capsys.readouterr().out).trainer.callbacks
        assert [c.class_path.rsplit(".", 1)[1] for c in callbacks] == required, config
