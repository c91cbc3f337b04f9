"""Ranking individuals, placing "new_turtle", and scoring the result the way Zindi does.

A query's answer is a list of *individuals*, not photos: five photos of one turtle are one answer. The score
is Zindi's MAP@5: per query, 1/rank of the first occurrence of the true label among the first five answers
(a repeated label is credited once, ``new_turtle`` is a label like any other), averaged over queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import numpy as np

NEW_TURTLE = "new_turtle"

#: An individual as ranking and scoring see it: its name, or the integer label training gives it (validation scores
#: on those labels directly). Only equality and hashing are used, so names and labels never need converting.
Individual = str | int


class Hit(NamedTuple):
    """One individual in a ranked answer, scored by its best-matching gallery photo, which is kept as evidence."""

    individual: Individual
    score: float  # what the threshold compares: the similarity, or the fused score when verification ran
    image_id: int = -1  # gallery id of the best-matching photo (-1: unknown)
    similarity: float | None = None  # that photo's cosine similarity (None: same as score)
    inliers: int | None = None  # geometrically verified local-feature matches, where verification ran


#: A ranked answer: individuals, best first, each once.
Ranking = list[Hit]


def average_precision_at_k(predicted: Sequence[Individual], actual: Individual, k: int = 5) -> float:
    """Zindi/Kaggle AP@k for one true label: 1/(position of its first occurrence) within the first ``k``.

    Positions count every entry, duplicates included, exactly as the competition scorer does; a label repeated
    after its first occurrence earns nothing more.
    """
    for position, label in enumerate(list(predicted)[:k]):
        if label == actual:
            return 1.0 / (position + 1)
    return 0.0


def map_at_k(predictions: Sequence[Sequence[Individual]], truths: Sequence[Individual], k: int = 5) -> float:
    """Mean of :func:`average_precision_at_k` over queries (0.0 for no queries)."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} truths")
    if not truths:
        return 0.0
    return float(np.mean([average_precision_at_k(p, t, k) for p, t in zip(predictions, truths)]))


def top_k_accuracy(predictions: Sequence[Sequence[Individual]], truths: Sequence[Individual], k: int) -> float:
    """Fraction of queries whose true label is among the first ``k`` answers."""
    if not truths:
        return 0.0
    return float(np.mean([t in list(p)[:k] for p, t in zip(predictions, truths)]))


def rank_individuals(scores: np.ndarray, identities: Sequence[Individual], k: int,
                     image_ids: Sequence[int] | None = None) -> Ranking:
    """Collapse one query's photo neighbours (sorted best first) into up to ``k`` distinct individuals.

    Each individual is scored by its best-matching photo, which is the first time it appears; that photo's id
    (from ``image_ids``) is kept as the evidence a person can look at.
    """
    ranking: Ranking = []
    seen: set[Individual] = set()
    ids = image_ids if image_ids is not None else [-1] * len(identities)
    for score, identity, image_id in zip(scores, identities, ids):
        if identity in seen:
            continue
        seen.add(identity)
        ranking.append(Hit(identity, float(score), int(image_id)))
        if len(ranking) == k:
            break
    return ranking


def runner_up_score(ranking: Ranking) -> float:
    """The second individual's score (0 when the answer has only one): what the new_turtle bar rises with."""
    return float(ranking[1].score) if len(ranking) > 1 else 0.0


def new_turtle_bar(ranking: Ranking, threshold: float, runner_up_weight: float = 0.0) -> float:
    """The score an individual must reach to rank above new_turtle in this answer: the threshold, raised by
    ``runner_up_weight`` times the runner-up's score.

    A photo of a turtle nobody enrolled tends to resemble several enrolled ones about equally, while a known one
    stands out from the rest (Lowe's ratio test, applied to individuals): on turtles_dev a weight of 0.5 raised the
    held-out balanced accuracy of verified answers in all six runs measured (docs/results.md). 0 is the plain
    threshold.
    """
    return threshold + runner_up_weight * runner_up_score(ranking)


def runner_up_note(runner_up_weight: float, separator: str = "") -> str:
    """How a threshold's origin says it was fitted with a runner-up weight, after ``separator`` ('' for the plain
    threshold, separator included, so an origin reads the same as before the weight existed)."""
    return f"{separator}bar raised by {runner_up_weight:g} x the runner-up's score" if runner_up_weight else ""


def insert_new_turtle(ranking: Ranking, threshold: float | None, k: int = 5,
                      runner_up_weight: float = 0.0) -> list[Individual]:
    """Labels of ``ranking`` with ``new_turtle`` inserted before the first individual scoring under the bar
    (:func:`new_turtle_bar`).

    With a best score under the bar ``new_turtle`` comes first; with every score above it, it comes after
    them (if room remains in the first ``k``). ``threshold=None`` never inserts it.
    """
    labels = [hit.individual for hit in ranking]
    if threshold is not None:
        bar = new_turtle_bar(ranking, threshold, runner_up_weight)
        position = sum(1 for hit in ranking if hit.score >= bar)
        labels.insert(position, NEW_TURTLE)
    return labels[:k]


