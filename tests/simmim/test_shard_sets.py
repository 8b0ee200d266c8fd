"""Shard sets: the converter (`python -m simmim.shard`), the reader (`simmim.data.shards.ShardSet`), its training
order (`simmim.seeding.ShardSampler`), crafted sets, pretraining from shards in a folder and in an S3-compatible
store (moto's server on the loopback interface) with two processes under DDP, `zero1` (killed and resumed) and
`fsdp2`, and fine-tuning under DDP from an fsspec filesystem (an HTTP server on the loopback interface)."""

import contextlib
import functools
import http.server
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import image_folder, recorded_command

import swinv2
from simmim.data import convert
from simmim.data.shards import ShardSet
from simmim.errors import ConfigError, DataFolderError
from simmim.pretrain.data import PretrainDataModule
from simmim.seeding import SEED_ENV, ShardSampler, derive_seed

SMALL = ["--chunk_mb", "0.002", "--part_size", "4", "--workers", "1"]  # chunks of 1-2 images, parts of 4 files


def _tree(tmp_path):
    """Class folders a/ (6 images) and b/ (5 and a corrupt one), and an image directly in the root."""
    src = image_folder(tmp_path / "src" / "a", [f"{i}.png" for i in range(6)], size=24).parent
    image_folder(src / "b", [f"{i}.png" for i in range(5)] + ["bad.png"], size=20, broken=["bad.png"])
    cv2.imwrite(str(src / "top.png"), np.full((16, 16, 3), 7, np.uint8))
    return src


def _samples(shards):
    return [(key, label, bytes(image)) for key, label, image, _ in map(shards.read, range(len(shards)))]


def test_the_converter_packs_every_decodable_image_unchanged_with_its_class_and_names_the_rest(tmp_path, capsys):
    src = _tree(tmp_path)
    assert convert.main([str(src), str(tmp_path / "out"), *SMALL]) == 12
    assert "skipped b/bad.png: cannot decode" in capsys.readouterr().err
    shards = ShardSet(tmp_path / "out")
    assert shards.classes == ["a", "b"] and len(shards.chunk_names) > 3
    samples = _samples(shards)
    keys = [k for k, _, _ in samples]
    assert sorted(keys) == sorted([f"a/{i}.png" for i in range(6)] + [f"b/{i}.png" for i in range(5)] + ["top.png"])
    assert keys != sorted(keys)  # written in a random order: a chunk is not one class folder
    for key, label, image in samples:
        assert image == (src / key).read_bytes()  # the file's bytes, not re-encoded
        assert label == {"a": 0, "b": 1}.get(key.split("/")[0], -1)
    record = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert [k for k, _ in record["skipped"]] == ["b/bad.png"] and record["count"] == 12
    # litdata's classic layout, whatever is installed (with pyarrow its writer would keep the samples only in an
    # Arrow table after equal offsets, which its byte-range reads of remote sets read as empty)
    for chunk in shards.chunk_names:
        data = (tmp_path / "out" / chunk).read_bytes()
        n = int(np.frombuffer(data[:4], np.uint32)[0])
        offsets = np.frombuffer(data[4 : 4 + 4 * (n + 1)], np.uint32)
        assert (np.diff(offsets) > 0).all() and offsets[-1] == len(data), chunk


