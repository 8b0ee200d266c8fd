"""Where every random draw of a run comes from, and the position a resumed run continues from.

A run has one seed (`--seed_everything`; Lightning keeps it in `PL_GLOBAL_SEED`, which its DDP processes inherit).
Every draw is seeded from it here and nowhere else:

- **Per sample** (augmentation, SimMIM mask): `SeededSampler` yields `(index, sample_seed)` keys, the seed derived
  from (run seed, epoch, the sample's position in that epoch's global order). Data-loader workers and DDP ranks
  read different positions, so they draw differently; a sample's draw does not depend on which worker or rank
  reads it, so 0 or 8 workers, 1 or 16 ranks, and an interrupted run's resume all see the same crops and masks
  (a resume on another number of ranks shares out the rest of its interrupted epoch anew, see
  `simmim.data.loaders.ResumableLoader`).
  `sample_generators` turns the seed into the generators the transforms and the mask use; `seeded_globals` seeds
  the global generators for transforms that draw from them (timm's and torchvision's) and gives them back after.
- **Per training batch** (drop-path, dropout, mixup/cutmix): `seed_step` reseeds torch (every device), NumPy's and
  Python's global generators from (run seed, rank, epoch, batch index) before each batch, so ranks differ and a
  resumed run repeats the interrupted run's draws.
- **Shuffling**: the epoch's order is a permutation drawn from (run seed, epoch); a shard set's (`ShardSampler`)
  is its chunks in an order drawn from (run seed, epoch), shuffled window by window from (run seed, epoch, window).
- **The quick fine-tune monitor** (`simmim.monitors`): its head and batch order from (run seed) alone, the
  same at every epoch and on every rank, so two checkpoints are compared under the same draws.

`simmim.data.loaders.ResumableLoader` makes the training loader stateful for Lightning: its state is the epoch and
the global position it had reached, read from Lightning's own count of trained batches when a checkpoint is written;
`SeedState` keeps the run seed in the data module's part of the checkpoint.
"""

from __future__ import annotations

import math
import os
import random
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DistributedSampler

from simmim.checkpointing.untrusted import checked_counts

SEED_ENV = "PL_GLOBAL_SEED"
# Stream tags: each purpose draws from its own sequence.
_SHUFFLE, _SAMPLE, _STEP, _EVAL, _MONITOR = 0, 1, 2, 3, 4

SampleKey = Union[int, Tuple[int, int]]


def run_seed() -> int:
    """The run's seed: `--seed_everything` (Lightning's `PL_GLOBAL_SEED`), 0 when none was set."""
    return int(os.environ.get(SEED_ENV, 0))


def derive_seed(*key: int) -> int:
    """A 63-bit seed from non-negative integers, through NumPy's SeedSequence (well mixed: neighbouring keys give
    unrelated streams)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def sample_seed(key: SampleKey) -> Tuple[int, int]:
    """`(index, seed)` of a dataset key: a `SeededSampler` key as it is, a plain index (evaluation loaders) with a
    seed of its own that is the same in every epoch and run (fixed validation masks)."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), derive_seed(_EVAL, int(key))


def monitor_generator() -> torch.Generator:
    """The quick fine-tune monitor's generator: from the run seed only (the same draws at every check)."""
    return torch.Generator().manual_seed(derive_seed(_MONITOR, run_seed()))


def sample_generators(seed: int) -> Tuple[np.random.Generator, random.Random, np.random.Generator]:
    """Independent generators for one sample: NumPy and Python generators for the albumentations pipeline
    (`Compose.set_random_state`), and a NumPy generator for the mask."""
    augment, mask = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(augment), random.Random(seed), np.random.default_rng(mask)


