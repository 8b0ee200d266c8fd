"""The file index (`simmim.data.index`): the same files in the same order as a listing, rebuilt exactly when the tree
changes, read from a list without a walk, refused when crafted, and no memory per file in a worker."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import counted_walks, image_folder

from simmim.data.folders import labelled_split
from simmim.data.images import list_images
from simmim.data.index import FileIndex, folder_index, index_from_list
from simmim.errors import ConfigError, DataFolderError


def _tree(root):
    """Class folders whose names sort differently part by part than as strings ("a-b" < "a/..." as strings),
    with capitals, accents and spaces, a nested folder, a file in the root, a non-image, a broken link and a link
    that loops."""
    image_folder(root / "a", ["y.webp", "Z.png"], 8)
    image_folder(root / "a" / "deep", ["x.PNG"], 8)
    image_folder(root / "a-b", ["1.png"], 8)
    image_folder(root / "B", ["é t.png"], 8)
    image_folder(root / "b", ["2.png", "10.jpg"], 8)
    (root / "top.png").write_bytes((root / "b" / "2.png").read_bytes())
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / "gone.png").symlink_to(root / "missing.png")
    (root / "b" / "loop.png").symlink_to(root / "b" / "loop.png")
    return root


def test_the_index_lists_what_a_listing_finds_in_its_order_with_classes(tmp_path):
    root = _tree(tmp_path / "tree")
    with pytest.warns(UserWarning, match="gone.png: a symbolic link whose target is missing") as caught:
        index = folder_index(root, tmp_path / "cache")
    assert any("loop.png" in str(w.message) for w in caught)  # a loop is passed over with a warning too
    with pytest.warns(UserWarning, match="gone.png"):
        listed = list_images(root)
    assert list(index) == [str(p) for p in listed] and len(index) == 8
    assert index.classes == ["B", "a", "a-b", "b"]
    labels = {os.path.relpath(index[i], root): index.label(i) for i in range(len(index))}
    assert labels == {"B/é t.png": 0, "a/Z.png": 1, "a/deep/x.PNG": 1, "a/y.webp": 1, "a-b/1.png": 2, "b/10.jpg": 3,
                      "b/2.png": 3, "top.png": -1}  # fmt: skip
    sub = index.subset(np.array([3, 0]))
    assert list(sub) == [index[3], index[0]] and sub.label(0) == 1 and list(sub.subset(np.array([1]))) == [index[0]]


def test_the_cached_index_is_reused_until_a_folder_changes(tmp_path, monkeypatch):
    root = _tree(tmp_path / "tree")
    (root / "b" / "gone.png").unlink()
    (root / "b" / "loop.png").unlink()
    walks = counted_walks(monkeypatch)
    first = folder_index(root, tmp_path / "cache")
    walks.clear()
    again = folder_index(root, tmp_path / "cache")
    assert walks == [] and list(again) == list(first)  # reused: nothing walked
    time.sleep(0.01)
    (root / "a" / "deep" / "new.png").write_bytes((root / "top.png").read_bytes())  # added deep down
    grown = folder_index(root, tmp_path / "cache")
    assert len(walks) == 1 and len(grown) == len(first) + 1 and str(root / "a" / "deep" / "new.png") in list(grown)
    assert len(folder_index(root, tmp_path / "cache")) == len(grown) and len(walks) == 1
    os.remove(root / "top.png")
    assert len(folder_index(root, tmp_path / "cache")) == len(first) and len(walks) == 2  # a file removed
    (root / "b" / "2.png").rename(root / "b" / "3.png")
    assert str(root / "b" / "3.png") in list(folder_index(root, tmp_path / "cache")) and len(walks) == 3  # renamed
    folder_index(root, tmp_path / "cache", reindex=True)
    assert len(walks) == 4  # asked for
    assert list(first) == list(first.subset(np.arange(len(first))))  # an older build stays readable


def test_a_folder_changed_in_the_clock_tick_of_its_walk_is_walked_again(tmp_path, monkeypatch):
    """A file added in the same tick as the walk would leave the folder's time unchanged: folders changed within
    RACY_NS of the walk are not trusted, so the next start walks again (and then trusts the older times)."""
    root = tmp_path / "tree"
    image_folder(root / "a", ["1.png"], 8)
    walks = counted_walks(monkeypatch, trust_recent=False)
    folder_index(root, tmp_path / "cache")
    folder_index(root, tmp_path / "cache")
    assert len(walks) == 2  # the folder was written just before the first walk
    past = time.time() - 60
    for folder in (root, root / "a"):
        os.utime(folder, (past, past))
    folder_index(root, tmp_path / "cache")
    folder_index(root, tmp_path / "cache")
    assert len(walks) == 3  # walked once more, then trusted


def test_a_file_list_is_read_without_a_walk_with_its_classes_and_refused_when_it_leaves_the_root(tmp_path):
    (tmp_path / "data").mkdir()
    listed = tmp_path / "files.txt"
    listed.write_text("cats/1.jpg\tcat\ndogs/2.jpg\tdog\n\ncats/3.jpg\tcat\n")
    index = index_from_list(tmp_path / "data", listed, tmp_path / "cache")
    assert list(index) == [str(tmp_path / "data" / p) for p in ("cats/1.jpg", "dogs/2.jpg", "cats/3.jpg")]
    assert index.classes == ["cat", "dog"] and [index.label(i) for i in range(3)] == [0, 1, 0]
    for bad, message in [
        ("/etc/passwd\n", "line 1: '/etc/passwd' is absolute or leaves --data.root"),
        ("a.jpg\n../../b.jpg\n", "line 2: '../../b.jpg' is absolute or leaves"),
        ("a.jpg\tx\nb.jpg\n", "some lines have a class and some do not"),
        ("a.jpg\tx\ty\n", "line 1: 3 tab-separated fields"),
        ("\n\n", "no paths in the list"),
    ]:
        listed.write_text(bad)
        with pytest.raises(DataFolderError, match=message.replace("(", r"\(").replace(")", r"\)")):
            index_from_list(tmp_path / "data", listed, tmp_path / "cache")


@pytest.mark.parametrize(
    "crafted, message",
    [
        (lambda f: (f / "meta.json").write_text("[1]"), "not a readable index of this version"),
        (lambda f: (f / "meta.json").write_text("[" * 100_000), "not a readable index of this version"),
        (lambda f: _edit_meta(f, count=10**12), "malformed meta.json"),
        (lambda f: _edit_meta(f, count=True), "malformed meta.json"),
        (lambda f: _edit_meta(f, classes=[1]), "malformed classes"),
        (lambda f: np.save(f / "offsets.npy", np.array([0, 5, 3, 9], dtype=np.int64)), "do not agree"),
        (lambda f: np.save(f / "labels.npy", np.array([0, 7, 0], dtype=np.int32)), "do not agree"),
        (lambda f: np.save(f / "offsets.npy", np.arange(4).astype(object), allow_pickle=True), "unreadable"),
        (lambda f: (f / "offsets.npy").write_bytes((f / "offsets.npy").read_bytes()[:-9]), "unreadable"),
        (lambda f: (f / "offsets.npy").write_bytes(b"\x93NUMPY garbage"), "unreadable"),
        (lambda f: (f / "names.bin").unlink(), "unreadable"),
        (lambda f: (f / "names.bin").write_bytes(b"/ab"), "leaves the tree"),
        (
            lambda f: (
                np.savez(f / "labels.npy", np.zeros(3, np.int32)) or os.replace(f / "labels.npy.npz", f / "labels.npy")
            ),
            "not one array",
        ),
        (lambda f: os.remove(f / "meta.json") or os.mkfifo(f / "meta.json"), "not a readable index"),
    ],
    ids=[
        "not an index",
        "JSON nested 1e5 deep",
        "a count of 1e12",
        "a count of True",
        "classes not names",
        "offsets backwards",
        "a label out of range",
        "a pickled array",
        "a truncated array",
        "a garbage header",
        "no names",
        "an absolute path",
        "a zip for an array",
        "a FIFO for meta.json",
    ],  # fmt: skip
)
def test_a_crafted_cache_is_refused_in_one_line(tmp_path, crafted, message):
    listed = tmp_path / "files.txt"
    listed.write_text("a\tx\nb\tx\nc\tx\n")
    folder = index_from_list(tmp_path, listed, tmp_path / "cache").folder
    crafted(folder)
    with pytest.raises(DataFolderError, match=message):
        index = FileIndex(folder)
        [index[i] for i in range(len(index))]


def test_a_split_or_a_worker_never_reads_other_files_than_the_run_opened(tmp_path):
    listed = tmp_path / "files.txt"
    listed.write_text("a\tx\nb\tx\nc\tx\n")
    index = index_from_list(tmp_path, listed, tmp_path / "cache")
    split = index.subset(np.array([0, 1]))
    np.save(split.folder / f"subset-{split.subset_name}.npy", np.array([2, 2], dtype=np.int64))  # swapped content
    with pytest.raises(DataFolderError, match="not what its name says"):
        pickle.loads(pickle.dumps(split))
    state = pickle.dumps(index)
    meta = (index.folder / "meta.json").read_text()
    for change in ({"root": "/etc"}, {"count": 2}, {"build": "another"}):  # the build changed under a running job
        _edit_meta(index.folder, **change)
        with pytest.raises(DataFolderError, match="not the index the run opened|do not agree"):
            pickle.loads(state)
        (index.folder / "meta.json").write_text(meta)


def _edit_meta(folder, **changes):
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **changes}))


BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
WORKER = r"""
import pickle, sys
sys.path.insert(0, sys.argv[1])
from file_index import worker_copies  # benchmarks/file_index.py: a forked process reads every entry
files = pickle.loads(bytes.fromhex(sys.argv[2])) if sys.argv[2] != "list" else [f"class{i % 1000}/{i:09d}.JPEG"
                                                                                   for i in range(int(sys.argv[3]))]
