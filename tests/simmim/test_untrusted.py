"""Files and run folders from other people, crafted as an attacker would, through the documented entry points.

Each attack has a canary: a marker file the payload would create, a victim file or folder outside the run whose
content must survive, or a standard-library class whose attributes must stay as they were.
"""

import json
import os
import pathlib
import pickle
import re
import subprocess
import sys

import pytest
import torch
from conftest import TINY

from simmim.checkpointing.untrusted import check_sharded_checkpoint, checked_hyperparameters, conforms
from simmim.cli import CONFIG_DIR
from simmim.finetune import main as finetune
from simmim.pretrain import main as pretrain
from simmim.pretrain.module import SimMIMPretrainer
from swinv2.reading import MalformedRecordError, UnsafeCheckpointError

FAST = ["--trainer.enable_progress_bar", "false", "--data.num_workers", "0"]
MASK = ["--data.mask_patch_size", "8"]
SMALL = ["--model.encoder_kwargs", "{embed_dim: 24, depths: [2, 2], num_heads: [2, 4]}", "--model.window_size", "4"]
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


def _args(root, digits32, *extra):
    return ["--data.root", digits32, "--data.img_size", "32", "--trainer.default_root_dir", str(root), *SMALL, *FAST,
            *extra]  # fmt: skip


def _popen_payload(marker):
    return {"class_path": "subprocess.Popen", "init_args": {"args": f"touch {marker}", "shell": True}}


# ---------------------------------------------------------------------------------------------------------------
# 1. Code from a checkpoint's hyper-parameters (LightningCLI would build a class_path found in them)

PAYLOAD_PLACES = {
    "window_size": (lambda marker: {"window_size": _popen_payload(marker)}, "names a class"),
    "encoder_kwargs": (lambda marker: {"encoder_kwargs": {"embed_dim": _popen_payload(marker)}}, "names a class"),
    "instantiator": (lambda marker: {"_instantiator": "os.system", "window_size": 4}, "instantiator"),
    "class_path": (lambda marker: {"_class_path": "subprocess.Popen", "args": f"touch {marker}"}, "names a class"),
    # the omegaconf parser resolves ${...} in values it merges: a checkpoint could read the environment
    "interpolation": (lambda marker: {"arch": "${oc.env:HOME}"}, "interpolation"),
}


def _crafted_run(root, hparams):
    """A `last.ckpt` in `<root>/checkpoints` holding only strings and dicts, so weights_only reading accepts it."""
    (root / "checkpoints").mkdir(parents=True)
    path = root / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "loops": {}, "hyper_parameters": hparams}, path)
    return path


