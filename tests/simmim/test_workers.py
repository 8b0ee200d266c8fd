"""Forked data-loader workers start whatever OpenCV's thread pool was doing in the training process."""

import cv2
import numpy as np
import pytest
import torch

from simmim.data.loaders import WorkerLoader, opencv_single_threaded

_BIG = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)


class _Resizes(torch.utils.data.Dataset):
    """Each sample: OpenCV's thread count in the worker, after a resize there."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        cv2.resize(_BIG[:64, :64], (32, 32))
        return cv2.getNumThreads()


def _one_thread(worker_id):  # what a plain DataLoader's workers would do to run OpenCV on one thread
    cv2.setNumThreads(1)


def _start_workers_after_parallel_resizes(loader_class, rounds: int) -> list:
    threads = []
    for _ in range(rounds):
        for _ in range(3):  # the parent's pool busy on two threads right before the fork
            cv2.resize(_BIG, (900, 900))
        loader = loader_class(_Resizes(), batch_size=4, num_workers=4, worker_init_fn=_one_thread, timeout=20)
        threads += next(iter(loader)).tolist()  # a worker blocked in its init fn raises after `timeout`
    return threads


def test_forked_workers_run_opencv_on_one_thread_and_never_hang():
    """Reconfiguring a thread pool that a fork copied can block forever (pthread_cond_destroy waiting for the
    parent's threads): a plain DataLoader whose forked workers call cv2.setNumThreads(1) hung in about one fork
    in thirty here. With a plain DataLoader and that init function, these 48 forks right after two-thread resizes
    timed out in three runs out of three."""
    if cv2.getNumThreads() < 2:
        pytest.skip("OpenCV runs on one thread in this process already")
    before = cv2.getNumThreads()
    assert _start_workers_after_parallel_resizes(WorkerLoader, rounds=12) == [1] * 48
    assert cv2.getNumThreads() == before  # the training process keeps its own count


def _record(worker_id):
    torch.utils.data.get_worker_info().dataset.extra = 7


class _Extra(_Resizes):
    extra = 0

    def __getitem__(self, i):
        return super().__getitem__(i) * 10 + self.extra


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_workers_start_on_one_opencv_thread_and_run_the_users_init(method):
    """Spawned workers start with OpenCV's default thread count and must set one themselves; forked ones inherit
    it. Either way the user's own worker_init_fn runs after."""
    if cv2.getNumThreads() < 2:
        pytest.skip("OpenCV runs on one thread in this process already")
    loader = WorkerLoader(
        _Extra(), batch_size=2, num_workers=2, worker_init_fn=_record, multiprocessing_context=method, timeout=60
    )
    assert sorted(int(t) for batch in loader for t in batch) == [17] * 4


def test_the_training_process_gets_its_thread_count_back_after_an_error():
    before = cv2.getNumThreads()
    with pytest.raises(RuntimeError):
        with opencv_single_threaded():
            assert cv2.getNumThreads() == 1
            raise RuntimeError("worker start failed")
    assert cv2.getNumThreads() == before


def test_lightning_rebuilding_the_loader_keeps_one_wrapper():
    """Lightning rebuilds a loader from its attributes (to add a DistributedSampler): the user's function stays
    wrapped once."""
    loader = WorkerLoader(_Extra(), batch_size=2, num_workers=1, worker_init_fn=_record)
    rebuilt = WorkerLoader(_Extra(), batch_size=2, num_workers=1, worker_init_fn=loader.worker_init_fn)
    assert rebuilt.worker_init_fn.then is _record


def test_pytorch_still_starts_workers_through_the_hook_the_loader_overrides():
    """`WorkerLoader._get_iterator` overrides a private `DataLoader` method; if the pinned PyTorch started workers
    elsewhere, forks would copy OpenCV's thread pool again (and hang at random) without the other tests noticing."""
    import inspect

    from torch.utils.data import DataLoader

    assert inspect.getsource(DataLoader.__iter__).count("self._get_iterator()") == 2
    assert WorkerLoader._get_iterator is not DataLoader._get_iterator


PIDS_DATASET = """
import os
import torch

class Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return os.getpid()
"""

OWNER = """
import sys, time
from pids_dataset import Pids
from simmim.data.loaders import WorkerLoader

loader = WorkerLoader(
    Pids(), batch_size=1, num_workers=2, persistent_workers=True, multiprocessing_context="forkserver"
)
pids = {int(b) for b, _ in zip(loader, range(20))}
print(" ".join(map(str, sorted(pids))), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_forkserver_workers_end_when_the_process_that_made_the_loader_is_killed(tmp_path):
    """A rank under DDP starts its workers from a forkserver, which outlives the rank: killed with SIGKILL, its
    workers must still end (they watch it), not run on holding their memory."""
    import os
    import subprocess
    import sys
    import time

    from simmim.data.loaders import _alive

    (tmp_path / "pids_dataset.py").write_text(PIDS_DATASET)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        workers = [int(p) for p in owner.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)