print(*worker_copies(files), flush=True)
"""


def test_a_worker_touching_every_entry_adds_no_memory_per_file(tmp_path):
    """Measured: a forked process (a data-loader worker) reads every path of a split. From the index, the memory it
    copies is the same for 100,000 and 300,000 files (the interpreter's own pages); from a Python list of the same
    paths (the old listing) it grows with the list."""
    n = 300_000
    (tmp_path / "data").mkdir()
    listed = tmp_path / "files.txt"
    listed.write_text("".join(f"class{i % 1000}/{i:09d}.JPEG\n" for i in range(n)))
    index = index_from_list(tmp_path / "data", listed, tmp_path / "cache")

    def start(*args):  # the three measurements run side by side: each in its own process, on its own pages
        command = [sys.executable, "-c", WORKER, BENCHMARKS, *args]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def copied(process):
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
        kib, total = map(int, stdout.split())
        return kib, total

    processes = [
        start(pickle.dumps(index.subset(np.arange(n // 3)[::-1])).hex()),
        start(pickle.dumps(index.subset(np.arange(n)[::-1])).hex()),  # a split, as training reads it
        start("list", str(n)),
    ]
    try:
        (small, _), (large, total), (from_list, list_total) = map(copied, processes)
    finally:
        for process in processes:  # a failure above leaves nothing running
            if process.poll() is None:
                process.kill()
                process.wait()
    assert total == list_total + n * (len(str(tmp_path / "data")) + 1)  # every path was read, root included
    assert abs(large - small) < 1024, (small, large)  # KiB: nothing per file
    assert from_list - large > 40 * n / 1024, (from_list, large)  # the list: over 40 bytes a file


def test_pretraining_reads_its_folder_or_a_list_through_the_index(tmp_path, digits32):
    """The data module's split holds the same files as a listing would, in index files (nothing per file in
    Python); `--data.index` reads only what the list names."""
    from simmim.pretrain.data import PretrainDataModule

    cache = str(tmp_path / "cache")
    dm = PretrainDataModule(digits32, img_size=32, mask_patch_size=8, val_fraction=0.1, index_cache=cache)
    dm.prepare_data()
    dm.setup("fit")
    assert isinstance(dm.train_files, FileIndex) and isinstance(dm.val_files, FileIndex)
    listed = list_images(digits32)  # the split before the index, for the same seed: the same files in order
    order = np.random.default_rng(0).permutation(len(listed))
    n_val = int(round(len(listed) * 0.1))
    assert list(dm.val_files) == [str(listed[i]) for i in sorted(order[:n_val])]
    assert list(dm.train_files) == [str(listed[i]) for i in sorted(order[n_val:])]
    listed = tmp_path / "some.txt"
    listed.write_text("0/0000.png\n7/0003.png\n")
    dm = PretrainDataModule(digits32, img_size=32, mask_patch_size=8, val_fraction=0.0, index=str(listed),
                            index_cache=cache)  # fmt: skip
    dm.setup("fit")
    assert list(dm.train_files) == [os.path.join(digits32, "0/0000.png"), os.path.join(digits32, "7/0003.png")]
    with pytest.raises(ConfigError, match="needs --data.root"):
        PretrainDataModule(None, index=str(listed))


def test_a_crafted_current_pointer_or_folder_list_means_a_new_walk_not_a_hang(tmp_path):
    root = tmp_path / "tree"
    image_folder(root / "a", ["1.png"], 8)
    first = folder_index(root, tmp_path / "cache")
    key = first.folder.parent
    for crafted in (lambda p: p.write_bytes(b"\\xff\\xff"), lambda p: os.remove(p) or os.mkfifo(p),
                    lambda p: p.write_text("../../etc")):  # fmt: skip
        crafted(key / "current")
        again = folder_index(root, tmp_path / "cache")  # walked and written anew
        assert again.folder != first.folder and list(again) == list(first)
        first = again
    os.remove(first.folder / "folders.json")
    os.mkfifo(first.folder / "folders.json")
    assert folder_index(root, tmp_path / "cache").folder != first.folder


def test_what_the_walk_passed_over_is_looked_for_again_at_the_next_start(tmp_path, monkeypatch):
    """A folder that could not be listed (permissions, a flaky network filesystem) keeps its parent's recorded
    time when it becomes readable: an index that passed something over is never reused."""
    import simmim.data.index as index_module

    monkeypatch.setattr(index_module, "RACY_NS", 0)
    root = tmp_path / "tree"
    image_folder(root / "a", ["1.png"], 8)
    image_folder(root / "b", ["2.png"], 8)
    real_scandir = os.scandir

    def refuse_b(path):
        if str(path).endswith("/b"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(index_module.os, "scandir", refuse_b)
    with pytest.warns(UserWarning, match="skipping the folder .*/b: Permission denied"):
        assert [os.path.basename(p) for p in folder_index(root, tmp_path / "cache")] == ["1.png"]
    monkeypatch.setattr(index_module.os, "scandir", real_scandir)
    assert [os.path.basename(p) for p in folder_index(root, tmp_path / "cache")] == ["1.png", "2.png"]


def test_a_list_is_recognised_by_its_content_and_setup_keeps_the_build_prepare_data_made(tmp_path, digits32):
    from simmim.pretrain.data import PretrainDataModule

    (tmp_path / "data").mkdir()
    listed = tmp_path / "files.txt"
    listed.write_text("a/1.png\n")
    stamp = listed.stat()
    assert list(index_from_list(tmp_path / "data", listed, tmp_path / "cache"))[0].endswith("a/1.png")
    listed.write_text("b/1.png\n")  # the same size, and the same time put back
    os.utime(listed, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert list(index_from_list(tmp_path / "data", listed, tmp_path / "cache"))[0].endswith("b/1.png")
    root = tmp_path / "tree"
    shutil.copytree(digits32, root)
    dm = PretrainDataModule(str(root), img_size=32, mask_patch_size=8, index_cache=str(tmp_path / "cache"))
    dm.prepare_data()
    built = dm.file_index().folder
    shutil.copy(root / "0" / "0000.png", root / "0" / "extra.png")  # the tree changes between prepare and setup
    dm.setup("fit")
    assert dm.train_files.folder == built  # the build prepare_data made, on every rank


def test_same_length_names_give_different_fingerprints(tmp_path):
    (tmp_path / "data").mkdir()
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text("c/0001.png\n")
    two.write_text("c/0002.png\n")
    a = index_from_list(tmp_path / "data", one, tmp_path / "cache")
    b = index_from_list(tmp_path / "data", two, tmp_path / "cache")
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == index_from_list(tmp_path / "data", one, tmp_path / "cache", reindex=True).fingerprint()


def test_only_regular_files_are_decoded(tmp_path):
    from simmim.data.images import UnreadableImageError, decode_image

    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(UnreadableImageError, match="not a regular file"):
        decode_image(tmp_path / "pipe.png")  # it would block for ever reading a FIFO


def _listed_split(root, val_fraction, label_fraction):
    """Fine-tuning's split as it was made before the index: each class folder listed, then the same draws."""
    from simmim.data.folders import stratified_pick

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.is_symlink())
    files, labels = [], []
    for c, name in enumerate(classes):
        found = [str(f) for f in list_images(root / name)]
        files, labels = files + found, labels + [c] * len(found)
    is_val = stratified_pick(labels, len(classes), val_fraction, seed=0, at_least_one=False)
    train = [(f, lab) for f, lab, v in zip(files, labels, is_val) if not v]
    val = [(f, lab) for f, lab, v in zip(files, labels, is_val) if v]
    keep = stratified_pick([lab for _, lab in train], len(classes), label_fraction, seed=1, at_least_one=True)
    return [t for t, k in zip(train, keep) if k], val


