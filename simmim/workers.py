"""Data-loader worker processes that start safely: the start method under a process group, and OpenCV on one
thread in every worker without touching a thread pool that a fork copied."""

from __future__ import annotations

import multiprocessing
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import cv2
import torch
from torch.utils.data import DataLoader


def worker_context(num_workers: int) -> Optional[str]:
    """The start method of data-loader workers: `forkserver` once a process group is up. Forking a process whose
    gloo or NCCL threads are running can leave the child blocked on a lock one of them held (a DDP run hung in
    `os.fork()` that way); a forkserver starts workers from a clean single-threaded process. None: the default."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return "forkserver" if num_workers > 0 and distributed else None


class _WorkerStart:
    """A `WorkerLoader` worker's `worker_init_fn`: OpenCV on one thread, as PyTorch does for torch itself (N workers
    each starting a thread per core would oversubscribe the CPU), then the user's own function. A forked worker
    already has one thread (`WorkerLoader` saw to it) and is left alone: reconfiguring the thread pool a fork copied
    can block forever, its condition variables still counting the parent's threads as waiters. Spawned and
    forkserver workers start afresh, with no pool yet, and set it here."""

    def __init__(self, then: Optional[Callable[[int], None]] = None) -> None:
        while isinstance(then, _WorkerStart):  # Lightning rebuilds loaders from their attributes
            then = then.then
        self.then = then

    def __call__(self, worker_id: int) -> None:
        if cv2.getNumThreads() != 1:
            cv2.setNumThreads(1)
        if self.then is not None:
            self.then(worker_id)


def _forks(loader: DataLoader) -> bool:
    context = loader.multiprocessing_context
    if context is not None:
        method = context.get_start_method()
    else:  # without fixing the process's start method, as get_start_method() would
        method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return loader.num_workers > 0 and method == "fork"


_ONE_THREAD = threading.Lock()


@contextmanager
def opencv_single_threaded() -> Iterator[None]:
    """OpenCV on one thread in this process for the duration (its pool stopped), then as it was. One thread of the
    process at a time: two overlapping switches could otherwise leave it on one thread."""
    with _ONE_THREAD:
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            yield
        finally:
            cv2.setNumThreads(threads)


class WorkerLoader(DataLoader):
    """A `DataLoader` whose forked workers inherit OpenCV on one thread: while it starts workers by fork, this
    process runs OpenCV on one thread (no pool threads for the fork to copy), and goes back to its own count once
    they are running. Without it a worker that set its thread count could hang at its first batch, at random (seen
    in about one fork in thirty after the parent had resized images on two threads). Its workers run OpenCV on one
    thread, then `worker_init_fn` if given."""

    def __init__(self, *args, worker_init_fn: Optional[Callable[[int], None]] = None, **kwargs) -> None:
        super().__init__(*args, worker_init_fn=_WorkerStart(worker_init_fn), **kwargs)

    def _get_iterator(self):
        if not _forks(self):
            return super()._get_iterator()
        with opencv_single_threaded():
            return super()._get_iterator()