#: The thresholds a person may give (``--threshold``, a request's ``threshold``, the service's default). Scores are
#: cosines or fused probabilities, in [-1, 1], but a threshold is a bar on the best score less ``runner_up_weight``
#: (at most 1) times the runner-up's, which spans [-2, 2]: what calibration fits can lie outside [-1, 1] and must
#: still be accepted back.
THRESHOLD_RANGE = (-2.0, 2.0)

#: What a new_turtle threshold is fitted to maximise. ``map5``: Zindi's MAP@5 of the whole ranked answers, where
#: new_turtle is a label like any other (what a submission is scored on). ``balanced_accuracy``: the decision of the
#: first answer alone, the mean of the known queries answered with their individual (and not flagged) and the
#: unknown ones flagged new_turtle: "is this a turtle we know, and which?", what a biologist reads first.
ThresholdObjective = Literal["map5", "balanced_accuracy"]
THRESHOLD_OBJECTIVES: tuple[str, ...] = get_args(ThresholdObjective)
#: How a threshold's origin names what it was fitted for.
OBJECTIVE_NAMES = {"map5": "MAP@5", "balanced_accuracy": "balanced accuracy"}


def calibrate_threshold(rankings: Sequence[Ranking], truths: Sequence[Individual], k: int = 5,
                        runner_up_weight: float = 0.0,
                        objective: ThresholdObjective = "map5") -> tuple[float, float]:
    """The new_turtle threshold that maximises ``objective`` (:data:`ThresholdObjective`) on held-out queries, and
    that score (the bar of each answer rising with its runner-up's score by ``runner_up_weight``, see
    :func:`new_turtle_bar`).

    ``truths`` holds :data:`NEW_TURTLE` for queries of individuals absent from the gallery. Every threshold
    between two consecutive observed scores gives the same rankings, so only observed scores (and one value
    above all of them) are tried; the threshold returned is the middle of the widest range of best thresholds,
    so that it is not balanced on a single photo's score. Balanced accuracy with only known (or only unknown)
    queries is the accuracy of those.
    """
    if not truths:
        raise ValueError("calibration needs at least one query")
    if objective not in THRESHOLD_OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(THRESHOLD_OBJECTIVES)}, got {objective!r}")
    scores = np.full((len(rankings), k), -np.inf)
    true_rank = np.full(len(rankings), k + 1)  # rank of the true individual among the ranked ones (0-based)
    for q, (ranking, truth) in enumerate(zip(rankings, truths)):
        # an individual ranks above new_turtle when score >= threshold + rise, i.e. score - rise >= threshold: the
        # search below is over these shifted scores (rise: how far this answer's bar is above the threshold)
        rise = new_turtle_bar(ranking, 0.0, runner_up_weight)
        values = [hit.score - rise for hit in ranking[:k]]
        scores[q, : len(values)] = values
        for r, hit in enumerate(ranking[:k]):
            if hit.individual == truth:
                true_rank[q] = r
    observed = np.unique(scores[np.isfinite(scores)])
    lowest = min(-1.0, float(observed.min())) if observed.size else -1.0  # shifted scores can go under -1
    candidates = np.concatenate([[lowest - 1e-6], observed, [observed.max() + 1e-6 if observed.size else 1.0]])
    # position of new_turtle for every (candidate, query): how many ranked scores are >= the threshold
    position = (scores[None, :, :] >= candidates[:, None, None]).sum(axis=2)
    is_new = np.array([t == NEW_TURTLE for t in truths])
    # MAP@5 and balanced accuracy are scored here again, for every candidate threshold at once (map_at_k and
    # evaluation.open_set_scores score one set of answers: calling them per candidate is quadratic in the queries);
    # tests/test_metrics.py checks on random answers that both give the score returned.
    if objective == "map5":
        effective = np.where(is_new[None, :], position,
                             np.where(position <= true_rank[None, :], true_rank + 1, true_rank))
        means = np.where(effective < k, 1.0 / (effective + 1.0), 0.0).mean(axis=1)
    else:
        # the first answer is an individual when its score reaches the bar (position >= 1); a known query is
        # right when that individual is its own, an unknown one when it is new_turtle (position 0)
        known_right = ((position >= 1) & (true_rank == 0)[None, :])[:, ~is_new]
        unknown_flagged = (position == 0)[:, is_new]
        means = np.mean([right.mean(axis=1) for right in (known_right, unknown_flagged) if right.shape[1]], axis=0)
    # Every threshold in (candidates[i - 1], candidates[i]] behaves like candidates[i]. Of the runs of best
    # candidates, take the widest interval of thresholds and return its middle: the largest margin on both sides.
    best = np.isclose(means, means.max())
    widest, chosen = -1.0, 0.0
    i = 0
    while i < len(candidates):
        if not best[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(candidates) and best[j + 1]:
            j += 1
        low = candidates[i - 1] if i > 0 else candidates[0]
        if candidates[j] - low > widest:
            widest, chosen = candidates[j] - low, (low + candidates[j]) / 2
        i = j + 1
    # Not clipped to [-1, 1]: the threshold is a bar on shifted scores, which reach 1 + runner_up_weight where the
    # runner-up's cosine is negative (ViT features); a clipped bar would not earn the score returned beside it.
    return float(chosen), float(means.max())
