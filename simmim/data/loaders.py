"""The data loaders of both stages: the normalisation constants, the collate that tolerates unreadable files, the
loader settings, workers that start safely (the start method under a process group, OpenCV on one thread in every
worker without touching a thread pool that a fork copied), and the resumable training loader."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import cv2
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from simmim.checkpointing.untrusted import MalformedRecordError, checked_counts
from simmim.seeding import SeededSampler, make_train_sampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def collate_readable(batch: List, num_fields: int) -> Tuple:
    """Stack the decoded samples field by field (tensors stacked, numbers made one tensor). Every sample ends with
    the indices of the unreadable files it passed over; a sample whose own file was unreadable is `(None, (i,))` and
    is dropped. The batch's last element is all those indices (a tuple of ints). A batch with nothing readable gives
    `num_fields` empty tensors."""
    good = [b for b in batch if b[0] is not None]
    unreadable = tuple(j for b in batch for j in b[-1])
    if not good:
        return (*(torch.empty(0) for _ in range(num_fields)), unreadable)
    fields = zip(*(g[:-1] for g in good))
    return (*(torch.stack(f) if isinstance(f[0], torch.Tensor) else torch.tensor(f) for f in fields), unreadable)


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int, train: bool, collate_fn, trainer=None
) -> DataLoader:
    """Training: a `ResumableLoader` over a `SeededSampler` for `trainer`'s rank (the seeded, resumable order of
    `dataset.files`, a folder's or a shard set's; a last partial batch is dropped). Otherwise a plain in-order
    loader (Lightning shares it out under DDP). Batches are pinned when `trainer` trains on a GPU, so that
    Lightning's copies to it do not block."""
    kwargs = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        multiprocessing_context=worker_context(num_workers),
        pin_memory=trainer is not None and trainer.strategy.root_device.type == "cuda",
    )
    if not train:
        return WorkerLoader(dataset, shuffle=False, **kwargs)
    sampler = make_train_sampler(getattr(dataset, "files", dataset), trainer)
    return ResumableLoader(dataset, sampler, trainer, drop_last=len(sampler) >= batch_size, **kwargs)


def skip_empty_validation(datamodule, message: str) -> None:
    """In a data module's `setup`: with no validation files, say `message` once and turn the trainer's validation
    loop off (rather than run it over an empty loader, with Lightning's notices about its zero length)."""
    trainer = getattr(datamodule, "trainer", None)
    if not datamodule.val_files and trainer is not None and trainer.limit_val_batches != 0:
        rank_zero_info(message)
        trainer.limit_val_batches = 0


def _files_fingerprint(dataset) -> Optional[str]:
    """What identifies the files a dataset reads (its `files`' fingerprint: a folder's index, a shard set), as a
    short string for the loader's state; None for a dataset without one."""
    fingerprint = getattr(getattr(dataset, "files", None), "fingerprint", None)
    return None if fingerprint is None else "-".join(str(x) for x in fingerprint())


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
    forkserver workers start afresh, with no pool yet, and set it here.

    A worker whose parent is not the process that made the loader (a forkserver's child, under DDP) also watches
    that process and exits when it is gone: PyTorch's own check watches the parent, and a forkserver outlives a rank
    killed with SIGKILL, which left its workers running, holding their memory, after the run had died."""

    def __init__(self, then: Optional[Callable[[int], None]] = None) -> None:
        while isinstance(then, _WorkerStart):  # Lightning rebuilds loaders from their attributes
            then = then.then
        self.then, self.owner = then, os.getpid()

    def __call__(self, worker_id: int) -> None:
        if cv2.getNumThreads() != 1:
            cv2.setNumThreads(1)
        if os.getppid() != self.owner:
            threading.Thread(target=_exit_without, args=(self.owner,), daemon=True, name="owner-watch").start()
        if self.then is not None:
            self.then(worker_id)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (not ended, not a zombie waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or another user's process under a reused number
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc: the signal test alone
        return True


def _exit_without(owner: int, every_s: float = 1.0) -> None:
    """In a data-loader worker: end the process once `owner` (the process that made the loader) has ended."""
    while _alive(owner):
        time.sleep(every_s)
    os._exit(1)


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
        """PyTorch's private hook where `__iter__` (and a persistent loader's first `iter()`) starts the workers:
        the only place to hold OpenCV on one thread for exactly the forks and no longer. `tests/simmim/test_workers.py`
        fails if the pinned PyTorch stops starting workers through it."""
        if not _forks(self):
            return super()._get_iterator()
        with opencv_single_threaded():
            return super()._get_iterator()


class TimedIterator:
    """Wraps a data loader's iterator and adds the time each `next()` takes (waiting for a worker's batch, or
    loading and collating it without workers) to `owner.data_wait_s`. Everything else is the wrapped iterator's."""

    def __init__(self, iterator: Iterator, owner: Any) -> None:
        self._iterator, self._owner = iterator, owner

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._iterator)
        finally:
            self._owner.data_wait_s += time.perf_counter() - start

    def __len__(self) -> int:
        return len(self._iterator)

    def __getattr__(self, name: str):
        if name in ("_iterator", "_owner"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._iterator, name)

    def __getstate__(self) -> dict:
        """Pickled (a copy of Lightning's loop) without the loader's iterator, which cannot be pickled: as Lightning
        itself drops such iterators."""
        return {"_iterator": None, "_owner": None}


