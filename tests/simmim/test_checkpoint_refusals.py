"""Crafted checkpoints named on the command line (`--model.pretrained`, `--ckpt_path`) end the command with one line,
run nothing and change nothing in the process."""

import collections
import subprocess
import sys

import pytest
import torch
from conftest import TINY
from crafted_checkpoints import CRAFTED

import swinv2
from simmim.finetune import main as finetune
from simmim.pretrain import main as pretrain

FAST = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--data.num_workers", "0"]
SMALL = ["--model.encoder_kwargs", "{embed_dim: 24, depths: [2, 2], num_heads: [2, 4]}", "--model.window_size", "4"]


def _args(tmp_path, digits32, *extra):
    return [
        "--data.root",
        digits32,
        "--data.img_size",
        "32",
        "--trainer.default_root_dir",
        str(tmp_path),
        *SMALL,
        *FAST,
        *extra,
    ]


def _crafted(tmp_path, kind):
    marker = tmp_path / "marker"
    state = swinv2.create_model("swinv2_tiny", **{**TINY, "num_classes": 0}).state_dict()
    return CRAFTED[kind](tmp_path / f"{kind}.ckpt", marker, state), marker


CLASSES = ["--model.num_classes", "10"]
COMMANDS = {
    "finetune --model.pretrained": lambda args, path: finetune(["fit", *args, *CLASSES, "--model.pretrained", path]),
    "finetune validate --ckpt_path": lambda args, path: finetune(["validate", *args, *CLASSES, "--ckpt_path", path]),
    "pretrain --ckpt_path": lambda args, path: pretrain(
        ["fit", *args, "--data.mask_patch_size", "8", "--ckpt_path", path]
    ),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_checkpoint_on_the_command_line_is_refused(tmp_path, digits32, kind, command):
    path, marker = _crafted(tmp_path, kind)
    update = collections.Counter.update
    with pytest.raises(SystemExit, match=rf"^error: refused to load .*{kind}\.ckpt: ") as err:
        COMMANDS[command](_args(tmp_path, digits32), str(path))
    assert "\n" not in str(err.value.code)
    assert not marker.exists()
    assert collections.Counter.update is update and collections.Counter("aab") == {"a": 2, "b": 1}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_last_checkpoint_is_refused_on_resume(tmp_path, digits32, kind):
    """`--ckpt_path last` is resolved by the trainer, not the CLI: the trainer reads it with our reader too."""
    path, marker = _crafted(tmp_path, kind)
    (tmp_path / "checkpoints").mkdir()
    path.rename(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit, match=r"^error: refused to load .*last\.ckpt: "):
        pretrain(["fit", *_args(tmp_path, digits32, "--data.mask_patch_size", "8", "--ckpt_path", "last")])
    assert not marker.exists() and collections.Counter("aab") == {"a": 2, "b": 1}


def test_refusal_is_one_line_on_stderr_without_a_traceback(tmp_path, digits32):
    path, marker = _crafted(tmp_path, "inside_config")
    args = [
        "-m",
        "simmim.pretrain",
        *_args(tmp_path, digits32, "--data.mask_patch_size", "8", "--ckpt_path", str(path)),
    ]
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: refused to load") and "'posix.system'" in last
    assert "Traceback" not in out.stderr and not marker.exists()


def test_unreadable_or_foreign_files_end_in_one_line(tmp_path, digits32):
    """A corrupt safetensors file as --model.pretrained, and an official checkpoint (readable, with its yacs config)
    given to --ckpt_path, which resumes runs of this project only."""
    bad = tmp_path / "encoder.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(SystemExit, match=r"^error: cannot read .*encoder\.safetensors as safetensors"):
        finetune(["fit", *_args(tmp_path, digits32), *CLASSES, "--model.pretrained", str(bad)])

    official, _ = _crafted(tmp_path, "inside_config")  # a real yacs config, here without the payload
    from yacs.config import CfgNode

    torch.save({"model": {}, "config": CfgNode({"DATA": CfgNode({"IMG_SIZE": 32})})}, official)
    with pytest.raises(
        SystemExit, match=r"^error: .*inside_config\.ckpt is not a Lightning checkpoint.*--model\.pretrained"
    ):
        pretrain(["fit", *_args(tmp_path, digits32, "--data.mask_patch_size", "8", "--ckpt_path", str(official))])


def test_the_bad_image_limit_option_reaches_the_callback(tmp_path, digits32):
    args = _args(tmp_path, digits32, "--trainer.limit_val_batches", "1", "--bad_images.max_fraction", "0.2")
    cli = finetune(["validate", *args, *CLASSES])
    from simmim.data.watch import BadImageLimit

    (limit,) = [c for c in cli.trainer.callbacks if isinstance(c, BadImageLimit)]
    assert limit.max_fraction == 0.2
