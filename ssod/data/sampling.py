"""Infinite, sharded, resumable batch streams for iteration-based training.

Each process draws its own shard of a fresh permutation every pass over the data
(``torch.randperm`` seeded by ``seed`` and the pass number), so labeled and unlabeled
streams of any length cycle forever at their own pace. Every element is
``(dataset index, sample seed)``: the sample seed drives that sample's augmentation, so
the stream is a pure function of ``(seed, rank, world_size, position)`` and a resumed run
sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import atexit
import signal
import weakref
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssod.data.coco import list_collate


class InfiniteBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields batches ``[(index, sample_seed), ...]`` of this process's shard, forever.

    ``start_batch`` skips the batches already consumed (resume). Works for any
    ``batch_size >= 1`` and any ``world_size``, including one process.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0
    ) -> None:
        if num_items < 1:
            raise ValueError("cannot sample from an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch

    def _stream(self) -> Iterator[tuple[int, int]]:
        position = 0
        epoch = 0
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_items, generator=generator)
            # Pad so every rank gets the same count per pass (keeps ranks in step).
            per_rank = -(-self.num_items // self.world_size)
            # More ranks than items (3 labeled images on 8 GPUs) need the order repeated more.
            padded = order.repeat(-(-per_rank * self.world_size // self.num_items))[: per_rank * self.world_size]
            for index in padded[self.rank :: self.world_size].tolist():
                sample_seed = (self.seed * 7_919 + self.rank * 104_729 + position) % (2**31)
                yield index, sample_seed
                position += 1
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        stream = self._stream()
        batch: list[tuple[int, int]] = []
        consumed = 0
        for element in stream:
            batch.append(element)
            if len(batch) == self.batch_size:
                if consumed >= self.start_batch:
                    yield batch
                consumed += 1
                batch = []

    def __len__(self) -> int:
        # Infinite; DataLoader only needs this for len(loader), which we never ask.
        return 2**62


def infinite_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    start_batch: int,
    num_workers: int,
    pin_memory: bool = False,
) -> Iterator:
    """An endless iterator of ``(items, metas)`` batches from ``dataset``."""
    sampler = InfiniteBatchSampler(len(dataset), batch_size, seed, rank, world_size, start_batch)
    loader = worker_loader(dataset, num_workers, pin_memory, prefetch_factor=4, batch_sampler=sampler)
    return track_workers(iter(loader))  # the caller may keep only the iterator


def worker_loader(dataset: Dataset, num_workers: int, pin_memory: bool, prefetch_factor: int, **sampling) -> DataLoader:
    """A DataLoader of ``(items, metas)`` batches with our worker rules, for every loader we make.

    Workers persist, prefetch ``prefetch_factor`` batches each, leave stop signals to the
    main process (``ignore_stop_signals``) and are tracked so that they end at exit.
    ``sampling``: ``batch_sampler=...``, or ``batch_size=...`` with ``sampler=...``.
    """
    return track_workers(DataLoader(
        dataset,
        num_workers=num_workers,
        collate_fn=list_collate,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals,
        **sampling,
    ))


# Our loaders and iterators, so that their workers can be found at exit.
_LOADERS: "weakref.WeakSet" = weakref.WeakSet()


def track_workers(loader_or_iterator):
    """Register a DataLoader (or its iterator) whose workers ``_kill_loader_workers`` may end."""
    _LOADERS.add(loader_or_iterator)
    return loader_or_iterator


def shut_down_workers(*loaders) -> None:
    """End the workers of these DataLoaders or iterators now (None is skipped). A process that
    trains several runs in turn (a tuning worker) would otherwise keep every run's persistent
    workers alive, and memory with them, until it exits."""
    for tracked in loaders:
        iterator = getattr(tracked, "_iterator", None) or tracked  # a persistent loader keeps its iterator
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()


@atexit.register
def _kill_loader_workers() -> None:
    """At interpreter exit, SIGKILL the workers of our DataLoaders still alive.

    multiprocessing's own exit handler (which runs after this one) ends daemonic children
    with SIGTERM and waits for them; our workers ignore SIGTERM, so a process leaving with
    live workers (an exception whose traceback still holds a loader) would wait forever.
    Other daemonic children (a ``multiprocessing.Pool``'s) are left to end their own way.
    """
    alive = {}  # by pid: a loader and its iterator may both be tracked
    for tracked in list(_LOADERS):
        iterator = getattr(tracked, "_iterator", None) or tracked  # a persistent loader keeps its iterator
        alive.update({w.pid: w for w in getattr(iterator, "_workers", []) if w.is_alive()})
    workers = list(alive.values())
    if not workers:
        return
    # PyTorch's SIGCHLD handler would raise "DataLoader worker killed" in the middle of this.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(timeout=5)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process.

    Schedulers signal the whole process group; a worker that died of it would turn an
    orderly stop (checkpoint, run KILLED) into a crash. The main process ends its workers.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