class ResumableLoader(WorkerLoader):
    """A training `DataLoader` over a `SeededSampler` whose state Lightning saves in every checkpoint and restores
    when it resumes mid-epoch (it has `state_dict`/`load_state_dict`), so the run continues with the next sample of
    the interrupted epoch, in the same order and with the same draws.

    The state is taken from Lightning's count of trained batches in the epoch (`batch_progress.current.processed`),
    not from what the loader has produced: its workers and Lightning's fetcher run ahead of training. Every
    iteration outside such a resume starts at the epoch Lightning is in (its `set_epoch` call comes after the
    first `iter()` of a run, too late for workers that prefetch at once).

    It also counts the time its `next()` blocks (`data_wait_s`), which `simmim.data.watch.DataWaitTimer` logs.

    Args:
        dataset: A dataset whose `__getitem__` takes `SampleKey`s.
        sampler: The training order.
        trainer: The trainer the checkpoints are written by (None outside a Lightning run: the state is the
            epoch's start).
        **kwargs: `DataLoader` arguments.
    """

    def __init__(self, dataset, sampler: SeededSampler, trainer=None, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._trainer = weakref.ref(trainer) if trainer is not None else (lambda: None)
        self._resume: Optional[Tuple[int, int]] = None  # (epoch, start) loaded from a checkpoint, not yet iterated
        self.data_wait_s = 0.0  # time spent in `next()` since `DataWaitTimer` last read it

    def _fitting_trainer(self):
        trainer = self._trainer()
        return trainer if trainer is not None and trainer.state.fn == TrainerFn.FITTING else None

    def __iter__(self):
        trainer, sampler = self._fitting_trainer(), self.sampler
        if isinstance(sampler, SeededSampler):
            if self._resume is not None:
                sampler.pin(*self._resume)
            elif trainer is not None:
                sampler.pin(trainer.fit_loop.epoch_progress.current.processed)
        self._resume = None
        return TimedIterator(super().__iter__(), self)

    def state_dict(self) -> Dict[str, int]:
        sampler, trainer = self.sampler, self._fitting_trainer()
        if not isinstance(sampler, SeededSampler):  # Lightning swapped it (overfit_batches): nothing to resume
            return {}
        epoch, batches = sampler.epoch, 0
        if trainer is not None:
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if batches >= trainer.num_training_batches:  # the epoch is over: the next one starts afresh
                epoch, batches = epoch + 1, 0
        state = {
            "epoch": epoch,
            "position": batches * self.batch_size * sampler.num_replicas,
            "size": sampler.size,
            "world_size": sampler.num_replicas,
        }
        files = _files_fingerprint(self.dataset)
        return state if files is None else {**state, "files": files}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        sampler = self.sampler
        if not state or not isinstance(sampler, SeededSampler):
            return
        loaded, state = state, checked_counts(state, ("epoch", "position", "size", "world_size"), "the training loader")
        files = loaded.get("files")
        if files is not None and (not isinstance(files, str) or len(files) > 200):
            raise MalformedRecordError(f"the training loader: the checkpoint's files={str(files)[:40]!r} is malformed")
        if state["size"] != sampler.size:
            rank_zero_warn(
                f"the training set had {state['size']} files when the checkpoint was written and has {sampler.size} "
                "now: the resumed epoch's order is not the interrupted one's"
            )
        elif files is not None and files != _files_fingerprint(self.dataset):
            rank_zero_warn(
                f"the training set has as many files as when the checkpoint was written ({sampler.size}) but not the "
                "same ones (or not in the same order): the resumed epoch's order is not the interrupted one's"
            )
        if state["world_size"] != sampler.num_replicas:
            rank_zero_warn(
                f"resumed on {sampler.num_replicas} processes, the checkpoint was written on {state['world_size']}: "
                "the rest of the interrupted epoch is shared out anew from where training stopped, but Lightning "
                "counts that epoch's remaining batches per process, so some of its samples may be skipped or read "
                "twice (from shards, whose ranks read contiguous blocks, up to about half of that rest); later "
                "epochs are exact"
            )
        sampler.set_epoch(state["epoch"])
        self._resume = (state["epoch"], min(state["position"], sampler.size))
