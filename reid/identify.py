"""The one path that answers a query: gallery search → optional local verification of the top candidates →
fused score → ``new_turtle`` placed by the threshold → the top k individuals, each with its evidence.

``reid evaluate``, ``reid calibrate``, ``reid predict``, training validation and the service all answer queries
through :class:`Identifier`, and all choose the threshold in force through :func:`resolve_threshold`, so a
number measured by one of them is the number the others give.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from reid.errors import CheckpointError
from reid.gallery import Gallery
from reid.metrics import NEW_TURTLE, Hit, Individual, Ranking, insert_new_turtle, new_turtle_bar, rank_individuals

if TYPE_CHECKING:
    from pathlib import Path

    from reid.inference import Embedder
    from reid.verification import Verification

#: Where the threshold in force came from: the request (or a --threshold flag), the checkpoint, or a default.
ThresholdSource = Literal["request", "checkpoint", "settings"]


@dataclass(frozen=True)
class Threshold:
    """The new_turtle threshold in force, where it came from, and how it was obtained (None: never new_turtle).

    ``runner_up_weight`` raises each answer's bar by that share of its runner-up's score
    (:func:`reid.metrics.new_turtle_bar`); it belongs to the scores, so it comes from the checkpoint whatever the
    threshold's source.
    """

    value: float | None
    source: ThresholdSource | None = None
    origin: str | None = None  # e.g. how `reid fit` or `reid calibrate` fitted a checkpoint's threshold
    runner_up_weight: float = 0.0


def resolve_threshold(requested: float | None, checkpoint_value: float | None, checkpoint_origin: str | None = None,
                      default: float | None = None, runner_up_weight: float = 0.0) -> Threshold:
    """The request's threshold, else the checkpoint's calibrated one, else the configured default, else none."""
    if requested is not None:
        return Threshold(float(requested), "request", runner_up_weight=runner_up_weight)
    if checkpoint_value is not None:
        return Threshold(float(checkpoint_value), "checkpoint", checkpoint_origin, runner_up_weight)
    if default is not None:
        return Threshold(float(default), "settings", runner_up_weight=runner_up_weight)
    return Threshold(None, runner_up_weight=runner_up_weight)


def threshold_in_force(requested: float | None, embedder: Embedder, verification: Verification | None = None,
                       default: float | None = None) -> Threshold:
    """The threshold of the scores being compared, by :func:`resolve_threshold`'s precedence: ``verification``'s
    when answers are verified with it (:func:`verification_in_force`), else the checkpoint's similarity threshold.

    Verified answers rank by fused scores, which are probabilities: they have their own threshold, fitted by
    ``reid calibrate --verify``, because the checkpoint's similarity threshold does not apply to them.
    """
    if verification is not None:
        return resolve_threshold(requested, verification.threshold, verification.threshold_origin, default,
                                 verification.runner_up_weight)
    return resolve_threshold(requested, embedder.threshold, embedder.threshold_origin, default,
                             embedder.runner_up_weight)


def verification_in_force(requested: bool | None, embedder: Embedder, checkpoint: str | Path) -> Verification | None:
    """``--verify``/``--no-verify`` (or the service's ``verify`` setting), else whatever the checkpoint was calibrated
    for; None: answers by similarity alone.

    Raises:
        CheckpointError: verification is asked for but the checkpoint has no fusion to verify with.
    """
    if requested and embedder.verification is None:
        raise CheckpointError(
            f"verification was asked for (--verify, or REID_VERIFY=true for the service) but checkpoint {checkpoint} "
            f"was not calibrated for it; run `reid calibrate --verify --checkpoint {checkpoint} --data "
            "TRAINING_PHOTOS` first, or go without --verify")
    return None if requested is False else embedder.verification


@dataclass(frozen=True)
class Prediction:
    """One line of an answer: an individual (or new_turtle), its score, and the enrolled photo that matched."""

    individual: Individual
    score: float
    image_id: int | None = None
    similarity: float | None = None
    inliers: int | None = None


@dataclass(frozen=True)
class Answer:
    """A query's ranked predictions with new_turtle in its Zindi place, and the threshold that placed it."""

    predictions: list[Prediction]
    threshold: Threshold

    @property
    def labels(self) -> list[Individual]:
        return [p.individual for p in self.predictions]

    @property
    def new_turtle(self) -> bool:
        return bool(self.predictions) and self.predictions[0].individual == NEW_TURTLE


class Verifier(Protocol):
    """Checks a query's most similar gallery photos with local features (see :mod:`reid.verification`)."""

    #: how many of the most similar photos of each query are verified
    candidates: int

    def inliers(self, query: int, image_ids: np.ndarray) -> np.ndarray:
        """Verified local-feature matches between query number ``query`` and each gallery photo of ``image_ids``."""

    def fuse(self, similarities: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        """One score from a similarity and an inlier count (calibrated, so the threshold applies to it)."""


class Identifier:
    """Answers queries against a gallery, optionally verifying the top candidates with local features."""

    def __init__(self, gallery: Gallery, verifier: Verifier | None = None) -> None:
        self.gallery = gallery
        self.verifier = verifier

    def rank(self, queries: np.ndarray, k: int) -> list[Ranking]:
        """Up to ``k`` individuals per query, best first, each scored by its best photo (after verification)."""
        plain = [[hit._replace(similarity=hit.score) for hit in ranking] for ranking in self.gallery.search(queries, k)]
        if self.verifier is None:
            return plain
        scores, ids = self.gallery.search_photos(queries, self.verifier.candidates)
        return [self._verified(q, query_scores[query_ids >= 0], query_ids[query_ids >= 0], plain[q], k)
                for q, (query_scores, query_ids) in enumerate(zip(scores, ids))]

    def _verified(self, query: int, similarities: np.ndarray, image_ids: np.ndarray, plain: Ranking, k: int) -> Ranking:
        """Re-rank one query: its top photos by fused score; individuals found only further down are fused with
        zero inliers, so every answer still names ``k`` individuals when the gallery has them, and their evidence
        has no inlier count (None: never matched). A photo removed from the gallery since the search (the service
        deletes while queries run) is left out."""
        held, _ = self._held(image_ids)
        similarities, image_ids = similarities[held], image_ids[held]
        inliers = np.asarray(self.verifier.inliers(query, image_ids), dtype=np.int64)
        # looked up again after matching, the slow part, where a deletion is most likely to land
        held, identities = self._held(image_ids)
        similarities, image_ids, inliers = similarities[held], image_ids[held], inliers[held]
        verified = set(image_ids.tolist())
        unverified = [hit for hit in plain if hit.image_id not in verified]
        unverified = [hit for hit, kept in zip(unverified, self._held([hit.image_id for hit in unverified])[0]) if kept]
        identities += [hit.individual for hit in unverified]
        similarities = np.concatenate([similarities, [hit.score for hit in unverified]]).astype(np.float64)
        image_ids = np.concatenate([image_ids, [hit.image_id for hit in unverified]]).astype(np.int64)
        inliers = np.concatenate([inliers, np.zeros(len(unverified), np.int64)])
        fused = np.asarray(self.verifier.fuse(similarities, inliers), dtype=np.float64)
        order = np.argsort(-fused, kind="stable")
        ranking = rank_individuals(fused[order], [identities[i] for i in order], k, image_ids[order])
        similarity = dict(zip(image_ids.tolist(), similarities.tolist()))
        inlier_of = dict(zip(image_ids.tolist(), inliers.tolist()))
        return [hit._replace(similarity=similarity[hit.image_id],
                             inliers=int(inlier_of[hit.image_id]) if hit.image_id in verified else None)
                for hit in ranking]

    def _held(self, image_ids: Sequence[int]) -> tuple[np.ndarray, list[Individual]]:
        """Which of ``image_ids`` the gallery still holds (a mask), and those photos' individuals, in order."""
        found = self.gallery.identities_of(image_ids)
        return (np.array([identity is not None for identity in found], dtype=bool),
                [identity for identity in found if identity is not None])

    def answer(self, queries: np.ndarray, k: int, threshold: Threshold) -> list[Answer]:
        """Ranked individuals with new_turtle placed by ``threshold``, cut to ``k``, each with its evidence (ranked
        two deep at least when the bar depends on the runner-up, so that ``k`` does not change where new_turtle goes)."""
        depth = max(k, 2) if threshold.runner_up_weight else k
        return [answer_from_ranking(ranking, threshold, k) for ranking in self.rank(queries, depth)]


def answer_from_ranking(ranking: Ranking, threshold: Threshold, k: int) -> Answer:
    """Insert new_turtle where the threshold says and attach each individual's evidence; new_turtle's score is its
    bar in this answer (the threshold, plus the runner-up's share when ``threshold.runner_up_weight`` is set)."""
    hits: dict[Individual, Hit] = {hit.individual: hit for hit in ranking}
    predictions = []
    for label in insert_new_turtle(ranking, threshold.value, k, threshold.runner_up_weight):
        if label == NEW_TURTLE:  # scored by its bar, so the answer stays in score order
            predictions.append(Prediction(NEW_TURTLE, new_turtle_bar(ranking, threshold.value,
                                                                     threshold.runner_up_weight)))
            continue
        hit = hits[label]
        predictions.append(Prediction(label, hit.score, None if hit.image_id < 0 else hit.image_id,
                                      hit.similarity if hit.similarity is not None else hit.score, hit.inliers))
    return Answer(predictions, threshold)


def identifier_over(embeddings: np.ndarray, identities: Sequence[Individual], ids: Sequence[int] | None = None,
                    verifier: Verifier | None = None) -> Identifier:
    """An :class:`Identifier` over a gallery made of these embeddings (ids default to row numbers)."""
    gallery = Gallery(int(embeddings.shape[1]))
    gallery.add(np.arange(len(identities)) if ids is None else ids, embeddings, list(identities))
    return Identifier(gallery, verifier)