def test_an_interrupted_conversion_redoes_only_its_unfinished_parts_and_ends_as_an_uninterrupted_one(
    tmp_path, monkeypatch, capsys
):
    src = _tree(tmp_path)
    convert.main([str(src), str(tmp_path / "whole"), *SMALL])
    real, done = convert._convert_part, []

    def interrupted(job):
        if job[2] == 2:
            raise KeyboardInterrupt  # as Ctrl-C during the third part
        done.append(job[2])
        return real(job)

    monkeypatch.setattr(convert, "_convert_part", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.main([str(src), str(tmp_path / "cut"), *SMALL])
    assert not (tmp_path / "cut" / "index.json").exists() and done == [0, 1]
    first_chunks = {p: p.stat().st_mtime_ns for p in (tmp_path / "cut").glob("chunk-[01]-*.bin")}
    monkeypatch.setattr(convert, "_convert_part", lambda job: (done.append(job[2]), real(job))[1])
    assert convert.main([str(src), str(tmp_path / "cut"), *SMALL]) == 12
    assert done == [0, 1, 2, 3]  # 13 files in parts of 4: only parts 2 and 3 written again
    assert {p: p.stat().st_mtime_ns for p in first_chunks} == first_chunks
    whole, cut = ShardSet(tmp_path / "whole"), ShardSet(tmp_path / "cut")
    assert cut.chunk_names == whole.chunk_names and _samples(cut) == _samples(whole)
    assert not list((tmp_path / "cut").glob("part-*.json"))
    assert convert.main([str(src), str(tmp_path / "cut"), *SMALL]) == 12 and done == [0, 1, 2, 3]
    assert "already complete" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="another source, with other settings"):
        convert.main([str(src), str(tmp_path / "cut"), *SMALL, "--seed", "1"])
    import fcntl

    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / ".convert.lock", "w") as held:  # as a conversion running into it holds it
        fcntl.flock(held, fcntl.LOCK_SH)
        with pytest.raises(ConfigError, match="another conversion is writing it"):
            convert.main([str(src), str(tmp_path / "busy"), *SMALL])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and not a conversion"):
        convert.main([str(src), str(tmp_path / "other"), *SMALL])
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]  # a refused folder is not touched


