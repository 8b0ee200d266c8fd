"""Sharded training through Lightning's strategies, on CPU with gloo and 2 processes: `zero1` and `fsdp2` train
with DDP's losses (with activation checkpointing, sequential attention and gradient clipping on), resume exactly
from their own checkpoints after a SIGKILL (`fsdp2`'s shards under `fsdp2_no_reshard`, with validation), write
exports that load in one process, and hold about half the optimizer state per rank; fine-tuning runs sharded too.

The runs are independent, and a two-process run keeps one core busy most of its time (one rank imports while the
other waits), so the module starts them side by side, in two rounds: the DDP reference and the two runs to be
killed, then the two resumes and the fine-tuning run."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import image_folder, recorded_command
from pytorch_lightning.strategies import StrategyRegistry

import swinv2
from simmim.distributed import FSDP2Strategy, ZeroOneStrategy

ENCODER = '{"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}'
RUN = [
    "--data.img_size", "32", "--data.mask_patch_size", "8", "--data.batch_size", "4", "--data.val_fraction", "0.25",
    "--data.num_workers", "0", "--model.drop_path_rate", "0.2", "--trainer.limit_val_batches", "1",
    # a learning rate that moves the weights (the recipe's scaled warmup starts near 1e-8)
    "--model.scale_lr", "false", "--model.base_lr", "1e-3", "--model.warmup_epochs", "0",
    "--trainer.precision", "32", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", "4",
    "--trainer.gradient_clip_val", "0.05",  # every step clipped: the global norm must agree across shards
    "--model.encoder_kwargs", ENCODER,
]  # fmt: skip
SHARDED = ["--model.use_checkpoint", "true", "--checkpoint_every_n_steps", "2"]
SHARDED += ["--model.encoder_kwargs", '{"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4], "attn_chunk_size": 2}']


def _by_step(path):
    from recording import read_log

    rows = read_log(path)
    by_step = {(r["rank"], r["step"]): r for r in rows}
    assert len(by_step) == len(rows), "a step was trained twice"
    return by_step


def _side_by_side(tmp: Path, runs: dict) -> dict:
    """Start every `name: (args, kill_at_step, module)` at once; wait for all. Returns name -> (code, output)."""
    procs = {}
    for name, (args, kill, module) in runs.items():
        log = tmp / f"{name.removesuffix('_resumed')}.jsonl"  # a resumed run appends to its killed run's record
        cmd, env = recorded_command(args, log, kill, module or "simmim.pretrain")
        out = open(tmp / f"{name}.out", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env), out)
    results = {}
    try:
        for name, (proc, _) in procs.items():
            results[name] = (proc.wait(timeout=900), (tmp / f"{name}.out").read_text())
    finally:
        for proc, out in procs.values():
            if proc.poll() is None:  # a timeout or an error above: leave nothing running
                proc.kill()
            out.close()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits32):
    tmp = tmp_path_factory.mktemp("sharding")
    src = image_folder(tmp / "src", ["one.png"], size=48)
    (tmp / "copies").mkdir()
    for i in range(32):  # one image: what differs between samples and ranks is the seeded crop and mask
        shutil.copy(src / "one.png", tmp / "copies" / f"{i:02d}.png")
    data = ["--data.root", str(tmp / "copies"), *RUN]
    sharded = {s: [*data, *SHARDED, "--trainer.strategy", s, "--trainer.default_root_dir", str(tmp / s)] for s in
               ("zero1", "fsdp2")}  # fmt: skip
    first = _side_by_side(
        tmp,
        {
            "ddp": ([*data, "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(tmp / "ddp")], None, None),
            "zero1": (sharded["zero1"], 2, None),
            "fsdp2": ([*sharded["fsdp2"], "--trainer.strategy", "fsdp2_no_reshard"], 2, None),
        },
    )
    resumed_fsdp2 = [*sharded["fsdp2"], "--ckpt_path", "last"]  # the shards of fsdp2_no_reshard, under fsdp2
    fine = ["--data.root", digits32, "--data.img_size", "32"]
    fine += ["--data.batch_size", "8", "--data.num_workers", "0", "--model.arch", "swinv2_tiny"]
    fine += ["--model.encoder_kwargs", ENCODER, "--model.window_size", "4", "--trainer.max_steps", "2"]
    fine += ["--model.pretrained", str(tmp / "ddp" / "logs" / "version_0" / "encoder.safetensors")]
    fine += ["--trainer.limit_val_batches", "1", "--trainer.precision", "32", "--trainer.accelerator", "cpu"]
    fine += ["--trainer.devices", "2", "--trainer.strategy", "fsdp2_no_reshard", "--trainer.enable_progress_bar"]
    fine += ["false", "--trainer.default_root_dir", str(tmp / "fine")]
    second = _side_by_side(
        tmp,
        {
            "zero1_resumed": ([*sharded["zero1"], "--ckpt_path", "last"], None, None),
            "fsdp2_resumed": (resumed_fsdp2, None, None),
            "fine": (fine, None, "simmim.finetune"),
        },
    )
    return tmp, first, second


def _succeeded(result):
    code, output = result
    assert code == 0, output[-3000:]
    return output


@pytest.mark.slow
def test_the_ddp_reference_trains_exports_and_its_ranks_draw_differently(runs):
    """Two gloo ranks over 32 copies of one image: the ranks' crops are disjoint and their masks differ."""
    tmp, first, _ = runs
    output = _succeeded(first["ddp"])
    assert "encoder export:" in output and (tmp / "ddp" / "logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    rows = _by_step(tmp / "ddp.jsonl")
    for step in range(1, 5):
        assert not set(rows[(0, step)]["images"]) & set(rows[(1, step)]["images"])
        assert rows[(0, step)]["masks"] != rows[(1, step)]["masks"]
    assert len({im for row in rows.values() for im in row["images"]}) == 32  # 4 steps x 2 ranks x 4 images


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero1", "fsdp2"])
def test_a_sharded_run_matches_ddp_and_resumes_from_its_own_checkpoint(runs, strategy):
    tmp, first, second = runs
    _succeeded(first["ddp"])
    code, output = first[strategy]
    assert code == -9, output[-3000:]  # SIGKILLed at step 2, after the step-2 checkpoint
    last = tmp / strategy / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_dir() if strategy == "fsdp2" else last.is_file()  # per-rank shards / one gathered file
    _succeeded(second[f"{strategy}_resumed"])  # fsdp2_no_reshard's shards resume under fsdp2

    reference, rows = _by_step(tmp / "ddp.jsonl"), _by_step(tmp / f"{strategy}.jsonl")
    assert sorted(rows) == sorted(reference)  # 4 steps on each rank, none trained twice (`_by_step`)
    for key, ref in reference.items():
        assert rows[key]["images"] == ref["images"] and rows[key]["masks"] == ref["masks"], key
        assert rows[key]["loss"] == pytest.approx(ref["loss"], rel=1e-4), key
        assert rows[key]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), key  # averaged like DDP's
        assert ref["grad_norm"] > 0.1 and rows[key]["clipped_grad_norm"] == pytest.approx(0.05, rel=1e-4), key
        # each rank holds about half of DDP's AdamW moments (odd-sized shards: within 10%)
        assert rows[key]["optimizer_state_bytes"] < 0.55 * ref["optimizer_state_bytes"], key
    for step in (1, 4):
        both = rows[(0, step)]["optimizer_state_bytes"] + rows[(1, step)]["optimizer_state_bytes"]
        assert both == pytest.approx(reference[(0, step)]["optimizer_state_bytes"], rel=0.05)

    version = tmp / strategy / "logs" / "version_0"
    assert (version / "reconstructions" / "final.png").is_file()  # a sharded forward on every rank
    model = swinv2.create_model_from_checkpoint(version / "encoder.safetensors")  # one process, no strategy
    expected = swinv2.create_model_from_checkpoint(tmp / "ddp" / "logs" / "version_0" / "encoder.safetensors")
    # AdamW at 1e-3 moves each weight by up to about 1e-3 a step: 100x the tolerance
    for (name, a), b in zip(model.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_fine_tuning_validates_and_exports_under_fsdp2_keeping_weights_gathered(runs):
    """Stage 2 under `fsdp2_no_reshard`, with validation: after the last validation's forward the weights are still
    gathered, and the export must gather them all the same; it loads in one process."""
    tmp, _, second = runs
    _succeeded(second["fine"])
    exported = tmp / "fine" / "logs" / "version_0" / "classifier.safetensors"
    assert swinv2.create_model_from_checkpoint(exported).num_classes == 10


def test_the_strategy_names_are_registered():
    assert StrategyRegistry["zero1"]["strategy"] is ZeroOneStrategy
    assert StrategyRegistry["fsdp2"]["strategy"] is FSDP2Strategy
    assert StrategyRegistry["fsdp2_no_reshard"]["init_params"] == {"reshard_after_forward": False}
    assert StrategyRegistry["fsdp"]["strategy"] is FSDP2Strategy  # Lightning's FSDP1 replaced (docs/scaling.md)


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
    import io
    import pickle

    import torch.distributed.checkpoint as dcp

    from simmim.checkpointing.untrusted import check_sharded_checkpoint
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

    def text(t: str) -> bytes:  # pickle's SHORT_BINUNICODE
        return b"\x8c" + bytes([len(t)]) + t.encode()

    # torch.distributed.checkpoint.filesystem.os.system: a global reached through an allowed module (protocol 4)
    dotted = text("torch.distributed.checkpoint.filesystem") + text("os.system") + b"\x93"
    (crafted / ".metadata").write_bytes(
        b"\x80\x04" + dotted + text("echo pwned > " + str(tmp_path / "pwned")) + b"\x85R."
    )
    torch.save({"epoch": 1}, crafted / "meta.pt")
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        check_sharded_checkpoint(crafted)

    # a non-tensor entry of a shard file (an optimizer hyper-parameter), which DCP itself unpickles freely
    bytes_entry = tmp_path / "bytes.ckpt"
    dcp.save(
        {"state_dict": {"w": torch.randn(2)}, "optimizer": {"lr": 0.1}}, checkpoint_id=str(bytes_entry), no_dist=True
    )
    torch.save({"epoch": 1}, bytes_entry / "meta.pt")
    check_sharded_checkpoint(bytes_entry)
    shard = next(bytes_entry.glob("*.distcp"))
    metadata = pickle.loads((bytes_entry / ".metadata").read_bytes())
    from torch.distributed.checkpoint.metadata import MetadataIndex

    info = metadata.storage_data[MetadataIndex("optimizer.lr")]
    evil = io.BytesIO()
    torch.save(Payload(), evil)
    data = shard.read_bytes()  # the payload appended, the entry pointed at it; the other entries stay valid
    shard.write_bytes(data + evil.getvalue())
    info.offset, info.length = len(data), len(evil.getvalue())
    (bytes_entry / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="optimizer.lr"):
        check_sharded_checkpoint(bytes_entry)
    assert not (tmp_path / "pwned").exists()


def test_the_collective_timeout_reaches_every_data_parallel_strategy():
    from datetime import timedelta

    from simmim.distributed import strategy_with_timeout
    from simmim.errors import ConfigError

    zero = strategy_with_timeout("zero1", 5)
    assert isinstance(zero, ZeroOneStrategy) and zero._timeout == timedelta(seconds=5)
    fsdp = strategy_with_timeout("fsdp2_no_reshard", 5)
    assert isinstance(fsdp, FSDP2Strategy) and not fsdp.reshard_after_forward and fsdp._timeout == timedelta(seconds=5)
    with pytest.raises(ConfigError, match="not 'single_device'"):
        strategy_with_timeout("single_device", 5)


def test_zero1_refuses_an_optimizer_it_cannot_shard(monkeypatch):
    from pytorch_lightning.strategies import DDPStrategy

    from simmim.errors import ConfigError

    def plain_adamw(self, trainer):
        self.optimizers = [torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())]

    monkeypatch.setattr(DDPStrategy, "setup_optimizers", plain_adamw)
    with pytest.raises(ConfigError, match="configure_optimizers returned AdamW"):
        ZeroOneStrategy().setup_optimizers(None)
