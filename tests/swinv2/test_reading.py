"""Reading weight files: official checkpoints load, crafted ones are refused with a one-line error."""

import collections
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY
from crafted_checkpoints import COUNTER_PAYLOAD, CRAFTED

import swinv2
from swinv2.reading import UnsafeCheckpointError, read_checkpoint


def test_counter_payload_is_a_real_attack():
    """The crafted bytes do break `Counter` under a plain unpickler (in a child process), so refusing them counts."""
    code = f"import pickle, collections; pickle.loads({COUNTER_PAYLOAD!r}); print(collections.Counter('aab'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "Counter()"


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_checkpoint_is_refused_and_changes_nothing(tmp_path, kind):
    marker = tmp_path / "marker"
    path = CRAFTED[kind](tmp_path / f"{kind}.pth", marker, swinv2.SwinTransformerV2(**TINY).state_dict())
    update = collections.Counter.update
    expected = "'posix.system'" if kind != "counter" else "Can only build"
    with pytest.raises(UnsafeCheckpointError, match=rf"refused to load .*{kind}\.pth: .*{expected}") as err:
        swinv2.load_pretrained(swinv2.SwinTransformerV2(**TINY), path)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    assert collections.Counter.update is update and collections.Counter("aab") == {"a": 2, "b": 1}


def test_official_config_is_read_as_plain_data(tmp_path):
    from yacs.config import CfgNode

    config = CfgNode({"DATA": CfgNode({"IMG_SIZE": 192}), "MODEL": CfgNode({"TYPE": "swinv2"})})
    config.freeze()
    torch.save({"model": {}, "config": config, "epoch": 799}, tmp_path / "ckpt_epoch_799.pth")
    raw = read_checkpoint(tmp_path / "ckpt_epoch_799.pth")
    assert type(raw["config"]) is collections.OrderedDict
    assert raw["config"]["DATA"]["IMG_SIZE"] == 192 and raw["epoch"] == 799
    assert "yacs" not in {type(v).__module__.split(".")[0] for v in raw["config"].values()}


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "notes.pth").write_text("these are not weights")
    with pytest.raises(ValueError, match=r"cannot read .*notes\.pth as a PyTorch checkpoint"):
        read_checkpoint(tmp_path / "notes.pth")
    truncated = tmp_path / "truncated.pth"
    torch.save({"w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated.pth"):
        read_checkpoint(truncated)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        read_checkpoint(os.fspath(tmp_path / "nothing.pth"))
