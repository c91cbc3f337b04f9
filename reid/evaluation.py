"""Search query photos against a gallery and score the answers; shared by training validation and `reid evaluate`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from reid.gallery import Gallery
from reid.metrics import NEW_TURTLE, Ranking, insert_new_turtle, map_at_k, top_k_accuracy


@dataclass
class RetrievalResult:
    """Rankings of every query and the scores a user reads (MAP@5, top-1, top-5; open-set accuracies)."""

    rankings: list[Ranking]
    predictions: list[list[str]]
    truths: list[str]
    metrics: dict[str, float] = field(default_factory=dict)


def search_gallery(gallery_embeddings: np.ndarray, gallery_identities: Sequence[str], query_embeddings: np.ndarray,
                   k: int = 5) -> list[Ranking]:
    """Rank up to ``k`` individuals for each query through a FAISS gallery (the service's search path)."""
    gallery = Gallery(int(gallery_embeddings.shape[1]))
    gallery.add(np.arange(len(gallery_identities)), gallery_embeddings, list(gallery_identities))
    return gallery.search(query_embeddings, k)


def score_rankings(rankings: list[Ranking], query_identities: Sequence[str], known: set[str],
                   threshold: float | None = None, k: int = 5) -> RetrievalResult:
    """Insert new_turtle by ``threshold`` and score; queries of individuals not in ``known`` must be new_turtle.

    Reported: ``map5``, ``top1``, ``top5`` over all queries, and when some queries are unknown individuals,
    ``known_accuracy`` (top-1 right on known individuals), ``unknown_accuracy`` (new_turtle first on unknown
    ones) and their ``balanced_accuracy``.
    """
    truths = [identity if identity in known else NEW_TURTLE for identity in query_identities]
    predictions = [insert_new_turtle(ranking, threshold, k) for ranking in rankings]
    metrics = {
        "map5": map_at_k(predictions, truths, k),
        "top1": top_k_accuracy(predictions, truths, 1),
        "top5": top_k_accuracy(predictions, truths, 5),
        "queries": float(len(truths)),
    }
    unknown = np.array([t == NEW_TURTLE for t in truths])
    if unknown.any():
        first = np.array([bool(p) and p[0] == t for p, t in zip(predictions, truths)])
        metrics["unknown_accuracy"] = float(first[unknown].mean())
        metrics["known_accuracy"] = float(first[~unknown].mean()) if (~unknown).any() else float("nan")
        metrics["balanced_accuracy"] = float(np.nanmean([metrics["known_accuracy"], metrics["unknown_accuracy"]]))
    return RetrievalResult(rankings, predictions, truths, metrics)
