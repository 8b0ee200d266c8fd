"""Forked data-loader workers start whatever OpenCV's thread pool was doing in the training process."""

import cv2
import numpy as np
import pytest
import torch

from simmim.workers import WorkerLoader, single_threaded_worker

_BIG = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)


class _Resizes(torch.utils.data.Dataset):
    """Each sample: OpenCV's thread count in the worker, after a resize there."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        cv2.resize(_BIG[:64, :64], (32, 32))
        return cv2.getNumThreads()


def _start_workers_after_parallel_resizes(loader_class, rounds: int) -> list:
    threads = []
    for _ in range(rounds):
        for _ in range(3):  # the parent's pool busy on two threads right before the fork
            cv2.resize(_BIG, (900, 900))
        loader = loader_class(
            _Resizes(), batch_size=4, num_workers=4, worker_init_fn=single_threaded_worker, timeout=20
        )
        threads += next(iter(loader)).tolist()  # a worker blocked in its init fn raises after `timeout`
    return threads


def test_forked_workers_run_opencv_on_one_thread_and_never_hang():
    """Reconfiguring a thread pool that a fork copied can block forever (pthread_cond_destroy waiting for the
    parent's threads): a plain DataLoader whose forked workers call cv2.setNumThreads(1) hung in about one fork
    in thirty here. 48 forks right after two-thread resizes would meet that about four times in five."""
    if cv2.getNumThreads() < 2:
        pytest.skip("OpenCV runs on one thread in this process already")
    before = cv2.getNumThreads()
    assert _start_workers_after_parallel_resizes(WorkerLoader, rounds=12) == [1] * 48
    assert cv2.getNumThreads() == before  # the training process keeps its own count
