"""Batch streams: deterministic, sharded without overlap, resumable by skipping."""

from __future__ import annotations

from itertools import islice

import pytest
import torch
from torch.utils.data import Dataset

from ssod.data.sampling import InfiniteBatchSampler, infinite_loader


def _batches(count: int, **kwargs) -> list[list[tuple[int, int]]]:
    return list(islice(iter(InfiniteBatchSampler(**kwargs)), count))


def test_the_stream_is_a_pure_function_of_its_arguments():
    first = _batches(20, num_items=7, batch_size=3, seed=5)
    torch.manual_seed(123)  # the global RNG plays no part
    assert _batches(20, num_items=7, batch_size=3, seed=5) == first
    assert _batches(20, num_items=7, batch_size=3, seed=6) != first


def test_each_pass_is_a_permutation_and_passes_differ():
    indices = [index for batch in _batches(10, num_items=10, batch_size=2, seed=0) for index, _ in batch]
    passes = [indices[:10], indices[10:]]
    assert all(sorted(p) == list(range(10)) for p in passes)
    assert passes[0] != passes[1]


@pytest.mark.parametrize("num_items, world_size", [(12, 2), (7, 2), (10, 3), (5, 4)])
def test_ranks_get_disjoint_shards_that_cover_the_data(num_items: int, world_size: int):
    per_rank = -(-num_items // world_size)
    shards = [
        [index for batch in _batches(per_rank, num_items=num_items, batch_size=1, seed=3, rank=rank, world_size=world_size)
         for index, _ in batch]
        for rank in range(world_size)
    ]
    assert all(len(shard) == per_rank for shard in shards)  # every rank takes the same number of steps
    assert set().union(*shards) == set(range(num_items))
    padding = per_rank * world_size - num_items
    assert sum(len(shard) for shard in shards) - len(set().union(*shards)) == padding
    if padding == 0:
        assert all(set(a).isdisjoint(b) for i, a in enumerate(shards) for b in shards[i + 1 :])


def test_sample_seeds_differ_across_positions_and_ranks():
    seeds = [
        seed
        for rank in range(2)
        for batch in _batches(30, num_items=4, batch_size=2, seed=1, rank=rank, world_size=2)
        for _, seed in batch
    ]
    assert len(seeds) == len(set(seeds)) == 120


@pytest.mark.parametrize("start_batch", [1, 4, 13])
def test_resuming_at_start_batch_equals_skipping_that_many_batches(start_batch: int):
    arguments = dict(num_items=9, batch_size=2, seed=4, rank=1, world_size=2)
    uninterrupted = _batches(start_batch + 10, **arguments)
    resumed = _batches(10, start_batch=start_batch, **arguments)
    assert resumed == uninterrupted[start_batch:]


def test_batch_size_one_on_one_process_and_bad_arguments():
    batches = _batches(5, num_items=3, batch_size=1, seed=0)
    assert [len(batch) for batch in batches] == [1] * 5
    big = _batches(2, num_items=3, batch_size=5, seed=0)  # larger than the dataset: cycles
    assert [len(batch) for batch in big] == [5, 5]
    with pytest.raises(ValueError, match="batch_size"):
        InfiniteBatchSampler(3, 0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        InfiniteBatchSampler(0, 1, seed=0)


class Keys(Dataset):
    """Returns the key it was asked for and a number drawn from torch's global RNG."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, key):
        index, seed = key
        torch.manual_seed(seed)
        return (index, seed, torch.rand(()).item()), {"image_id": index}


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_yields_the_sampler_stream_whatever_the_workers(workers: int):
    loader = infinite_loader(Keys(), batch_size=2, seed=7, rank=0, world_size=1, start_batch=3, num_workers=workers)
    got = [next(loader) for _ in range(4)]
    expected = _batches(7, num_items=6, batch_size=2, seed=7)[3:]
    for (items, metas), batch in zip(got, expected):
        assert [(index, seed) for index, seed, _ in items] == batch
        assert [meta["image_id"] for meta in metas] == [index for index, _ in batch]
        assert [value for *_, value in items] == [torch.manual_seed(s) and torch.rand(()).item() for _, s in batch]


EXIT_WITH_LIVE_WORKERS = """
from torch.utils.data import Dataset
from ssod.data.sampling import infinite_loader

class Items(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, key):
        return key, {}

stream = infinite_loader(Items(), 2, 0, 0, 1, 0, num_workers=2)
next(stream)
raise RuntimeError("failed with the loader's workers alive")
"""


def test_a_process_that_fails_with_live_loader_workers_exits():
    """Workers ignore SIGTERM, which multiprocessing's exit handler relies on: without the
    SIGKILL at exit, this process waited forever (seen on a GPU machine: a bench that failed
    hung until its timeout)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", EXIT_WITH_LIVE_WORKERS], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "failed with the loader's workers alive" in done.stderr
    assert "killed by signal" not in done.stderr


@pytest.mark.timeout(30)
def test_more_ranks_than_items_still_gives_every_rank_batches():
    """3 labeled images on 8 GPUs: each rank gets one item per pass (it used to wait forever)."""
    firsts = [next(iter(InfiniteBatchSampler(3, 1, seed=0, rank=rank, world_size=8))) for rank in range(8)]
    assert {index for (index, _), in firsts} == {0, 1, 2}