def test_fine_tuning_splits_its_folder_through_the_index_as_the_listing_did(tmp_path, digits32, monkeypatch):
    """The same files, labels and split as listing each class folder gave; `prepare_data` walks once, `setup` and
    a second run's start not at all; what a worker is sent stays small whatever the folder's size."""
    from simmim.data.index import Labels
    from simmim.finetune.data import ClassificationDataModule

    walks = counted_walks(monkeypatch)  # the digits may have been written just now
    options = dict(img_size=32, val_fraction=0.2, label_fraction=0.3, index_cache=str(tmp_path / "cache"))
    dm = ClassificationDataModule(digits32, **options)
    dm.prepare_data()
    assert len(walks) == 1
    dm.setup("fit")
    train, val = _listed_split(Path(digits32), 0.2, 0.3)
    assert list(zip(dm.train_files, dm.train_labels)) == train and list(zip(dm.val_files, dm.val_labels)) == val
    assert isinstance(dm.train_files, FileIndex) and isinstance(dm.train_labels, Labels)
    assert dm.classes == [str(d) for d in range(10)]
    for sent in (dm.train_files, dm.train_labels, dm.val_labels):
        assert len(pickle.dumps(sent)) < 1000  # the build's folder and a digest, not the files
    again = ClassificationDataModule(digits32, **options)
    again.prepare_data(), again.setup("fit")
    assert len(walks) == 1 and list(again.train_files) == list(dm.train_files)


