"""The identity sampler: P distinct individuals x K photos per batch, and clear errors when that cannot be."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from reid.data.dataset import identity_batch_sampler
from reid.errors import ConfigError


def test_every_batch_holds_p_distinct_individuals_with_k_different_photos() -> None:
    np.random.seed(0)  # the sampler draws from numpy's global generator, as Lightning's seed_everything seeds it
    labels = np.repeat(np.arange(10), 5)  # 10 individuals x 5 photos
    sampler = identity_batch_sampler(labels, individuals_per_batch=4, photos_per_individual=2, batches_per_epoch=25)
    indices = list(sampler)
    assert len(indices) == 25 * 8
    for start in range(0, len(indices), 8):
        batch = indices[start:start + 8]
        counts = Counter(labels[batch].tolist())
        assert len(counts) == 4 and set(counts.values()) == {2}  # no individual twice under NT-Xent
        for individual in counts:
            photos = [i for i in batch if labels[i] == individual]
            assert len(set(photos)) == 2  # two *different* photos are the positives


def test_individual_with_one_photo_gets_it_twice_for_two_augmentations() -> None:
    np.random.seed(0)
    labels = np.array([0, 1, 1, 2, 2])
    sampler = identity_batch_sampler(labels, individuals_per_batch=3, photos_per_individual=2, batches_per_epoch=4)
    indices = list(sampler)
    for start in range(0, len(indices), 6):
        batch = indices[start:start + 6]
        assert batch.count(0) == 2


@pytest.mark.parametrize(
    ("p", "k", "message"),
    [(5, 2, r"data.individuals_per_batch must be at most 3, the individuals in the training split, got 5"),
     (3, 1, "data.photos_per_individual must be >= 2"), (1, 2, "data.individuals_per_batch must be >= 2")],
)
def test_impossible_batches_are_explained(p: int, k: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        identity_batch_sampler([0, 0, 1, 1, 2, 2], p, k, batches_per_epoch=2)