ENTRY_POINTS = {
    "pretrain --ckpt_path FILE": lambda args, path: pretrain(["fit", *args, *MASK, "--ckpt_path", str(path)]),
    "pretrain --ckpt_path last": lambda args, path: pretrain(["fit", *args, *MASK, "--ckpt_path", "last"]),
    "finetune validate --ckpt_path FILE": lambda args, path: finetune(
        ["validate", *args, "--model.num_classes", "10", "--ckpt_path", str(path)]
    ),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("place", sorted(PAYLOAD_PLACES))
def test_hyperparameters_naming_a_class_are_refused_and_build_nothing(tmp_path, monkeypatch, digits32, entry, place):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    build, expected = PAYLOAD_PLACES[place]
    path = _crafted_run(tmp_path / "run", build(marker))
    args = _args(tmp_path / "run", digits32, "--trainer.logger", "false")
    with pytest.raises(SystemExit) as err:
        ENTRY_POINTS[entry](args, path)
    message = str(err.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert expected in message and "refusing the file" in message
    assert not marker.exists()


def test_lightning_still_calls_the_hook_that_merges_checkpoint_hyperparameters():
    """`StageCLI._parse_ckpt_path` turns off a private LightningCLI hook that merges a checkpoint's values into the
    config unchecked (`StageCLI.parse_arguments` merges the checked ones); if the pinned Lightning renamed the hook,
    its unchecked merge would run again without any other test noticing."""
    import inspect

    from pytorch_lightning.cli import LightningCLI

    from simmim.cli import StageCLI

    source = inspect.getsource(LightningCLI.__init__)
    assert "self._parse_ckpt_path()" in source
    assert source.index("self.parse_arguments(") < source.index("self._parse_ckpt_path()")
    assert StageCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path


def test_honest_hyperparameters_pass_and_others_name_the_key():
    encoder = {k: v for k, v in TINY.items() if k in ("embed_dim", "depths", "num_heads")}
    honest = SimMIMPretrainer(arch="swinv2_tiny", img_size=32, window_size=4, encoder_kwargs=encoder).hparams
    hp = {**honest, "_instantiator": "pytorch_lightning.cli.instantiate_module"}
    assert checked_hyperparameters(hp, SimMIMPretrainer, "f") == dict(honest)
    with pytest.raises(MalformedRecordError, match="hyper-parameter 'bogus' is not an argument"):
        checked_hyperparameters({**honest, "bogus": 1}, SimMIMPretrainer, "f")
    with pytest.raises(MalformedRecordError, match="hyper-parameter base_lr='fast' is not a float"):
        checked_hyperparameters({**honest, "base_lr": "fast"}, SimMIMPretrainer, "f")
    with pytest.raises(MalformedRecordError, match=r"depths=1000000000 must be an integer from 1 to 128"):
        checked_hyperparameters({**honest, "encoder_kwargs": {**encoder, "depths": [10**9, 2]}}, SimMIMPretrainer, "f")
    with pytest.raises(MalformedRecordError, match=r"in_chans=10000000 must be an integer"):
        checked_hyperparameters({**honest, "in_chans": 10**7}, SimMIMPretrainer, "f")  # a stem of tens of GB
    with pytest.raises(UnsafeCheckpointError, match="hyper-parameter encoder_kwargs.depths names a class"):
        checked_hyperparameters(
            {**honest, "encoder_kwargs": {"depths": {"_target_": "os.system"}}}, SimMIMPretrainer, "f"
        )


def test_no_module_argument_accepts_any_type():
    """A parameter typed `Any` is where jsonargparse builds a class_path; every type must be spelled out."""
    from simmim.checkpointing.untrusted import signature_types
    from simmim.finetune.data import ClassificationDataModule
    from simmim.finetune.module import SwinV2Classifier
    from simmim.pretrain.data import PretrainDataModule

    for cls in (SimMIMPretrainer, SwinV2Classifier, PretrainDataModule, ClassificationDataModule):
        for name, hint in signature_types(cls).items():
            assert "Any" not in str(hint), f"{cls.__name__}.{name}: {hint}"
    assert conforms([8, [4, 4]], signature_types(SimMIMPretrainer)["window_size"])
    assert not conforms({"class_path": "x"}, signature_types(SimMIMPretrainer)["window_size"])


# ---------------------------------------------------------------------------------------------------------------
# 2 and 3. Shard folders: the rank-local metadata torch falls back to, and BUILD on an allowed class


def _text(t: str) -> bytes:  # pickle's SHORT_BINUNICODE
    return b"\x8c" + bytes([len(t)]) + t.encode()


# GLOBAL pathlib.PosixPath, then BUILD (None, {"is_file": "pwned"}): slot state set on the class object itself.
BUILD_ON_PATH = b"\x80\x04" + _text("pathlib") + _text("PosixPath") + b"\x93N}" + _text("is_file") + _text("pwned")
BUILD_ON_PATH += b"s\x86b."


def test_the_build_payload_changes_a_class_when_unpickled_plainly():
    """The canary is real: a plain unpickler (what torch uses for shard metadata) does change `PosixPath`."""
    code = f"import pathlib, pickle; pickle.loads({BUILD_ON_PATH!r}); print(pathlib.PosixPath.is_file)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "pwned", out.stderr


def _shard_folder(folder, marker):
    """A shard folder whose `.metadata` is missing and whose `__0.metadata` calls os.system; `meta.pt` is honest."""
    folder.mkdir(parents=True)
    torch.save({"epoch": 0, "global_step": 1, "loops": {}, "state_dict": {}}, folder / "meta.pt")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "__0.metadata").write_bytes(pickle.dumps(Payload()))
    return folder


@pytest.mark.parametrize("attack", ["rank metadata", "build on a class"])
def test_crafted_shard_folders_are_refused_before_torch_reads_them(tmp_path, attack):
    marker, is_file = tmp_path / "pwned", pathlib.PosixPath.is_file
    folder = _shard_folder(tmp_path / "last.ckpt", marker)
    if attack == "build on a class":
        (folder / ".metadata").write_bytes(BUILD_ON_PATH)
    expected = "sets the state of <class 'pathlib" if attack == "build on a class" else "no .metadata"
    with pytest.raises((UnsafeCheckpointError, MalformedRecordError), match=expected):
        check_sharded_checkpoint(folder)
    assert not marker.exists() and pathlib.PosixPath.is_file is is_file and pathlib.Path(__file__).is_file()


def test_a_crafted_shard_folder_is_refused_under_any_strategy(tmp_path, digits32):
    """`--ckpt_path FOLDER` without `--trainer.strategy fsdp2`: the folder is checked before any strategy reads it."""
    marker, is_file = tmp_path / "pwned", pathlib.PosixPath.is_file
    folder = _shard_folder(tmp_path / "shards.ckpt", marker)
    (folder / ".metadata").write_bytes(BUILD_ON_PATH)
    args = _args(tmp_path / "run", digits32, *MASK, "--trainer.logger", "false", "--ckpt_path", str(folder))
    with pytest.raises(SystemExit, match=r"^error: .*sets the state of <class 'pathlib"):
        pretrain(["fit", *args])
    assert not marker.exists() and pathlib.PosixPath.is_file is is_file


def test_a_crafted_last_shard_folder_in_a_configured_checkpoint_folder_is_refused(tmp_path, digits32):
    """`--ckpt_path last` with nothing under the root: Lightning looks in the configured `dirpath` itself."""
    marker, is_file = tmp_path / "pwned", pathlib.PosixPath.is_file
    folder = _shard_folder(tmp_path / "elsewhere" / "last.ckpt", marker)
    (folder / ".metadata").write_bytes(BUILD_ON_PATH)
    config = tmp_path / "callbacks.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: pytorch_lightning.callbacks.ModelCheckpoint\n      init_args:\n"
        f"        dirpath: {tmp_path / 'elsewhere'}\n        save_last: true\n"
    )
    args = _args(tmp_path / "run", digits32, *MASK, "--trainer.logger", "false", "--ckpt_path", "last")
    with pytest.raises(SystemExit, match=r"^error: .*sets the state of <class 'pathlib"):
        pretrain(["fit", "--config", str(CONFIG_DIR / "pretrain/default.yaml"), "--config", str(config), *args])
    assert not marker.exists() and pathlib.PosixPath.is_file is is_file