@pytest.mark.slow
def test_a_conversion_killed_mid_part_with_its_workers_finishes_as_an_uninterrupted_one(tmp_path):
    """The whole process group killed (as a scheduler ends a job) while two worker processes write parts, then the
    same command again: the set equals one converted without interruption."""
    import signal

    src = image_folder(tmp_path / "src" / "c", [f"{i:02d}.png" for i in range(40)], size=48).parent
    args = ["--chunk_mb", "0.004", "--part_size", "2"]
    convert.main([str(src), str(tmp_path / "whole"), *args, "--workers", "1"])
    cut = tmp_path / "cut"
    job = subprocess.Popen(
        [sys.executable, "-m", "simmim.shard", str(src), str(cut), *args, "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(list(cut.glob("part-*.json"))) < 3 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    deadline = time.monotonic() + 30  # the killed workers end (and let go of the lock) a moment after their parent
    while time.monotonic() < deadline:
        try:
            os.killpg(job.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    assert job.returncode == -9 and not (cut / "index.json").exists()  # killed before the end
    assert convert.main([str(src), str(cut), *args, "--workers", "2"]) == 40
    whole, finished = ShardSet(tmp_path / "whole"), ShardSet(cut)
    assert finished.chunk_names == whole.chunk_names and _samples(finished) == _samples(whole)
    assert sorted(p.name for p in cut.iterdir() if not p.name.startswith("chunk-")) == [
        ".convert.json",
        ".convert.lock",
        "index.json",
        "shards.json",
    ]  # nothing left of the parts


def test_a_process_forked_after_a_read_opens_its_own_reader(digit_shards):
    """A worker forked from a process that read the set (a monitor reads labels before its loader starts) does not
    share that process's reader (its connections, its open files): it opens its own, and reads the same samples."""
    shards = ShardSet(digit_shards)
    key = shards.read(8)[0]
    shards.read(7)  # the last read, kept: the child reads 8 again
    parent = shards._reader
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        ok = shards.read(8)[0] == key and shards._reader is not parent
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and shards._reader is parent


def _write_set(out: Path, items) -> None:
    """A shard set written directly with litdata's writer (what another tool, or a tamperer, could leave)."""
    from litdata.streaming.writer import BinaryWriter

    assert "DATA_OPTIMIZER_GLOBAL_RANK" not in os.environ  # the converter leaves its process as it was
    writer = BinaryWriter(str(out), chunk_bytes=1 << 20)
    for i, item in enumerate(items):
        writer[i] = item
    writer.done()
    os.replace(out / "0.index.json", out / "index.json")
    record = {"format": "simmim-shards", "version": 1, "count": len(items), "classes": ["c"], "unlabelled": 0}
    (out / "shards.json").write_text(json.dumps(record))


class _Payload:
    """Unpickling it would create the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def _png(value=128, size=24) -> bytes:
    return cv2.imencode(".png", np.full((size, size, 3), value, np.uint8))[1].tobytes()


def test_a_crafted_shard_set_is_refused_before_any_sample_is_unpickled_or_read_outside_it(tmp_path):
    marker = tmp_path / "ran"
    crafted = tmp_path / "pickled"
    _write_set(crafted, [{"key": "x", "label": 0, "image": _Payload(marker)}])
    with pytest.raises(DataFolderError, match="records data_format"):
        ShardSet(crafted)
    good = tmp_path / "good"
    _write_set(good, [{"key": f"c/{i}.png", "label": 0, "image": _png(i)} for i in range(3)])
    assert len(ShardSet(good)) == 3

    def tampered(name, change):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return folder

    def rename_chunk(folder):
        index = json.loads((folder / "index.json").read_text())
        index["chunks"][0]["filename"] = "../good/chunk-0-0.bin"
        (folder / "index.json").write_text(json.dumps(index))

    def link_chunk(folder):
        (folder / "chunk-0-0.bin").unlink()
        (folder / "chunk-0-0.bin").symlink_to(good / "chunk-0-0.bin")

    def miscount(folder):
        record = json.loads((folder / "shards.json").read_text())
        (folder / "shards.json").write_text(json.dumps({**record, "count": 4}))

    for name, change, message in [
        ("outside", rename_chunk, "names a chunk '../good"),
        ("linked", link_chunk, "chunk-0-0.bin is not a regular file"),
        ("miscounted", miscount, "holds 3 samples, its shards.json 4"),
        ("no record", lambda f: (f / "shards.json").unlink(), "cannot read its shards.json"),
        ("no chunk", lambda f: (f / "chunk-0-0.bin").unlink(), "cannot read its chunk chunk-0-0.bin"),
    ]:
        with pytest.raises(DataFolderError, match=message):
            ShardSet(tampered(name, change))

    # opened while it was good, swapped for the pickled set before the first read: litdata's own reading of the
    # index is checked too, in the process that reads
    swapped = tampered("swapped", lambda f: None)
    shards = ShardSet(swapped)
    for name in ("index.json", "chunk-0-0.bin"):
        shutil.copy(crafted / name, swapped / name)
    with pytest.raises(DataFolderError, match="records data_format"):
        shards.read(0)
    assert not marker.exists()


def test_a_corrupt_image_inside_a_shard_is_named_by_its_set_key_and_chunk_and_replaced_in_training(tmp_path):
    from simmim.pretrain.augment import PretrainTransform
    from simmim.pretrain.data import MaskedImageDataset
    from simmim.pretrain.masking import MaskGenerator

    items = [{"key": f"c/{i}.png", "label": 0, "image": _png(40 * i)} for i in range(4)]
    items.insert(2, {"key": "c/bad.png", "label": 0, "image": b"not an image"})
    _write_set(tmp_path / "set", items)
    ds = MaskedImageDataset(ShardSet(tmp_path / "set"), PretrainTransform(16, True), MaskGenerator(16, 8, 4, 0.5), True)
    with pytest.warns(UserWarning, match=r"set key 'c/bad.png' \(in chunk-0-0.bin\) as an image"):
        image, _, bad = ds[(2, 5)]
    assert bad == (2,) and int(image.float().mean().round()) == 80  # the next sample, c/2.png (value 80)


def test_unreadable_samples_in_shards_count_against_the_bad_image_limit(tmp_path):
    from simmim.pretrain import main as pretrain

    items = [{"key": f"c/{i}.png", "label": 0, "image": _png(20 * i, size=40)} for i in range(8)]
    items[3:3] = [{"key": f"c/bad{i}.png", "label": 0, "image": b"broken"} for i in range(2)]
    _write_set(tmp_path / "set", items)
    args = ["--data.root", str(tmp_path / "set"), "--data.img_size", "32", "--data.mask_patch_size", "8",
            "--data.batch_size", "2", "--data.val_fraction", "0", "--data.num_workers", "0",
            "--model.encoder_kwargs", '{"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}',
            "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run")]  # fmt: skip
    with pytest.warns(UserWarning, match=r"key 'c/bad\d.png' \(in chunk-0-0.bin\)"):
        with pytest.raises(SystemExit, match="2 of the 10 training images could not be decoded"):
            pretrain([*args, "--bad_images.max_fraction", "0.1"])
    with pytest.warns(UserWarning, match="c/bad"):
        cli = pretrain([*args, "--bad_images.max_fraction", "0.2", "--trainer.default_root_dir", str(tmp_path / "b")])
    assert cli.trainer.global_step == 5 and cli.bad_images.bad == {3, 4}  # both counted once, every slot trained


def test_the_shard_order_shares_each_epoch_out_once_keeps_to_a_few_chunks_and_resumes_anywhere():
    sizes = np.array([5, 3, 7, 4, 6, 2, 5])  # 32 samples in 7 chunks
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for world in (1, 2, 3):
        shares = [list(ShardSampler(sizes, seed=4, window=2, num_replicas=world, rank=r)) for r in range(world)]
        indices = [i for share in shares for i, _ in share]
        assert all(len(s) == 32 // world for s in shares) and len(set(indices)) == len(indices) == 32 // world * world
    one = ShardSampler(sizes, seed=4, window=2)
    order = one.order(0)
    assert sorted(order) == list(range(32)) and not np.array_equal(order, one.order(1))

    def most_open_chunks(order):  # chunks begun but not finished, at worst, reading `order` from the start
        left, most = dict(enumerate(sizes)), 0
        for chunk in np.searchsorted(starts, order, side="right") - 1:
            left[chunk] -= 1
            most = max(most, sum(0 < n < sizes[c] for c, n in left.items()))
        return most

    assert most_open_chunks(order) <= 2  # a window of two chunks is read through before the next begins
    assert most_open_chunks(ShardSampler(sizes, seed=4, window=1).order(0)) == 1
    assert most_open_chunks(ShardSampler(sizes, seed=4, window=7).order(0)) > 2
    seeds = [s for _, s in one]
    assert seeds == [derive_seed(4, 1, 0, p) for p in range(32)]  # (run seed, sample stream, epoch, position)
    for world in (1, 2):
        for start in (0, 6 * world, 12 * world):
            for r in range(world):
                whole = list(ShardSampler(sizes, seed=4, window=2, num_replicas=world, rank=r))
                resumed = ShardSampler(sizes, seed=4, window=2, num_replicas=world, rank=r)
                resumed.pin(0, start)
                assert list(resumed) == whole[start // world :]


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory, digits32):
    out = tmp_path_factory.mktemp("digit_shards") / "set"
    convert.main([digits32, str(out), "--chunk_mb", "0.02", "--part_size", "200", "--workers", "1"])
    return str(out)


def test_pretraining_reads_shards_with_chunks_held_out_and_the_same_draws_with_or_without_workers(
    digit_shards, monkeypatch
):
    monkeypatch.setenv(SEED_ENV, "3")

    def batches(workers):
        dm = PretrainDataModule(digit_shards, img_size=32, mask_patch_size=8, batch_size=8, num_workers=workers)
        dm.setup("fit")
        loader = dm.train_dataloader()
        it = iter(loader)
        return dm, [next(it) for _ in range(3)]

    dm, no_workers = batches(0)
    assert not set(dm.train_files.chunks) & set(dm.val_files.chunks)
    assert len(dm.train_files) + len(dm.val_files) == len(ShardSet(digit_shards))
    assert 0.02 < len(dm.val_files) / len(ShardSet(digit_shards)) < 0.09  # --data.val_fraction 0.05, whole chunks
    _, two_workers = batches(2)
    for (x0, m0, _), (x2, m2, _) in zip(no_workers, two_workers):
        assert torch.equal(x0, x2) and torch.equal(m0, m2)
    assert len({image.numpy().tobytes() for x, _, _ in no_workers for image in x}) == 24


def test_fine_tuning_reads_labelled_shards_with_their_classes(digit_shards, tmp_path):
    from simmim.finetune.data import ClassificationDataModule

    dm = ClassificationDataModule(digit_shards, img_size=32, batch_size=8, num_workers=0, augment="digits")
    assert dm.classes == [str(d) for d in range(10)]
    dm.setup("fit")
    assert not set(dm.train_files.chunks) & set(dm.val_files.chunks)
    x, labels, positions, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32)
    for label, j in zip(labels.tolist(), positions.tolist()):
        assert dm.train_files.read(j)[0].split("/")[0] == dm.classes[label]  # the class of the sample's folder
    few = ClassificationDataModule(digit_shards, img_size=32, label_fraction=0.25, augment="digits")
    few.setup("fit")
    assert 0.2 < len(few.train_files) / len(dm.train_files) < 0.3 and few.val_files.chunks.tolist() == (
        dm.val_files.chunks.tolist()
    )
    src = _tree(tmp_path)  # top.png has no class folder
    convert.main([str(src), str(tmp_path / "out"), *SMALL])
    with pytest.raises(DataFolderError, match="1 of its images have no class"):
        ClassificationDataModule(str(tmp_path / "out"))


def test_the_evaluation_tools_read_shards(digit_shards, pretraining_run, tmp_path):
    """The probe, the reconstruction viewer and the kNN monitor of a pretraining run, all from shards."""
    from simmim.pretrain import main as pretrain
    from simmim.probe import main as probe
    from simmim.reconstruct import main as reconstruct

    accuracy = probe(["--checkpoint", str(pretraining_run.export), "--data.root", digit_shards, "--epochs", "5"])
    assert 20 < accuracy <= 100  # ten digit classes: chance is 10%
    grid = reconstruct(["--checkpoint", str(pretraining_run.checkpoint), "--images", digit_shards, "--out",
                        str(tmp_path / "grid.png"), "--num_images", "3"])  # fmt: skip
    assert grid.shape == (3, 3 * 34 + 2, 4 * 34 + 2)
    cli = pretrain([
        "--data.root", digit_shards, "--data.img_size", "32", "--data.mask_patch_size", "8", "--data.batch_size", "16",
        "--data.num_workers", "0", "--model.encoder_kwargs", '{"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}',
        "--model.window_size", "4", "--model.knn_root", digit_shards, "--model.knn_every_n_epochs", "1",
        "--model.finetune_every_n_epochs", "0", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.precision", "32", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
    ])  # fmt: skip
    assert 0 <= float(cli.trainer.callback_metrics["val/knn_acc1"]) <= 100


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_a_resume_on_other_files_of_the_same_count_warns(tmp_path, kind):
    """The training loader's state names its files (a folder index's or a shard set's fingerprint): resuming it on
    another set of as many files warns that the order differs; on the same set it does not; a malformed entry is
    refused."""
    import warnings

    from simmim.checkpointing.untrusted import MalformedRecordError

    roots = []
    for name, size in (("a", 24), ("b", 26)):  # as many files, other names, other images
        folder = image_folder(tmp_path / name, [f"{name}{i}.png" for i in range(12)], size=size)
        if kind == "shards":
            convert.main([str(folder), str(tmp_path / f"{name}-shards"), *SMALL])
            folder = tmp_path / f"{name}-shards"
        roots.append(str(folder))

    def loader(root):
        dm = PretrainDataModule(root, img_size=16, mask_patch_size=8, batch_size=2, num_workers=0, val_fraction=0)
        dm.prepare_data()
        dm.setup("fit")
        return dm.train_dataloader()

    state = loader(roots[0]).state_dict()
    assert isinstance(state["files"], str)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader(roots[0]).load_state_dict(state)  # the same files: no warning
    with pytest.warns(UserWarning, match="as many files as when the checkpoint was written .* but not the same"):
        loader(roots[1]).load_state_dict(state)
    with pytest.raises(MalformedRecordError, match="files="):
        loader(roots[0]).load_state_dict({**state, "files": ["not", "a", "string"]})


# --- an S3-compatible store on the loopback interface, two processes, killed and resumed -------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1; yields (endpoint URL, environment for processes that read from it)."""
    pytest.importorskip("moto")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto's server did not start: {endpoint}") from None
                time.sleep(0.2)
        yield endpoint, env
    finally:
        server.kill()
        server.wait()
        log.close()


def _upload(folder: Path, env: dict, bucket: str, prefix: str) -> str:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test", aws_secret_access_key="test",
        region_name="us-east-1",
    )  # fmt: skip
    client.create_bucket(Bucket=bucket)
    for path in folder.iterdir():
        if not path.name.startswith("."):
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


def test_a_shard_set_in_object_storage_reads_as_the_local_one(tmp_path, s3, monkeypatch):
    endpoint, env = s3
    src = _tree(tmp_path)
    convert.main([str(src), str(tmp_path / "out"), *SMALL])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    url = _upload(tmp_path / "out", env, "local-copy", "sets/tree")
    remote = ShardSet(url, cache=str(tmp_path / "cache"))
    assert remote.fingerprint() == ShardSet(tmp_path / "out").fingerprint()
    assert _samples(remote) == _samples(ShardSet(tmp_path / "out"))
    with pytest.raises(DataFolderError, match="cannot read its shards.json"):
        ShardSet("s3://local-copy/sets/none", cache=str(tmp_path / "cache"))
    # the remote index replaced after opening by one that litdata, reading it, would turn into a folder outside
    # its cache: litdata reads the checked copy, never the remote file
    import boto3

    opened = ShardSet(url, cache=str(tmp_path / "cache"))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    boto3.client("s3").put_object(
        Bucket="local-copy", Key="sets/tree/index.json", Body=json.dumps({**index, "updated_at": "../../escaped"})
    )
    assert _samples(opened) == _samples(ShardSet(tmp_path / "out"))
    assert not list(tmp_path.rglob("escaped"))


def _uniform_images(folder: Path, n: int) -> Path:
    """n images of one colour each, all different: any crop of one is that colour, so a training batch's pixels
    tell which samples it holds."""
    folder.mkdir(parents=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.full((40, 40, 3), (7 * i, 255 - 7 * i, 3 * i), np.uint8))
    return folder


S3_RUN = [
    "--data.img_size", "32", "--data.mask_patch_size", "8", "--data.batch_size", "4", "--data.val_fraction", "0",
    "--data.num_workers", "2", "--model.encoder_kwargs", '{"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}',
    "--trainer.limit_val_batches", "0", "--trainer.precision", "32", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
    "--trainer.strategy", "ddp", "--trainer.max_epochs", "2", "--model.knn_every_n_epochs", "0",
    "--model.finetune_every_n_epochs", "0",
]  # fmt: skip


@pytest.mark.slow
def test_two_processes_pretrain_from_object_storage_once_per_epoch_and_resume_exactly_after_sigkill(tmp_path, s3):
    """32 one-colour images in shards in the S3 store, 2 gloo ranks x 2 workers, batch 4: every epoch reads each
    image exactly once across the ranks; a run under `zero1` killed (SIGKILL) in its second epoch and resumed from
    its last checkpoint, and a run under `fsdp2`, read what an uninterrupted DDP run reads, step by step on each
    rank, crops and masks alike, with its losses."""
    from recording import read_log

    _, env = s3
    convert.main([str(_uniform_images(tmp_path / "src", 32)), str(tmp_path / "out"), "--chunk_mb", "0.001",
                  "--part_size", "8", "--workers", "1"])  # fmt: skip
    url = _upload(tmp_path / "out", env, "training", "digits")
    common = ["--data.root", url, *S3_RUN]
    procs = {}
    cut_args = ["--checkpoint_every_n_steps", "1", "--trainer.strategy", "zero1"]  # a sharded strategy
    runs = (("whole", [], None), ("cut", cut_args, 6), ("fsdp2", ["--trainer.strategy", "fsdp2"], None))
    for name, extra, kill in runs:
        cmd, cmd_env = recorded_command(
            [*common, *extra, "--trainer.default_root_dir", str(tmp_path / name)], tmp_path / f"{name}.jsonl", kill
        )
        out = open(tmp_path / f"{name}.out", "w")
        procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**cmd_env, **env})
    codes = {name: proc.wait(timeout=900) for name, proc in procs.items()}
    for name in ("whole", "fsdp2"):
        assert codes[name] == 0, (tmp_path / f"{name}.out").read_text()[-3000:]
    assert codes["cut"] != 0 and len(read_log(tmp_path / "cut.jsonl")) == 12  # both ranks killed after step 6
    cmd, cmd_env = recorded_command(
        [*common, *cut_args, "--trainer.default_root_dir", str(tmp_path / "cut"), "--ckpt_path", "last"],
        tmp_path / "cut.jsonl",
    )  # fmt: skip
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**cmd_env, **env})
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def by_step(log):
        rows = read_log(log)
        steps = {(r["rank"], r["step"]): r for r in rows}
        assert len(steps) == len(rows), "a step was trained twice"
        return steps

    whole, cut = by_step(tmp_path / "whole.jsonl"), by_step(tmp_path / "cut.jsonl")
    fsdp2 = by_step(tmp_path / "fsdp2.jsonl")
    assert sorted(whole) == sorted(cut) == sorted(fsdp2) == [(rank, step) for rank in (0, 1) for step in range(1, 9)]
    for epoch_steps in (range(1, 5), range(5, 9)):  # 4 steps an epoch
        images = [im for rank in (0, 1) for step in epoch_steps for im in whole[(rank, step)]["images"]]
        assert len(images) == len(set(images)) == 32  # every image once, none twice, none left out
    for key, row in whole.items():
        for run in (cut, fsdp2):
            assert (run[key]["images"], run[key]["masks"]) == (row["images"], row["masks"]), key
            assert run[key]["loss"] == pytest.approx(row["loss"], rel=1e-4)  # sharded sums in another order