def test_train_and_val_folders_through_the_index_leave_out_loose_files_and_linked_classes(tmp_path):
    """`root/train` and `root/val` each have an index; a file outside the class folders has no class and is left
    out; a class folder behind a link is passed over with a warning, by the start-up check and the index alike."""
    from simmim.finetune.data import ClassificationDataModule

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            image_folder(tmp_path / "data" / split / c, [f"{i}.png" for i in range(3)], 8)
    shutil.copy(tmp_path / "data" / "train" / "cat" / "0.png", tmp_path / "data" / "train" / "loose.png")
    image_folder(tmp_path / "elsewhere" / "emu", ["0.png"], 8)
    (tmp_path / "data" / "train" / "emu").symlink_to(tmp_path / "elsewhere" / "emu")
    (tmp_path / "data" / "val" / "emu").symlink_to(tmp_path / "elsewhere" / "emu")
    with pytest.warns(UserWarning, match=r"skipping the class folder .*emu: a symbolic link"):
        dm = ClassificationDataModule(str(tmp_path / "data"), img_size=8, index_cache=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.classes == ["cat", "dog"] and len(dm.train_files) == len(dm.val_files) == 6
    assert list(dm.train_labels) == [0, 0, 0, 1, 1, 1] and not any("loose" in f for f in dm.train_files)
    with pytest.warns(UserWarning, match=r"skipping the class folder .*emu: a symbolic link"):
        assert labelled_split(str(tmp_path / "data"), 0.2).classes == ["cat", "dog"]  # the tools' path too
    (tmp_path / "data" / "train" / "empty").mkdir()  # a class folder without images, as a listing refused it
    (tmp_path / "data" / "val" / "empty").mkdir()
    with pytest.raises(DataFolderError, match=r"no images in the class folder\(s\) 'empty' under"):
        labelled_split(str(tmp_path / "data"), 0.2, index_of=lambda f: folder_index(f, tmp_path / "cache"))


def test_fine_tuning_ranks_that_index_different_files_all_stop(tmp_path, digits32):
    """The data module's `setup` opens its folders through `agreed_index`: a rank whose index differs stops."""
    from simmim.finetune.data import ClassificationDataModule

    dm = ClassificationDataModule(digits32, img_size=32, index_cache=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.trainer = _Ranks(1, (3, 0, "another rank's files"))
    with pytest.raises(DataFolderError, match="the ranks indexed different files under"):
        dm.setup("fit")


class _Ranks:
    """What `agreed_index` needs of a trainer, for one rank of two: rank 0's fingerprint as broadcast, and the
    other rank's vote."""

    def __init__(self, rank, theirs, their_vote=True):
        self.world_size, self.global_rank, self.strategy, self.calls = 2, rank, self, []
        self.theirs, self.their_vote = theirs, their_vote

    def broadcast(self, mine, src=0):
        self.calls.append("broadcast")
        return mine if self.global_rank == 0 else self.theirs

    def reduce_boolean_decision(self, decision, all=True):
        self.calls.append("reduce")
        return decision and self.their_vote


def test_ranks_that_index_different_files_or_cannot_open_theirs_all_stop(tmp_path):
    from simmim.data.index import agreed_index

    root = image_folder(tmp_path / "imgs", ["0.png", "1.png"], 8)
    index = folder_index(root, tmp_path / "cache")
    assert agreed_index(_Ranks(1, index.fingerprint()), lambda: index, root) is index
    with pytest.raises(DataFolderError, match="the ranks indexed different files under"):
        agreed_index(_Ranks(1, (3, 0, "other")), lambda: index, root)  # this rank found other files
    with pytest.raises(DataFolderError, match="the ranks indexed different files under"):
        agreed_index(_Ranks(0, None, their_vote=False), lambda: index, root)  # the other rank did

    def unreadable():
        raise DataFolderError("file index X: unreadable")

    ranks = _Ranks(1, index.fingerprint())
    with pytest.raises(DataFolderError, match="unreadable"):
        agreed_index(ranks, unreadable, root)
    assert ranks.calls == ["broadcast", "reduce"]  # it took part before stopping: no rank waits for it


def test_fine_tuning_reads_a_labelled_list_without_walking_and_refuses_one_without_classes(
    tmp_path, digits32, pretraining_run, monkeypatch
):
    """`--data.index FILE` in fine-tuning: the classes are those the list names (sorted), its files split by
    `--data.val_fraction` with the same draws as class folders; the tree is never walked; the command line reads
    the number of classes from the list; a list without classes is refused in one line."""
    import simmim.data.index as index_module
    from simmim.finetune import main
    from simmim.finetune.data import ClassificationDataModule

    monkeypatch.setattr(index_module, "walk", lambda *args: pytest.fail("walked the tree"))
    first = {d: [f"{d}/{name}" for name in sorted(os.listdir(os.path.join(digits32, str(d))))[:10]] for d in (1, 2, 3)}
    names = {"odd": first[1] + first[3], "even": first[2]}
    listed = tmp_path / "labelled.txt"
    listed.write_text("".join(f"{p}\t{c}\n" for c, paths in names.items() for p in paths))
    cache = str(tmp_path / "cache")
    dm = ClassificationDataModule(digits32, img_size=32, val_fraction=0.2, index=str(listed), index_cache=cache)
    dm.prepare_data(), dm.setup("fit")
    assert dm.classes == ["even", "odd"] and len(dm.train_files) + len(dm.val_files) == 30
    assert [list(dm.val_labels).count(c) for c in (0, 1)] == [2, 4]  # a stratified fifth of each class
    expected = {os.path.join(digits32, p): c for c, paths in enumerate(names.values()) for p in paths}
    assert all(expected[f] == ["odd", "even"].index(dm.classes[y]) for f, y in zip(dm.train_files, dm.train_labels))
    args = ["--data.root", digits32, "--data.index", str(listed), "--data.index_cache", cache, "--data.img_size", "32"]
    args += ["--model.pretrained", str(pretraining_run.export), "--model.window_size", "4", "--trainer.logger", "false"]
    args += ["--model.encoder_kwargs", "{embed_dim: 24, depths: [2, 2], num_heads: [2, 4]}", "--data.num_workers", "0"]
    cli = main(["validate", *args, "--trainer.default_root_dir", str(tmp_path / "run"), "--data.val_fraction", "0.2"])
    assert cli.model.hparams.num_classes == 2 and len(cli.datamodule.val_files) == 6
    plain = tmp_path / "plain.txt"
    plain.write_text("1/0000.png\n")
    with pytest.raises(DataFolderError, match=r"--data.index .*plain.txt: the list names no classes"):
        ClassificationDataModule(digits32, index=str(plain), index_cache=cache)
    with pytest.raises(SystemExit, match=r"^error: --data.index .*plain.txt: the list names no classes"):
        main(["validate", *args[2:], "--data.root", digits32, "--data.index", str(plain)])  # the command line too
    with pytest.raises(SystemExit, match=r"^error: --data.index .*labelled.txt needs --data.root, the folder"):
        main(["validate", *args[2:]])  # no --data.root: the default config's is null
    (tmp_path / "tab.txt").write_text("1/0000.png\todd\n2/0000.png\t\n")
    with pytest.raises(DataFolderError, match=r"tab.txt, line 2: a tab with no class after it"):
        ClassificationDataModule(digits32, index=str(tmp_path / "tab.txt"), index_cache=cache)
