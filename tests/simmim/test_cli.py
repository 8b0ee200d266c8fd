"""What both command lines share: the program name in --help, only meaningful subcommands."""

import importlib
import re
from pathlib import Path

import pytest

OFFERED = {"pretrain": "{fit,validate}", "finetune": "{fit,validate,predict}"}


@pytest.mark.parametrize("stage", sorted(OFFERED))
def test_help_names_the_program_and_its_subcommands(stage, capsys):
    main = importlib.import_module(f"simmim.{stage}").main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m simmim.{stage} [-c CONFIG] {OFFERED[stage]}")
    with pytest.raises(SystemExit) as done:
        main(["fit", "--help"])  # the fine-tuning default does not go looking for a pretraining export first
    assert done.value.code == 0 and f"python -m simmim.{stage}" in capsys.readouterr().out


@pytest.mark.parametrize("stage", sorted(OFFERED))
def test_a_subcommand_without_meaning_is_refused_in_one_line(stage):
    main = importlib.import_module(f"simmim.{stage}").main
    with pytest.raises(SystemExit, match=rf"^error: python -m simmim.{stage} has no `test` subcommand; it offers fit"):
        main(["test"])


BAD_VALUES = [
    (
        "pretrain",
        ["--data.img_size", "70"],
        "--data.img_size 70: must be a positive multiple of --data.mask_patch_size",
    ),
    ("pretrain", ["--data.mask_ratio", "1.5"], r"--data.mask_ratio 1.5: must be in \(0, 1\)"),
    ("pretrain", ["--data.mask_patch_size", "6"], "--data.mask_patch_size 6: must be a multiple of the encoder's"),
    ("pretrain", ["--data.batch_size", "-3"], "--data.batch_size -3: must be a positive number"),
    ("pretrain", ["--data.num_workers", "-1"], "--data.num_workers -1: must be 0"),
    ("pretrain", ["--data.val_fraction", "1.0"], r"--data.val_fraction 1.0: must be in \[0, 1\)"),
    ("pretrain", ["--bad_images.max_fraction", "2"], r"--bad_images.max_fraction 2.0: must be in \[0, 1\]"),
    ("pretrain", ["--export.files", "{../up.safetensors: official}"], r"'../up.safetensors': must be a file name"),
    ("pretrain", ["--export.files", "{a/b.safetensors: official}"], r"'a/b.safetensors': must be a file name"),
    ("pretrain", ["--export.files", "{e.pt: official}"], r"'e.pt': must be a file name ending in .safetensors"),
    ("finetune", ["--export.files", "{e.safetensors: hf}"], r"e.safetensors: 'hf': a layout is official or timm"),
    ("finetune", ["--data.img_size", "70"], "--data.img_size 70: must be a multiple of the patch size 4"),
    ("finetune", ["--data.batch_size", "0"], "--data.batch_size 0: must be a positive number"),
    ("finetune", ["--data.label_fraction", "0"], r"--data.label_fraction 0.0: must be in \(0, 1\]"),
    ("finetune", ["--data.erase_prob", "1.5"], r"--data.erase_prob 1.5: must be in \[0, 1\]"),
    ("finetune", ["--model.num_classes", "7"], "--model.num_classes 7 disagrees with the data: 10 class folders"),
    ("pretrain", ["--data.root", "/nonexistent"], "--data.root /nonexistent: image folder not found"),
    ("finetune", ["--data.root", "/nonexistent"], "--data.root: image folder not found: /nonexistent"),
    ("pretrain", ["--trainer.max_epochs", "-1"], "the cosine LR schedule needs the run's length"),
]


@pytest.mark.parametrize("stage, args, message", BAD_VALUES, ids=[" ".join(a) for _, a, _ in BAD_VALUES])
def test_a_bad_value_is_refused_in_one_line_before_training(stage, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the built-in digits are prepared here, if anything gets that far
    main = importlib.import_module(f"simmim.{stage}").main
    extra = ["--model.pretrained", "null"] if stage == "finetune" else []
    with pytest.raises(SystemExit) as done:
        main(["fit", "--trainer.default_root_dir", str(tmp_path), *extra, *args])
    text = str(done.value.code)
    assert text.startswith("error: ") and "\n" not in text
    assert re.search(message, text), text
    assert not list(tmp_path.glob("**/*.ckpt"))  # nothing trained


def test_a_checkpoint_trained_on_other_classes_names_the_checkpoint(tmp_path, monkeypatch):
    """`validate --ckpt_path` takes the class count from the checkpoint: a mismatch with --data.root is about the
    data, not about an option the user typed."""
    import torch

    monkeypatch.chdir(tmp_path)
    torch.save({"hyper_parameters": {"num_classes": 3}}, tmp_path / "run.ckpt")
    main = importlib.import_module("simmim.finetune").main
    with pytest.raises(
        SystemExit, match=r"^error: --ckpt_path .*run\.ckpt was trained with 3 classes, but the data has 10 class "
    ):
        main(["validate", "--ckpt_path", str(tmp_path / "run.ckpt"), "--trainer.default_root_dir", str(tmp_path)])


CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("*/simmim__*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_long_recipe_parses_and_checkpoints_every_500_steps(recipe, capsys, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    stage = recipe.split("/")[0]
    main = importlib.import_module(f"simmim.{stage}").main
    extra = ["--model.pretrained", "null", "--model.num_classes", "10"] if stage == "finetune" else []
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(CONFIGS / recipe), *extra, "--print_config"])
    assert done.value.code in (0, None)
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.checkpoint_every_n_steps == 500
    required = ["ClaimCheckpointFolders", "DataWaitTimer", *(["PredictionCSV"] if stage == "finetune" else [])]
    assert [c.class_path.rsplit(".", 1)[1] for c in printed.trainer.callbacks] == required  # the default list


@pytest.mark.parametrize("native", [False, True])
def test_bf16_mixed_trains_in_fp32_on_a_cpu_that_would_emulate_it(native, tmp_path, monkeypatch):
    import torch
    from conftest import image_folder

    import simmim.cli
    from simmim.pretrain import main

    monkeypatch.setattr(simmim.cli, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # "auto" then means the GPU
    for precision, accelerator in [("bf16-true", "cpu"), ("bf16-mixed", "cuda"), ("32", "cpu"), ("bf16", "auto")]:
        assert simmim.cli.precision_for_this_cpu(precision, accelerator) == precision  # explicit, or not on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = "bf16" if native else "32-true"
    assert simmim.cli.precision_for_this_cpu("bf16", "auto") == expected  # Lightning's short spelling
    folder = image_folder(tmp_path / "imgs", [f"{i}.png" for i in range(4)], size=32)
    cli = main(
        [
            "--data.root",
            str(folder),
            "--data.img_size",
            "32",
            "--data.mask_patch_size",
            "8",
            "--data.batch_size",
            "2",
            "--data.num_workers",
            "0",
            "--data.val_fraction",
            "0",
            "--trainer.max_steps",
            "1",
            "--trainer.accelerator",
            "cpu",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--model.encoder_kwargs",
            '{"embed_dim": 24, "depths": [2], "num_heads": [2]}',
            "--model.window_size",
            "4",
        ]
    )  # fmt: skip  (the default config asks for bf16-mixed)
    assert cli.trainer.precision == ("bf16-mixed" if native else "32-true")
    saved = next((tmp_path / "run").rglob("config.yaml")).read_text()
    assert "precision: bf16-mixed" in saved  # a resume on a GPU from the saved config gets what was asked