def test_a_crafted_shard_folder_resumed_under_fsdp2_ends_in_one_line(tmp_path, digits32):
    """Through the entry point: `--trainer.strategy fsdp2 --ckpt_path last` (one process, gloo)."""
    marker = tmp_path / "pwned"
    _shard_folder(tmp_path / "checkpoints" / "last.ckpt", marker)
    args = _args(
        tmp_path, digits32, *MASK, "--trainer.logger", "false", "--trainer.strategy", "fsdp2", "--ckpt_path", "last"
    )
    cmd = [sys.executable, "-m", "simmim.pretrain", "fit", *args, "--trainer.accelerator", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and ("metadata" in last), out.stderr[-3000:]
    assert "Traceback" not in out.stderr and not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# 4 and 5. Run folders: restored callback paths, symbolic links


@pytest.fixture
def honest_run(tmp_path, digits32, monkeypatch):
    """A short run with its logger (`<root>/logs/version_0`), to be tampered with and resumed."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    pretrain(["fit", *_args(root, digits32, *MASK, *SHORT, "--model.knn_every_n_epochs", "0")])
    return root


def _resume(root, digits32, *extra):
    return pretrain(
        [
            "fit",
            *_args(root, digits32, *MASK, *SHORT, "--model.knn_every_n_epochs", "0"),
            "--trainer.max_epochs",
            "2",
            "--ckpt_path",
            "last",
            *extra,
        ]  # fmt: skip
    )


def test_restored_checkpoint_paths_outside_the_run_are_never_deleted(honest_run, tmp_path, digits32):
    victims = [tmp_path / "victim_a", tmp_path / "victim_b"]
    for v in victims:
        v.mkdir()
        (v / "precious.txt").write_text("keep me")
    victim_file = tmp_path / "victim.ckpt"  # a file named as a checkpoint: removal alone would not refuse it
    victim_file.write_text("keep me")
    last = honest_run / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    key = next(k for k in ckpt["callbacks"] if k.startswith("ModelCheckpoint"))
    state = ckpt["callbacks"][key]
    state.pop("dirpath", None)
    state.update(best_model_path=f"local://{victims[0]}", last_model_path=f"local://{victims[1]}")
    state["best_k_models"] = {f"local://{victims[0]}": 0.0, str(victim_file): 1.0}
    state["kth_best_model_path"] = str(victim_file)
    torch.save(ckpt, last)
    with pytest.warns(UserWarning, match="names files outside"):
        cli = _resume(honest_run, digits32)
    assert cli.trainer.current_epoch == 2
    assert all((v / "precious.txt").read_text() == "keep me" for v in victims)
    assert victim_file.read_text() == "keep me"
    assert cli.trainer.checkpoint_callback.last_model_path == str(last)


def _snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.parametrize("target", ["config.yaml", "a later checkpoint"])
def test_a_symlink_in_a_run_folder_never_redirects_a_write(honest_run, tmp_path, digits32, target):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    version = honest_run / "logs" / "version_0"
    if target == "config.yaml":
        (version / "config.yaml").unlink()
        (version / "config.yaml").symlink_to(victim)
    else:  # a link among the checkpoints, named as a later checkpoint would be
        (version / "checkpoints" / "periodic-step=4.ckpt").symlink_to(victim)
    with pytest.raises(SystemExit, match=r"^error: .* is a symbolic link to .*outside the run's folder") as err:
        _resume(honest_run, digits32, "--checkpoint_every_n_steps", "2")
    assert "\n" not in str(err.value.code)
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("link", ["the version folder", "the logs folder"])
def test_a_run_folder_that_links_elsewhere_is_never_written(honest_run, tmp_path, digits32, link):
    """The check runs before the trainer exists: TensorBoard creates its folder and first file as it starts."""
    folder = honest_run / "logs" / "version_0" if link == "the version folder" else honest_run / "logs"
    elsewhere = tmp_path / "elsewhere"
    folder.rename(elsewhere)
    folder.symlink_to(elsewhere, target_is_directory=True)
    before = _snapshot(elsewhere)
    with pytest.raises(SystemExit, match=r"^error: .* is a symbolic link to .*outside the run's folder"):
        _resume(honest_run, digits32)
    assert _snapshot(elsewhere) == before


@pytest.mark.parametrize(
    "name, command",
    [
        ("config.yaml", ["validate"]),  # validate writes its config too
        ("mine.safetensors", ["fit", "--export.files", "{mine.safetensors: official}", "--trainer.max_steps", "1"]),
    ],
)
def test_a_file_the_run_writes_in_its_root_is_never_written_through_a_link(tmp_path, digits32, name, command):
    """Without a logger the run writes into its root: its config.yaml, and the files `--export.files` names."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).symlink_to(victim)
    args = _args(tmp_path / "run", digits32, *MASK, "--trainer.logger", "false", "--trainer.limit_val_batches", "1")
    with pytest.raises(SystemExit, match=rf"{re.escape(name)} is a symbolic link"):
        pretrain([command[0], *args, *command[1:]])
    assert victim.read_text() == "keep me"


def test_lightnings_default_logger_folder_is_checked_too(tmp_path, digits32):
    """No logger configured (`null`): Lightning's default writes `<root>/lightning_logs` as the trainer starts."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lightning_logs").symlink_to(elsewhere, target_is_directory=True)
    args = _args(tmp_path / "run", digits32, *MASK, "--trainer.logger", "null", "--trainer.limit_val_batches", "1")
    with pytest.raises(SystemExit, match=r"lightning_logs is a symbolic link"):
        pretrain(["validate", *args])
    assert not any(elsewhere.iterdir())


def test_restored_paths_are_kept_only_inside_the_callbacks_folder(tmp_path):
    from simmim.checkpointing.untrusted import drop_foreign_paths

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "out").symlink_to(tmp_path)
    inside = str(folder / "epoch=1.ckpt")
    state = {
        "best_model_path": f"local://{tmp_path / 'victim'}",
        "last_model_path": str(folder / ".." / ".." / "victim"),
        "kth_best_model_path": str(folder / "out" / "victim.ckpt"),
        "best_k_models": {inside: 0.5, f"file://{tmp_path}": 0.1},
        "dirpath": "/elsewhere",
    }
    kept, dropped = drop_foreign_paths(state, str(folder))
    assert kept["best_model_path"] == kept["last_model_path"] == kept["kth_best_model_path"] == ""
    assert kept["best_k_models"] == {inside: 0.5} and len(dropped) == 4
    assert kept["dirpath"] == "/elsewhere"  # Lightning's own rule for a moved folder still applies
    assert drop_foreign_paths({"last_model_path": f"local://{inside}"}, str(folder))[1] == []


def test_an_honest_run_folder_still_resumes(honest_run, digits32):
    cli = _resume(honest_run, digits32)
    assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 4


@pytest.mark.timeout(60)
def test_a_claim_file_that_is_a_fifo_or_garbage_neither_hangs_nor_fails(tmp_path):
    import socket

    from simmim.checkpointing.runs import LOCK_NAME, claim_folder

    os.mkfifo(tmp_path / LOCK_NAME)  # opening it to read would block until a writer came
    assert claim_folder(tmp_path, resuming_here=False) is None
    assert (tmp_path / LOCK_NAME).is_file()
    honest_host = json.dumps({"pid": True, "host": socket.gethostname()})
    for garbage in (honest_host, '{"pid": "1; rm -rf /"}', "[1]"):
        (tmp_path / LOCK_NAME).write_text(garbage)
        assert claim_folder(tmp_path, resuming_here=False) is None, garbage


def test_an_export_replaces_a_link_in_its_folder_and_never_follows_it(tmp_path):
    """The export writes where the run's folder is (`trainer.log_dir`); a logger without a local root (MLflow, W&B)
    leaves that folder unchecked at start-up, so the write itself must never follow a link: safetensors' writer
    replaces it, and this fails if a version of it does not."""
    from types import SimpleNamespace

    import swinv2
    from simmim.checkpointing.exports import ExportWeights

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "e.safetensors").symlink_to(victim)
    trainer = SimpleNamespace(log_dir=str(tmp_path / "run"), is_global_zero=True)
    module = SimpleNamespace(swin=swinv2.SwinTransformerV2(**TINY))
    ExportWeights({"e.safetensors": "official"}).on_fit_end(trainer, module)
    assert victim.read_text() == "keep me" and not (tmp_path / "run" / "e.safetensors").is_symlink()
    assert swinv2.create_model_from_checkpoint(tmp_path / "run" / "e.safetensors").num_classes == TINY["num_classes"]