@contextmanager
def seeded_globals(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU global generators seeded for one sample, for transforms that draw from them
    (timm's and torchvision's), and back to their states after: in the training process itself (no workers) the
    run's own draws (dropout, drop-path, mixup) must not change with the data."""
    states = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.default_generator.set_state(states[2])


def seed_step(rank: int, epoch: int, batch_idx: int) -> None:
    """Seed torch (CPU and every GPU), NumPy's and Python's global generators for one training batch."""
    seed = derive_seed(run_seed(), _STEP, rank, epoch, batch_idx)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class SeededSampler(DistributedSampler):
    """The training order: a permutation per epoch, shared out across ranks, each index paired with its sample
    seed. A subclass of `DistributedSampler` so that Lightning uses it under DDP as it is.

    Rank r reads the epoch's global positions s + r, s + r + R, ... (R ranks); the positions past the
    dataset's end wrap around, so every rank reads the same number of samples (as `DistributedSampler` pads).
    The start s is 0 except in the epoch a resumed run continues (`pin`).

    Args:
        size: Number of samples in the dataset.
        seed: The run seed.
        shuffle: A new permutation each epoch (else the dataset's order).
        num_replicas, rank: DDP world size and this process's rank.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._pinned: Optional[Tuple[int, int]] = None
        self.drop_last = False
        self.num_samples = math.ceil(size / num_replicas)  # per rank, in a whole epoch
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's global order of dataset indices."""
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng(derive_seed(self.seed, _SHUFFLE, epoch)).permutation(self.size)

    def pin(self, epoch: int, start: int = 0) -> None:
        """Fix the epoch and start of the next iteration, whatever `set_epoch` says meanwhile: with data-loader
        workers the order is drawn when the loader is iterated, without them at the first batch, and Lightning
        calls `set_epoch` in between."""
        self._pinned = (epoch, start)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch, start = self._pinned or (self.epoch, 0)
        self._pinned = None  # a pin (and a resume's start) applies to one iteration
        order = self.order(epoch)
        end = start + math.ceil((self.size - start) / self.num_replicas) * self.num_replicas
        for p in range(start + self.rank, end, self.num_replicas):
            yield int(order[p % self.size]), derive_seed(self.seed, _SAMPLE, epoch, p)

    def __len__(self) -> int:
        return self.num_samples


class ShardSampler(SeededSampler):
    """The training order of a shard set (`simmim.data.shards.ShardSet`): each epoch its chunks in a new random
    order, the samples shuffled within windows of `window` consecutive chunks of that order (the shuffle holds one
    window's indices, whatever the set's size), and the epoch's order cut into one contiguous block per rank, so
    that a rank reads its own chunks. The last `size % num_replicas` positions of the order are left out: no sample
    is read twice in an epoch (different ones each epoch). Keys and their seeds follow `SeededSampler`'s rule:
    `(index, seed(run seed, epoch, position in the epoch's order))`, so workers, ranks and a resume draw as in a
    folder; `pin(epoch, start)` takes the same global start (samples read on all ranks).

    Args:
        chunk_sizes: Samples per chunk, in the set's order.
        seed: The run seed.
        window: Chunks shuffled together.
        num_replicas, rank: DDP world size and this process's rank.
    """

    def __init__(
        self, chunk_sizes: np.ndarray, seed: int, window: int = 4, num_replicas: int = 1, rank: int = 0
    ) -> None:
        self.chunk_sizes = np.asarray(chunk_sizes, dtype=np.int64)
        super().__init__(int(self.chunk_sizes.sum()), seed, True, num_replicas, rank)
        self.window = window
        self.starts = np.concatenate([[0], np.cumsum(self.chunk_sizes)])
        self.num_samples = self.size // num_replicas
        self.total_size = self.num_samples * num_replicas

    def _from(self, epoch: int, first: int) -> Iterator[int]:
        """The dataset indices at the epoch's positions `first`, `first + 1`, ..., made a window at a time."""
        chunks = np.random.default_rng(derive_seed(self.seed, _SHUFFLE, epoch)).permutation(len(self.chunk_sizes))
        groups = [chunks[w : w + self.window] for w in range(0, len(chunks), self.window)]
        ends = np.cumsum([self.chunk_sizes[g].sum() for g in groups])
        start = int(np.searchsorted(ends, first, side="right"))
        skip = first - (int(ends[start - 1]) if start else 0)
        for w in range(start, len(groups)):
            members = np.concatenate([np.arange(self.starts[c], self.starts[c + 1]) for c in groups[w]])
            yield from np.random.default_rng(derive_seed(self.seed, _SHUFFLE, epoch, w)).permutation(members)[skip:]
            skip = 0

    def order(self, epoch: int) -> np.ndarray:
        return np.fromiter(self._from(epoch, 0), dtype=np.int64, count=self.size)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch, start = self._pinned or (self.epoch, 0)
        self._pinned = None
        done = start // self.num_replicas  # samples this rank read before `start`
        first = self.rank * self.num_samples
        for p, index in zip(range(first + done, first + self.num_samples), self._from(epoch, first + done)):
            yield int(index), derive_seed(self.seed, _SAMPLE, epoch, p)


class SeedState:
    """For a `LightningDataModule`: the run seed goes into every checkpoint, and a resumed run takes it back, so
    that `--seed_everything true` (a seed drawn per command) still resumes with the interrupted run's draws."""

    def state_dict(self) -> Dict[str, int]:
        return {"seed": run_seed()}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if "seed" in state:
            state = checked_counts(state, ("seed",), "the run seed")
        if "seed" in state and state["seed"] != run_seed():
            rank_zero_warn(
                f"resuming with the checkpoint's seed {state['seed']} (this command's is {run_seed()}), so that the "
                "resumed run draws what the interrupted one would have"
            )
            os.environ[SEED_ENV] = str(state["seed"])


def make_train_sampler(files, trainer=None) -> SeededSampler:
    """The training sampler of `files` (a folder's files, a dataset, or a shard set with `chunk_sizes`) for
    `trainer`'s rank and world size (one process when None)."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    chunk_sizes = getattr(files, "chunk_sizes", None)
    if chunk_sizes is not None:
        return ShardSampler(chunk_sizes, run_seed(), num_replicas=world, rank=rank)
    return SeededSampler(len(files), run_seed(), shuffle=True, num_replicas=world, rank=rank)
