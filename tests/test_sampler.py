"""The identity sampler: P distinct individuals x K photos per batch, different batches on each DDP rank, and clear
errors when that cannot be."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from reid.data.dataset import IdentitySampler
from reid.errors import ConfigError


def batches(sampler: IdentitySampler, size: int) -> list[list[int]]:
    indices = list(sampler)
    assert len(indices) == len(sampler)
    return [indices[start:start + size] for start in range(0, len(indices), size)]


def test_every_batch_holds_p_distinct_individuals_with_k_different_photos() -> None:
    labels = np.repeat(np.arange(10), 5)  # 10 individuals x 5 photos
    sampler = IdentitySampler(labels, individuals_per_batch=4, photos_per_individual=2, batches_per_epoch=25)
    assert len(sampler) == 25 * 8
    for batch in batches(sampler, 8):
        counts = Counter(labels[batch].tolist())
        assert len(counts) == 4 and set(counts.values()) == {2}  # no individual twice under NT-Xent
        for individual in counts:
            photos = [i for i in batch if labels[i] == individual]
            assert len(set(photos)) == 2  # two *different* photos are the positives


def test_individual_with_one_photo_gets_it_twice_for_two_augmentations() -> None:
    labels = np.array([0, 1, 1, 2, 2])
    sampler = IdentitySampler(labels, individuals_per_batch=3, photos_per_individual=2, batches_per_epoch=4)
    for batch in batches(sampler, 6):
        assert batch.count(0) == 2


def test_more_photos_per_individual_than_some_have_is_said(caplog: pytest.LogCaptureFixture) -> None:
    """K larger than an individual's training photos repeats its photos in a batch: a weaker recipe, so it is said."""
    labels = [0] * 8 + [1] * 3 + [2] * 3
    with caplog.at_level("WARNING", logger="reid.data.dataset"):
        IdentitySampler(labels, individuals_per_batch=2, photos_per_individual=4, batches_per_epoch=1)
    assert ("data.photos_per_individual 4 is more than the training photos of 2 of the 3 individuals: their photos "
            "repeat within a batch") in caplog.text


@pytest.mark.parametrize(("individuals", "world_size"), [(12, 3), (5, 2)])
def test_ranks_draw_different_batches_each_step_and_runs_repeat(individuals: int, world_size: int) -> None:
    """With P x world_size individuals or more, the ranks of one step share none; with fewer, each rank still draws
    its own batches (an individual may then train on two ranks at once, never twice in one batch)."""
    labels = np.repeat(np.arange(individuals), 3)
    p, k = 4, 2

    def run(epoch: int) -> list[list[list[int]]]:
        samplers = [IdentitySampler(labels, p, k, batches_per_epoch=20, rank=rank, world_size=world_size, seed=7)
                    for rank in range(world_size)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        return [batches(sampler, p * k) for sampler in samplers]

    per_rank = run(epoch=0)
    for step in zip(*per_rank):
        step_individuals = [set(labels[batch].tolist()) for batch in step]
        for batch, chosen in zip(step, step_individuals):
            assert len(chosen) == p and set(Counter(labels[batch].tolist()).values()) == {k}
        if p * world_size <= individuals:
            assert len(set().union(*step_individuals)) == p * world_size  # no two ranks train on one individual
    assert len({str(stream) for stream in per_rank}) == world_size  # each rank has its own stream
    assert run(epoch=0) == per_rank  # reproducible
    assert run(epoch=1) != per_rank  # set_epoch gives fresh batches


def test_rank_outside_the_world_is_refused() -> None:
    with pytest.raises(ValueError, match="got rank 2 of 2"):
        IdentitySampler([0, 0, 1, 1], 2, 2, batches_per_epoch=1, rank=2, world_size=2)


@pytest.mark.parametrize(
    ("p", "k", "message"),
    [(5, 2, r"data.individuals_per_batch must be at most 3, the individuals in the training split, got 5"),
     (3, 1, "data.photos_per_individual must be >= 2"), (1, 2, "data.individuals_per_batch must be >= 2")],
)
def test_impossible_batches_are_explained(p: int, k: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        IdentitySampler([0, 0, 1, 1, 2, 2], p, k, batches_per_epoch=2)