# --- any filesystem fsspec reads: an HTTP server on the loopback interface ----------------------------------------


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers `Range: bytes=a-b` (a CDN, or a bucket's public HTTPS endpoint, does) and
    counts what it served: `requests` holds (path, range header or None) per GET. `ranges=False`: it ignores
    ranges, sending whole files, as the standard library's server does."""

    requests: list = []
    ranges = True

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        if self.command == "GET":
            type(self).requests.append((self.path, self.headers.get("Range")))
        path, wanted = self.translate_path(self.path), self.headers.get("Range")
        if wanted is None or not self.ranges or not os.path.isfile(path):
            return super().send_head()
        first, last = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted).groups()
        size = os.path.getsize(path)
        first, last = int(first), min(int(last or size - 1), size - 1)
        with open(path, "rb") as f:
            f.seek(first)
            body = f.read(last - first + 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


@contextlib.contextmanager
def _http_server(folder: Path, ranges: bool = True):
    """An HTTP server of `folder` on 127.0.0.1, in a thread of this process; yields (its URL, its handler class)."""
    handler = type("Handler", (_RangeHandler,), {"requests": [], "ranges": ranges})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_a_shard_set_on_an_fsspec_filesystem_reads_as_the_local_one_by_byte_ranges(tmp_path):
    """`http://` is no store of litdata's: fsspec's HTTP filesystem reads it, through our downloader."""
    src = _tree(tmp_path)
    convert.main([str(src), str(tmp_path / "out"), *SMALL])
    local = ShardSet(tmp_path / "out")
    with _http_server(tmp_path) as (url, served):
        remote = ShardSet(f"{url}/out", cache=str(tmp_path / "cache"))
        assert remote.fingerprint() == local.fingerprint() and remote.classes == local.classes
        assert _samples(remote) == _samples(local)
        chunk_reads = [wanted for path, wanted in served.requests if "/chunk-" in path]
        assert len(chunk_reads) == 2 * len(local)  # a sample's offsets, then its bytes
        assert all(wanted is not None for wanted in chunk_reads)  # no chunk read whole
        assert not list((tmp_path / "cache").rglob("chunk-*"))  # nor kept
        assert np.array_equal(remote[3].decode(), local[3].decode())
        with pytest.raises(DataFolderError, match="cannot read its shards.json"):
            ShardSet(f"{url}/none", cache=str(tmp_path / "cache"))
    with _http_server(tmp_path, ranges=False) as (url, _):  # a server that ignores ranges: refused, not misread
        with pytest.raises(OSError, match="support range requests"):
            ShardSet(f"{url}/out", cache=str(tmp_path / "cache")).read(0)
    reasons = {
        "nosuch://example/set": "nosuch:// is not a store shards are read from",
        "hf://example/set": "litdata reads hf:// as a Hugging Face dataset",  # it would crawl it before any check
        "local://example/set": "give the folder's path",
        "file:///example/set": "give the folder's path without file://",
        "memory://example/set": "memory:// is not a store",  # private to one process
        "reference://example/set": "reference:// is not a store",  # its reads go where the file it reads says
        "simplecache::https://example/set": "simplecache:// is not a store",
        "https://user:token@example/set": "a URL with credentials",
        "https://example/set?token=1": "a URL with credentials, a query",
    }
    if importlib.util.find_spec("paramiko") is None:
        reasons["sftp://example/set"] = 'fsspec reads sftp:// through a package that is not installed .*"paramiko"'
    for root, reason in reasons.items():
        with pytest.raises(DataFolderError, match=f"--data.root {re.escape(root)}: .*{reason}"):
            ShardSet(root)


def test_a_remote_sample_range_outside_its_chunk_is_refused_before_it_is_read(tmp_path):
    """A chunk's offset table is part of the untrusted set: a sample whose end lies before its start (a range of
    about 4 GiB once read as unsigned) is refused by name before any byte of it is requested."""
    src = _tree(tmp_path)
    convert.main([str(src), str(tmp_path / "out"), *SMALL])
    chunk = tmp_path / "out" / ShardSet(tmp_path / "out").chunk_names[0]
    data = bytearray(chunk.read_bytes())
    data[8:12] = (0).to_bytes(4, "little")  # the first sample's end offset
    chunk.write_bytes(bytes(data))
    with _http_server(tmp_path) as (url, served):
        remote = ShardSet(f"HTTP{url[4:]}/out", cache=str(tmp_path / "cache"))  # a scheme in capitals reads too
        assert remote.read(1)[0] == ShardSet(tmp_path / "out").read(1)[0]
        served.requests.clear()
        with pytest.raises(DataFolderError, match=r"its chunk chunk-0-0.bin gives a sample 429496\d+ bytes at"):
            remote.read(0)
        assert len(served.requests) == 1  # the offsets only


FINE_RUN = [
    "--data.img_size", "32", "--data.batch_size", "4", "--data.num_workers", "2", "--data.augment", "digits",
    "--model.arch", "swinv2_tiny", "--model.encoder_kwargs", '{"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}',
    "--model.pretrained", "null", "--model.window_size", "4", "--trainer.max_epochs", "2", "--trainer.precision", "32",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
]  # fmt: skip


@pytest.mark.slow
def test_two_processes_fine_tune_from_an_fsspec_filesystem_reading_each_image_once_per_epoch(tmp_path):
    """32 classes of one image each, converted with train/ and val/ and served over HTTP; fine-tuning from the URL
    with 2 gloo ranks x 2 workers, batch 4, 2 epochs: the labels of each epoch's batches, across the ranks, are
    every class once; the classifier export holds the 32 classes."""
    from recording import fingerprint, read_log

    for split in ("train", "val"):
        for i in range(32):
            (tmp_path / "src" / split / f"c{i:02d}").mkdir(parents=True)
            cv2.imwrite(str(tmp_path / "src" / split / f"c{i:02d}" / "0.png"), np.full((40, 40, 3), 7 * i, np.uint8))
    convert.main([str(tmp_path / "src"), str(tmp_path / "out"), "--chunk_mb", "0.001", "--workers", "1"])
    with _http_server(tmp_path) as (url, _):
        args = ["--data.root", f"{url}/out", *FINE_RUN, "--trainer.default_root_dir", str(tmp_path / "fine")]
        cmd, env = recorded_command(args, tmp_path / "fine.jsonl", module="simmim.finetune")
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_log(tmp_path / "fine.jsonl")
    labels = {fingerprint(torch.tensor(i)) for i in range(32)}
    for epoch in (0, 1):
        seen = [y for row in rows if row["epoch"] == epoch for y in row["masks"]]  # the batch's labels
        assert len(seen) == 32 and set(seen) == labels, epoch
    exported = tmp_path / "fine" / "logs" / "version_0" / "classifier.safetensors"
    assert swinv2.create_model_from_checkpoint(exported).num_classes == 32
