"""Malformed files from other people end in one line, within a memory bound, and never hang.

Every case is written by the test, then read through its entry point in a subprocess whose address space is
limited (`RLIMIT_AS`: what the imports took plus 3 GiB) and whose every case has a 30 s alarm: a record that asks
for a billion blocks, an archive that inflates to a GiB, or a FIFO would otherwise exhaust memory or block. A case
passes when it ends with the one-line message the command lines print (`user_errors_as_messages`).
"""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import TINY, image_folder
from safetensors.torch import save_file

import swinv2
from swinv2.checkpoint import ARCH_KEY

DRIVER = r"""
import json, resource, signal, sys, traceback
from simmim.errors import user_errors_as_messages
{imports}
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))

def alarm(*_):
    raise TimeoutError("hung")

signal.signal(signal.SIGALRM, alarm)
for name, call in {calls}:
    signal.alarm(30)
    try:
        with user_errors_as_messages():
            call()
        result = {{"outcome": "no error"}}
    except SystemExit as e:
        result = {{"outcome": "message", "text": str(e.code)}}
    except TimeoutError:
        result = {{"outcome": "hang"}}
    except BaseException as e:
        result = {{"outcome": "traceback", "text": traceback.format_exc()[-1500:]}}
    signal.alarm(0)
    print("CASE", json.dumps({{"case": name, **result}}), flush=True)
"""


def _start(tmp_path, imports: str, calls: str) -> subprocess.Popen:
    """A driver over `calls` in a fresh interpreter; the three drivers of this file run side by side."""
    code = DRIVER.format(imports=imports, calls=calls)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)  # fmt: skip


