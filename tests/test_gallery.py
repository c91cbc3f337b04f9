"""The FAISS gallery ranks individuals (not photos) and stays right through removals."""

from __future__ import annotations

import numpy as np
import pytest

from reid.gallery import Gallery


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_search_ranks_distinct_individuals_and_forgets_removed_ones(kind: str) -> None:
    rng = np.random.default_rng(0)
    dim = 16
    centres = _unit(rng, 5, dim)
    # individual "crowd" has 60 near-identical photos: it must not push the others out of the top five
    crowd = centres[0] + 0.01 * rng.normal(size=(60, dim))
    others = centres[1:]
    vectors = np.concatenate([crowd, others]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    identities = ["crowd"] * 60 + ["b", "c", "d", "e"]
    gallery = Gallery(dim, kind=kind)
    gallery.add(np.arange(len(vectors)), vectors, identities)
    ranking = gallery.search(centres[:1], k=5)[0]
    assert ranking[0].individual == "crowd"
    assert sorted(hit.individual for hit in ranking) == ["b", "c", "crowd", "d", "e"]
    assert ranking[0].score == pytest.approx(1.0, abs=0.01)
    assert identities[ranking[1].image_id] == ranking[1].individual  # the evidence is a photo of that individual
    gallery.remove([60])  # photo of "b"
    assert "b" not in [hit.individual for hit in gallery.search(centres[1:2], k=5)[0]]
    assert len(gallery) == 63 and gallery.device == "cpu"


def test_empty_gallery_and_id_clash() -> None:
    gallery = Gallery(4)
    assert gallery.search(np.ones((2, 4), dtype=np.float32), k=5) == [[], []]
    gallery.add([1], np.ones((1, 4)), ["a"])
    with pytest.raises(ValueError, match=r"already holds ids \[1\]"):
        gallery.add([1], np.ones((1, 4)), ["a"])


def test_ivf_gallery_started_small_is_retrained_as_it_grows() -> None:
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 2000, 8)
    gallery = Gallery(8, kind="ivf", ivf_lists=64)
    gallery.add([0], vectors[:1], ["first"])  # a service that starts empty enrolls one photo first
    for start in range(1, 2000, 100):
        ids = np.arange(start, min(start + 100, 2000))
        gallery.add(ids, vectors[ids], [f"ind{i}" for i in ids])
    gallery.remove([5, 6])
    assert len(gallery) == 1998
    # every remaining photo finds itself first: retraining kept all vectors and the lists are searched widely
    hits = [gallery.search(vectors[i:i + 1], k=1)[0][0][0] == f"ind{i}" for i in range(100, 2000, 50)]
    assert all(hits)
    assert gallery._ivf_lists > 1
