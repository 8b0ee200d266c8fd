"""Shared test helpers: tiny SwinV2 configurations, weight randomisation, and what is made once per session and
shared read-only (the built-in digits at 64 and 32 px, a tiny pretraining run with its export)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise calls the network at import
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="simmim-test-cache-")  # file indexes: not the user's cache
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
# compiled kernels too: torch keeps them in the system's temporary folder across runs (gigabytes over many runs)
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.environ["XDG_CACHE_HOME"], "torchinductor")

import pytest  # noqa: E402
import torch  # noqa: E402

# A 2-stage model small enough to run forward+backward in milliseconds: 32 px, patch 4 -> 8x8 -> 4x4 tokens.
TINY = dict(
    img_size=32,
    patch_size=4,
    embed_dim=24,
    depths=(2, 2),
    num_heads=(2, 4),
    window_size=4,
    num_classes=5,
    drop_path_rate=0.0,
)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter non-trivial values (the official init zeroes the post-norms, hiding errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if name.endswith("logit_scale"):
                p.copy_(torch.log(torch.tensor(10.0)) + noise * 10)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise * 4)
            else:
                p.copy_(noise if p.ndim > 1 else noise * 4)
    return model


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> str:
    """The built-in digits at their default 64 px, written once per session (read-only: copy before changing)."""
    from simmim.data.builtin import prepare_digits

    return str(prepare_digits(tmp_path_factory.mktemp("digits64")))


@pytest.fixture(scope="session")
def digits32(tmp_path_factory) -> str:
    """The built-in digits at 32 px, written once per session (read-only: copy before changing)."""
    from simmim.data.builtin import prepare_digits

    return str(prepare_digits(tmp_path_factory.mktemp("digits32"), size=32))


RUN_MEAN, RUN_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # the shared run's normalisation (not ImageNet's)


@pytest.fixture(scope="session")
def pretraining_run(digits32, tmp_path_factory):
    """A tiny pretraining run through the command line, made once per session and shared (read-only: tests that
    resume, claim or attack a run folder make their own): TINY's encoder at 32 px, window 4, mask ratio 0.5 of 8 px
    patches, the run's own mean and std (`RUN_MEAN`, `RUN_STD`), 3 steps. Its fields: `cli` (the finished
    `StageCLI`), `folder` (the version folder: `config.yaml`, `encoder.safetensors`, `checkpoints/last.ckpt`),
    `checkpoint` and `export`."""
    from types import SimpleNamespace

    from simmim.pretrain import main

    root = tmp_path_factory.mktemp("pretraining_run")
    encoder = {
        k: list(TINY[k]) if isinstance(TINY[k], tuple) else TINY[k] for k in ("embed_dim", "depths", "num_heads")
    }
    cli = main(
        [
            "--data.root", digits32, "--data.img_size", "32", "--data.mask_patch_size", "8", "--data.mask_ratio", "0.5",
            "--data.batch_size", "16", "--data.num_workers", "0", "--model.encoder_kwargs", str(encoder),
            "--model.window_size", "4", "--model.mean", str(list(RUN_MEAN)), "--model.std", str(list(RUN_STD)),
            "--model.knn_every_n_epochs", "0", "--model.finetune_every_n_epochs", "0", "--trainer.max_steps", "3",
            "--trainer.limit_val_batches", "1", "--trainer.precision", "32", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root),
        ]
    )  # fmt: skip
    checkpoint = Path(cli.trainer.checkpoint_callback.last_model_path)
    return SimpleNamespace(cli=cli, folder=checkpoint.parent.parent, checkpoint=checkpoint, export=cli.export.path)


def counted_walks(monkeypatch, trust_recent: bool = True) -> list:
    """Records every walk of the file index (`simmim.data.index.walk`) in the list it returns. With `trust_recent`,
    a folder written just now is trusted (the 2-second rule has a test of its own), so counts do not depend on how
    recently a test wrote its folder."""
    import simmim.data.index as index_module

    if trust_recent:
        monkeypatch.setattr(index_module, "RACY_NS", 0)
    walks, real_walk = [], index_module.walk
    monkeypatch.setattr(index_module, "walk", lambda *args: walks.append(args) or real_walk(*args))
    return walks


def image_folder(folder, names, size: int, broken=()):
    """Random-noise PNGs named `names` in `folder`; those also in `broken` hold bytes that are not an image."""
    import cv2
    import numpy as np

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names:
        if name in broken:
            (folder / name).write_bytes(b"not an image")
        else:
            cv2.imwrite(str(folder / name), rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    return folder


def run_ddp_on_cpu(module: str, *args: str):
    """`python -m module *args` as two CPU processes over gloo (Lightning's DDP launcher); asserts it succeeded and
    returns the completed process (its stdout and stderr)."""
    import subprocess
    import sys

    ddp = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    out = subprocess.run([sys.executable, "-m", module, *args, *ddp], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def recorded_command(args, log, kill_at_step=None, module: str = "simmim.pretrain"):
    """(command, environment) for `python -m module *args` with `recording.BatchLog` appending one JSON line per
    training batch to `log` (and killing the run with SIGKILL at `kill_at_step`)."""
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent)  # recording.py
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    record = ["--trainer.callbacks+=recording.BatchLog", "--trainer.callbacks.path", str(log)]
    if kill_at_step is not None:
        record += ["--trainer.callbacks.kill_at_step", str(kill_at_step)]
    return [sys.executable, "-m", module, *args, *record], env


def run_recorded(args, log, kill_at_step=None, module: str = "simmim.pretrain"):
    """Run `recorded_command` to its end; returns the completed process."""
    import subprocess

    cmd, env = recorded_command(args, log, kill_at_step, module)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def values_and_grads(model: torch.nn.Module, x: torch.Tensor):
    """`forward_features(x)` and every encoder parameter's gradient of a position-weighted sum of it (so a swapped
    or misplaced element changes the gradients), for comparing two paths through the same weights."""
    model.zero_grad()
    out = model.forward_features(x)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("head.")}


def assert_same_values_and_grads(a, b, atol: float = 1e-5) -> None:
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, atol=atol, rtol=1e-4)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=1e-4, msg=name)