def _results(driver: subprocess.Popen) -> dict:
    stdout, stderr = driver.communicate(timeout=600)
    results = [json.loads(line[5:]) for line in stdout.splitlines() if line.startswith("CASE ")]
    assert results, stderr[-3000:]
    return {r["case"]: r for r in results}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Each group's cases, by name: the weights files, the shard folders and the run configs, their drivers started
    together."""
    builders = {"weights": _weights_driver, "shards": _shard_driver, "configs": _config_driver}
    folders = {group: tmp_path_factory.mktemp(group) for group in builders}
    drivers = {}
    try:
        for group, build in builders.items():
            drivers[group] = _start(*build(folders[group]))
        done = {group: _results(driver) for group, driver in drivers.items()}
    finally:
        for driver in drivers.values():
            if driver.poll() is None:  # a timeout or an error above: leave nothing running
                driver.kill()
                driver.wait()
    assert not (folders["configs"] / "pwned").exists()  # the YAML tag ran nothing
    return done


def _assert_one_line(result, expected: str):
    assert result["outcome"] == "message", result
    assert result["text"].startswith("error: ") and "\n" not in result["text"], result
    assert expected in result["text"], result


# ---------------------------------------------------------------------------------------------------------------
# Weights files read by swinv2.create_model_from_checkpoint (--model.pretrained, the probe, the transfer study)


def _tiny():
    return swinv2.create_model("swinv2_tiny", **{**TINY, "num_classes": 0})


def _with_record(path, change):
    model = _tiny()
    record = swinv2.checkpoint.architecture(model)
    text = change(record)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, path, metadata={ARCH_KEY: text if isinstance(text, str) else json.dumps(record)})
    return path


def _edit(**fields):
    return lambda record: record.update(fields)


def _without_record(path, change):
    sd = _tiny().state_dict()
    change(sd)
    torch.save(sd, path)
    return path


def _zip_bomb(path):
    """A torch file rewritten with deflated members, one of which inflates to 256 MiB of zeros (from ~260 KB)."""
    honest = path.with_suffix(".honest")
    torch.save(_tiny().state_dict(), honest)
    with zipfile.ZipFile(honest) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
        prefix = src.infolist()[0].filename.split("/")[0]
        with dst.open(f"{prefix}/data/bomb", "w", force_zip64=True) as f:
            for _ in range(256):
                f.write(bytes(1 << 20))
    return path


WEIGHTS = {
    "record not JSON": (lambda p: _with_record(p, lambda r: "{not json"), "not JSON"),
    "record with an unknown key": (lambda p: _with_record(p, _edit(evil=1)), "unknown architecture field"),
    "depths of a billion": (lambda p: _with_record(p, _edit(depths=[10**9, 2])), "depths=1000000000"),
    "embed dim 1e12": (lambda p: _with_record(p, _edit(embed_dim=10**12)), "embed_dim=1000000000000"),
    "negative embed dim": (lambda p: _with_record(p, _edit(embed_dim=-24)), "embed_dim=-24"),
    "window 0": (lambda p: _with_record(p, _edit(window_size=[[0, 0], [0, 0]])), "window_size=0"),
    # every field within its limits, but 1 px patches at 4096 px with window 128 need a terabyte of attention masks
    "buffers of a terabyte": (
        lambda p: _with_record(
            p, _edit(img_size=[4096, 4096], patch_size=1, window_size=[[128, 128]] * 2, pretrained_window_sizes=0)
        ),
        "buffer size",
    ),
    "stage index 1e9": (
        lambda p: _without_record(p, lambda sd: sd.update({"layers.1000000000.blocks.0.norm1.weight": torch.ones(1)})),
        "stage 1000000000",
    ),
    "0-d patch embedding": (
        lambda p: _without_record(p, lambda sd: sd.update({"patch_embed.proj.weight": torch.tensor(1.0)})),
        "patch_embed.proj.weight has shape ()",
    ),
    "compressed archive": (_zip_bomb, "is compressed"),
    "FIFO": (lambda p: os.mkfifo(p) or p, "not a regular file"),
}


def _weights_driver(tmp):
    paths = {}
    for name, (build, _) in WEIGHTS.items():
        suffix = (
            ".pth"
            if name in ("stage index 1e9", "0-d patch embedding", "compressed archive", "FIFO")
            else ".safetensors"
        )
        paths[name] = str(build(tmp / f"{len(paths)}{suffix}"))
    calls = "[" + ", ".join(f"({n!r}, lambda: swinv2.create_model_from_checkpoint({p!r}))" for n, p in paths.items())
    return tmp, "import swinv2", calls + "]"


@pytest.mark.parametrize("case", sorted(WEIGHTS))
def test_a_malformed_weights_file_ends_in_one_line(results, case):
    _assert_one_line(results["weights"][case], WEIGHTS[case][1])


# ---------------------------------------------------------------------------------------------------------------
# Shard folders (--trainer.strategy fsdp2 --ckpt_path): storage entries of `.metadata`


def _storage_edit(change):
    def build(folder):
        import torch.distributed.checkpoint as dcp

        dcp.save({"state_dict": {"w": torch.randn(4, 4)}, "lr": 0.1}, checkpoint_id=str(folder), no_dist=True)
        torch.save({"epoch": 0}, folder / "meta.pt")
        metadata = pickle.loads((folder / ".metadata").read_bytes())
        change(folder, metadata)
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
        return folder

    return build


def _first(metadata):
    return next(iter(metadata.storage_data.values()))


def _fifo(folder, metadata):
    os.mkfifo(folder / "fifo")
    _first(metadata).relative_path = "fifo"


def _deflated(data: bytes) -> bytes:
    """The same torch archive with its members deflated (what torch.save never writes)."""
    import io

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


def _compress(fqn):
    """Rewrite the storage entry of `fqn` (a tensor or a byte entry) as a deflated archive, appended to its file."""

    def change(folder, metadata):

        index = next(i for i in metadata.storage_data if i.fqn == fqn)
        info = metadata.storage_data[index]
        path = folder / info.relative_path
        data = path.read_bytes()
        deflated = _deflated(data[info.offset : info.offset + info.length])
        path.write_bytes(data + deflated)
        info.offset, info.length = len(data), len(deflated)

    return change


SHARDS = {
    "a compressed tensor entry": (_storage_edit(_compress("state_dict.w")), "is compressed"),
    "a compressed byte entry": (_storage_edit(_compress("lr")), "is compressed"),
    "a transformed entry": (
        _storage_edit(lambda f, m: setattr(_first(m), "transform_descriptors", ["zstd"])),
        "stored transformed",
    ),
    "storage in a FIFO": (_storage_edit(_fifo), "not a regular file"),
    "/dev/zero, 2**40 bytes": (
        _storage_edit(
            lambda f, m: (setattr(_first(m), "relative_path", "/dev/zero"), setattr(_first(m), "length", 1 << 40))
        ),
        "outside its folder",
    ),
    "a path out of the folder": (
        _storage_edit(lambda f, m: setattr(_first(m), "relative_path", "../../../etc/passwd")),
        "outside its folder",
    ),
    "a missing storage entry": (
        _storage_edit(lambda f, m: m.storage_data.pop(next(iter(m.storage_data)))),
        "no storage entry",
    ),
    "a negative offset": (_storage_edit(lambda f, m: setattr(_first(m), "offset", -8)), "reads bytes -8"),
    "a NUL in a file name": (_storage_edit(lambda f, m: setattr(_first(m), "relative_path", "a\x00b")), "outside"),
}


def _shard_driver(tmp):
    paths = {name: str(build(tmp / f"{i}.ckpt")) for i, (name, (build, _)) in enumerate(SHARDS.items())}
    calls = ", ".join(f"({n!r}, lambda: check_sharded_checkpoint({p!r}))" for n, p in paths.items())
    return tmp, "from simmim.checkpointing.untrusted import check_sharded_checkpoint", f"[{calls}]"


@pytest.mark.parametrize("case", sorted(SHARDS))
def test_a_malformed_shard_folder_ends_in_one_line(results, case):
    _assert_one_line(results["shards"][case], SHARDS[case][1])


# ---------------------------------------------------------------------------------------------------------------
# A run's config.yaml read by `python -m simmim.reconstruct`

CONFIGS = {
    "a top-level list": ("- 1\n- 2\n", "not a run's configuration"),
    "img_size 40000": ("data:\n  img_size: 40000\n", "img_size=40000"),
    "an unknown key": ("data:\n  evil: 1\n", "'evil' is not an argument of PretrainDataModule"),
    "huge depths": (
        "model:\n  encoder_kwargs:\n    depths: [1000000000, 2]\n    num_heads: [2, 4]\n",
        "depths=1000000000",
    ),
    "a Python object tag": ("data: !!python/object/apply:os.system ['touch pwned']\n", "is not YAML"),
}


def _config_driver(tmp):
    from simmim.pretrain.module import SimMIMPretrainer

    images = image_folder(tmp / "images", ["0.png", "1.png"], 32)
    encoder = {k: TINY[k] for k in ("embed_dim", "depths", "num_heads")}
    module = SimMIMPretrainer(arch="swinv2_tiny", img_size=32, window_size=4, encoder_kwargs=encoder)
    calls = []
    for i, (name, (text, _)) in enumerate(CONFIGS.items()):
        (tmp / f"run{i}" / "checkpoints").mkdir(parents=True)
        ckpt = tmp / f"run{i}" / "checkpoints" / "last.ckpt"
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
        (tmp / f"run{i}" / "config.yaml").write_text(text)
        args = ["--checkpoint", str(ckpt), "--images", str(images), "--out", str(tmp / f"{i}.png")]
        calls.append(f"({name!r}, lambda: main({args!r}))")
    return tmp, "from simmim.pretrain.reconstruct import main", "[" + ", ".join(calls) + "]"


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_a_malformed_run_config_ends_in_one_line(results, case):
    _assert_one_line(results["configs"][case], CONFIGS[case][1])


def test_an_evaluation_command_prints_one_line_for_a_refused_file(tmp_path):
    """`python -m simmim.probe` through its entry point; the other evaluation entry points are the same shim
    (tests/test_layout.py checks that each runs inside `user_errors_as_messages`)."""
    bad = _with_record(tmp_path / "encoder.safetensors", _edit(depths=[10**9, 2]))
    out = subprocess.run([sys.executable, "-m", "simmim.probe", "--checkpoint", str(bad)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: "), out.stderr[-2000:]
    assert "depths=1000000000" in out.stderr
