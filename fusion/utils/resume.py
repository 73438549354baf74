"""Exact resume: a run killed mid-epoch and resumed from its last checkpoint ends where the
uninterrupted run ends.

Lightning restores the weights, optimizer, scheduler and loop progress, but not the global RNG
and not the position inside a shuffled epoch. So nothing here keeps RNG state: the training
order is a function of (seed, epoch), the loader records how many batches of the epoch it
handed out (Lightning saves a loader's `state_dict` in the checkpoint), and every random draw
of a training step comes from the global RNG reseeded from (seed, process, step, batch).
The seed is the run's `seed_everything` value, which Lightning keeps in `PL_GLOBAL_SEED`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, DistributedSampler


def start_next_epoch_cleanly(checkpoint: dict[str, Any]) -> None:
    """Lightning 2.6 resumes a checkpoint written after an epoch had finished (a SIGTERM or an
    exception in the epoch-end hooks, saved by OnExceptionCheckpoint) with that epoch's batch
    counters; with `max_steps` the next epoch then counts its first batch as its last and ends,
    skipping the rest of its rows. Such a checkpoint gets its per-epoch counters zeroed, as
    Lightning zeroes them at every epoch start. Any other checkpoint is left as it is."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loop.get("epoch_progress", {}).get("current"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches or len(set(epochs.values())) != 1 or not batches["current"]["ready"]:
        return  # mid-epoch, or nothing run yet

    def zero_current(progress: dict) -> None:
        for key, value in progress.items():
            if key == "current":
                progress[key] = {counter: 0 for counter in value}
            elif isinstance(value, dict):
                zero_current(value)

    for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress", "epoch_loop.automatic_optimization.optim_progress"):
        zero_current(loop.get(key, {}))
    batches["is_last_batch"] = False


def run_seed() -> int:
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def step_seed(seed: int, rank: int, step: int, batch_idx: int) -> int:
    """A well-mixed 63-bit seed for one training batch of one process."""
    return int(np.random.SeedSequence([seed, rank, step, batch_idx]).generate_state(1, np.uint64)[0] >> 1)


class ResumableSampler(DistributedSampler):
    """This process's shard of an order that depends only on (seed, epoch); an epoch can start
    part-way, leaving out its first `start` indices (those consumed before an interruption)."""

    start = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start :])


class ResumableLoader(DataLoader):
    """A shuffled training DataLoader that Lightning resumes mid-epoch.

    Its state is the epoch and the number of batches handed out in it; on resume the rest of
    that epoch comes in the uninterrupted order. One process of `num_replicas` gets every
    `num_replicas`-th index of the epoch's order, as with Lightning's own DistributedSampler.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, sampler=None, **kwargs):
        # Lightning re-creates the loader with a sampler of its own for `overfit_batches`; that one is used as it is.
        if sampler is None:
            sampler = ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.epoch, self.batches = 0, 0
        self._resume: dict[str, int] = {}

    def __iter__(self):
        if not isinstance(self.sampler, ResumableSampler):
            yield from super().__iter__()
            return
        # A generator: the body runs at the first batch, after Lightning has set the sampler's epoch.
        self.epoch = self.sampler.epoch
        self.batches = self._resume.get("batches", 0) if self._resume.get("epoch") == self.epoch else 0
        self._resume = {}
        self.sampler.start = self.batches * self.batch_size
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)


class WeightedDomainSampler(ResumableSampler):
    """An epoch of `num_samples` draws (this process's share of the data set's length): at each
    position a domain, with the probabilities `weights()` gives at that moment, then one of its
    rows uniformly (with replacement). Every draw is seeded by (seed, epoch, process, position),
    so a resumed epoch continues with the draws the uninterrupted one would have made, given the
    same weights (the caller saves what they depend on)."""

    def __init__(self, dataset, domains: list[int], num_domains: int, weights, **kwargs):
        super().__init__(dataset, shuffle=True, **kwargs)
        domains = np.asarray(domains)
        self.rows_of = [np.flatnonzero(domains == d) for d in range(num_domains)]
        self.weights = weights

    def __iter__(self):
        present = np.array([len(rows) > 0 for rows in self.rows_of], dtype=np.float64)
        for position in range(self.start, self.num_samples):
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, position])
            p = np.asarray(self.weights(), dtype=np.float64) * present
            domain = rng.choice(len(p), p=p / p.sum())
            yield int(self.rows_of[domain][rng.integers(len(self.rows_of[domain]))])
