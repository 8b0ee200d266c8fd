"""Sharded training through Lightning's strategies, on CPU with gloo and 2 processes: `zero1` and `fsdp2` train
with DDP's losses (with activation checkpointing, sequential attention and gradient clipping on), resume exactly
from their own checkpoints after a SIGKILL (`fsdp2`'s shards under `fsdp2_no_reshard`, with validation), write
exports that load in one process, and hold about half the optimizer state per rank; fine-tuning runs sharded too."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import image_folder
from pytorch_lightning.strategies import StrategyRegistry

import swinv2
from simmim.sharding import FSDP2Strategy, ZeroOneStrategy

TESTS = str(Path(__file__).resolve().parents[1])  # recording.py
ENCODER = {"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}
RUN = [
    "--data.img_size", "32", "--data.mask_patch_size", "8", "--data.batch_size", "4", "--data.val_fraction", "0.25",
    "--data.num_workers", "0", "--model.drop_path_rate", "0.2", "--trainer.limit_val_batches", "0",
    "--trainer.precision", "32", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", "4",
    "--trainer.gradient_clip_val", "0.05",  # every step clipped: the global norm must agree across shards
]  # fmt: skip


def _run(args, log, kill_at_step=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    record = ["--trainer.callbacks+=recording.BatchLog", "--trainer.callbacks.path", str(log)]
    if kill_at_step is not None:
        record += ["--trainer.callbacks.kill_at_step", str(kill_at_step)]
    cmd = [sys.executable, "-m", "simmim.pretrain", *args, *record]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _by_step(path):
    from recording import read_log

    rows = read_log(path)
    by_step = {(r["rank"], r["step"]): r for r in rows}
    assert len(by_step) == len(rows), "a step was trained twice"
    return by_step


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The reference: plain DDP, 4 steps."""
    tmp = tmp_path_factory.mktemp("ddp")
    root = str(image_folder(tmp / "imgs", [f"{i}.png" for i in range(32)], size=40))
    args = ["--data.root", root, *RUN, "--model.encoder_kwargs", str(ENCODER).replace("'", '"')]
    out = _run([*args, "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(tmp / "run")], tmp / "log")
    assert out.returncode == 0, out.stderr[-3000:]
    return root, _by_step(tmp / "log"), tmp / "run" / "logs" / "version_0" / "encoder.safetensors"


def test_the_strategy_names_are_registered():
    assert StrategyRegistry["zero1"]["strategy"] is ZeroOneStrategy
    assert StrategyRegistry["fsdp2"]["strategy"] is FSDP2Strategy
    assert StrategyRegistry["fsdp2_no_reshard"]["init_params"] == {"reshard_after_forward": False}
    assert StrategyRegistry["fsdp"]["strategy"] is FSDP2Strategy  # Lightning's FSDP1 replaced (docs/scaling.md)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero1", "fsdp2"])
def test_a_sharded_run_matches_ddp_and_resumes_from_its_own_checkpoint(tmp_path, ddp_run, strategy):
    root, reference, reference_export = ddp_run
    encoder = str({**ENCODER, "attn_chunk_size": 2}).replace("'", '"')
    args = ["--data.root", root, *RUN, "--trainer.strategy", strategy, "--trainer.default_root_dir", str(tmp_path)]
    args += ["--model.encoder_kwargs", encoder, "--model.use_checkpoint", "true", "--checkpoint_every_n_steps", "2"]
    if strategy == "fsdp2":  # validation at the end of epoch 0 (step 3) and the final grid: sharded forwards
        args += ["--trainer.limit_val_batches", "1"]
    killed = _run(args, tmp_path / "log", kill_at_step=2)
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_dir() if strategy == "fsdp2" else last.is_file()  # per-rank shards / one gathered file
    if strategy == "fsdp2":  # the same shards resume with the gathered weights kept from forward to backward
        args[args.index("fsdp2")] = "fsdp2_no_reshard"
    resumed = _run([*args, "--ckpt_path", "last"], tmp_path / "log")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    rows = _by_step(tmp_path / "log")
    assert sorted(rows) == sorted(reference)  # 4 steps on each rank, none trained twice (`_by_step`)
    for key, ref in reference.items():
        assert rows[key]["images"] == ref["images"] and rows[key]["masks"] == ref["masks"], key
        assert rows[key]["loss"] == pytest.approx(ref["loss"], rel=1e-4), key
        # each rank holds about half of DDP's AdamW moments (odd-sized shards: within 10%)
        assert rows[key]["optimizer_state_bytes"] < 0.55 * ref["optimizer_state_bytes"], key
    for step in (1, 4):
        both = rows[(0, step)]["optimizer_state_bytes"] + rows[(1, step)]["optimizer_state_bytes"]
        assert both == pytest.approx(reference[(0, step)]["optimizer_state_bytes"], rel=0.05)

    if strategy == "fsdp2":
        assert (tmp_path / "logs" / "version_0" / "reconstructions" / "final.png").is_file()
    export = tmp_path / "logs" / "version_0" / "encoder.safetensors"
    model = swinv2.create_model_from_checkpoint(export)  # one process, no strategy
    expected = swinv2.create_model_from_checkpoint(reference_export)
    for (name, a), b in zip(model.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_fine_tuning_validates_and_exports_under_fsdp2_keeping_weights_gathered(tmp_path, ddp_run):
    """Stage 2 under `fsdp2_no_reshard` on 2 CPU processes, with validation: after the last validation's forward the
    weights are still gathered, and the export must gather them all the same; it loads in one process."""
    from simmim.builtin_data import prepare_digits

    digits = str(prepare_digits(tmp_path / "digits", size=32))
    fine = ["--data.root", digits, "--data.img_size", "32", "--data.batch_size", "8", "--data.num_workers", "0"]
    fine += ["--model.arch", "swinv2_tiny", "--model.encoder_kwargs", str(ENCODER).replace("'", '"')]
    fine += ["--model.window_size", "4", "--model.pretrained", str(ddp_run[2]), "--trainer.max_steps", "2"]
    fine += ["--trainer.limit_val_batches", "1", "--trainer.precision", "32", "--trainer.accelerator", "cpu"]
    fine += ["--trainer.devices", "2", "--trainer.strategy", "fsdp2_no_reshard", "--trainer.enable_progress_bar"]
    fine += ["false", "--trainer.default_root_dir", str(tmp_path / "fine")]
    out = subprocess.run([sys.executable, "-m", "simmim.finetune", *fine], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    exported = tmp_path / "fine" / "logs" / "version_0" / "classifier.safetensors"
    assert swinv2.create_model_from_checkpoint(exported).num_classes == 10


def _one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    return dist


def test_the_nonfinite_step_skip_reads_sharded_gradients_and_agrees_across_ranks(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from simmim.optim import drop_nonfinite_grads

    dist = _one_process_group(tmp_path)
    try:
        model = fully_shard(
            torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), mesh=init_device_mesh("cpu", (1,))
        )
        model(torch.randn(3, 4)).sum().backward()
        assert type(model[0].weight.grad).__name__ == "DTensor"
        assert not drop_nonfinite_grads(model)
        model[1].weight.grad.to_local().fill_(float("inf"))
        assert drop_nonfinite_grads(model) and all(p.grad is None for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_a_crafted_shard_folder_is_refused_and_a_real_one_passes(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    from simmim.sharding import check_sharded_checkpoint
    from swinv2.reading import UnsafeCheckpointError

    real = tmp_path / "real.ckpt"
    dcp.save({"state_dict": {"w": torch.randn(3, 2)}}, checkpoint_id=str(real), no_dist=True)
    torch.save({"epoch": 1, "global_step": 4}, real / "meta.pt")
    check_sharded_checkpoint(real)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    crafted = tmp_path / "crafted.ckpt"
    crafted.mkdir()
    torch.save({"epoch": 1}, crafted / "meta.pt")
    (crafted / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        check_sharded_checkpoint(crafted)
    torch.save({"epoch": Payload()}, crafted / "meta.pt")
    with pytest.raises(UnsafeCheckpointError):
        check_sharded_checkpoint(crafted)
    assert not (tmp_path / "pwned").exists()


def test_the_collective_timeout_reaches_every_data_parallel_strategy():
    from datetime import timedelta

    from simmim.cli import strategy_with_timeout
    from simmim.errors import ConfigError

    zero = strategy_with_timeout("zero1", 5)
    assert isinstance(zero, ZeroOneStrategy) and zero._timeout == timedelta(seconds=5)
    fsdp = strategy_with_timeout("fsdp2_no_reshard", 5)
    assert isinstance(fsdp, FSDP2Strategy) and not fsdp.reshard_after_forward and fsdp._timeout == timedelta(seconds=5)
    with pytest.raises(ConfigError, match="not 'single_device'"):
        strategy_with_timeout("single_device", 5)
