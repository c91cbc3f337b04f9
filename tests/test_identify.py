"""The one query path: threshold precedence, new_turtle placement with evidence, and the threshold `reid fit`
fits on held-out individuals."""

from __future__ import annotations

import numpy as np
import pytest

from reid.evaluation import calibrate_on_held_out_individuals
from reid.identify import Threshold, identifier_over, resolve_threshold
from reid.metrics import NEW_TURTLE, map_at_k


def _clusters(individuals: int, photos: int, spread: float, seed: int, dim: int = 32) -> tuple[np.ndarray, list[str]]:
    """Unit vectors around one random centre per individual: what a good encoder's embeddings look like."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(individuals, dim))
    vectors = np.repeat(centres, photos, axis=0) + spread * rng.normal(size=(individuals * photos, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), [f"t{i:02d}" for i in range(individuals) for _ in range(photos)]


def test_threshold_precedence_request_then_checkpoint_then_settings() -> None:
    assert resolve_threshold(0.3, 0.5, "fit", 0.7) == Threshold(0.3, "request")
    assert resolve_threshold(None, 0.5, "fit", 0.7) == Threshold(0.5, "checkpoint", "fit")
    assert resolve_threshold(None, None, None, 0.7) == Threshold(0.7, "settings")
    assert resolve_threshold(None, None) == Threshold(None)


def test_answer_places_new_turtle_and_names_the_photo_that_matched() -> None:
    gallery = np.eye(4, dtype=np.float32)[[0, 0, 1, 2]]
    gallery[1] = np.array([0.8, 0.6, 0, 0], dtype=np.float32)  # a second, less similar photo of "a"
    identifier = identifier_over(gallery, ["a", "a", "b", "c"], ids=[10, 11, 12, 13])
    query = np.array([[0.6, 0.8, 0, 0]], dtype=np.float32)  # closest to photo 11 of "a", then to "b"

    answer = identifier.answer(query, k=3, threshold=Threshold(0.97, "checkpoint", "reid fit"))[0]
    assert answer.labels == [NEW_TURTLE, "a", "b"] and answer.new_turtle
    assert answer.predictions[0].score == 0.97 and answer.predictions[0].image_id is None
    best = answer.predictions[1]
    assert (best.image_id, best.similarity) == (11, pytest.approx(0.96))  # its best photo, not its first one
    assert answer.predictions[2].image_id == 12

    lenient = identifier.answer(query, k=5, threshold=Threshold(0.5))[0]
    assert lenient.labels == ["a", "b", NEW_TURTLE, "c"] and not lenient.new_turtle
    assert identifier.answer(query, k=2, threshold=Threshold(None))[0].labels == ["a", "b"]


class _InliersByPhoto:
    """A verifier whose inlier counts are given per photo id, recording which photos it was asked to match."""

    candidates = 4

    def __init__(self, inliers: dict[int, int]) -> None:
        self.counts, self.asked = inliers, []

    def inliers(self, query: int, image_ids: np.ndarray) -> np.ndarray:
        self.asked += image_ids.tolist()
        return np.array([self.counts[int(i)] for i in image_ids])

    def fuse(self, similarities: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        return (similarities + np.minimum(inliers, 100) / 100) / 2


def test_a_photo_removed_between_search_and_verification_is_left_out_of_the_answer() -> None:
    """The service deletes photos while queries run: a candidate removed after the search matches nothing and is
    named by no answer, and the query is still answered from the photos that remain."""
    gallery = np.eye(4, dtype=np.float32)[[0, 0, 1, 2]]
    gallery[1] = np.array([0.8, 0.6, 0, 0], dtype=np.float32)  # "a"'s second photo: less similar than the removed one
    verifier = _InliersByPhoto({10: 90, 11: 5, 12: 40, 13: 0})
    identifier = identifier_over(gallery, ["a", "a", "b", "c"], ids=[10, 11, 12, 13], verifier=verifier)
    search_photos = identifier.gallery.search_photos

    def search_then_delete(queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        found = search_photos(queries, n)
        identifier.gallery.remove([10])  # a deletion lands between the search and the verification
        return found

    identifier.gallery.search_photos = search_then_delete
    ranking = identifier.rank(np.eye(4, dtype=np.float32)[[0]], k=3)[0]
    assert 10 not in verifier.asked and [hit.image_id for hit in ranking if hit.individual == "a"] == [11]
    assert [hit.individual for hit in ranking][0] == "a" and {hit.individual for hit in ranking} == {"a", "b", "c"}


def test_a_photo_removed_while_it_is_being_matched_is_left_out_too() -> None:
    """Matching is the slow part of a verified query, where a deletion is most likely to land: an individual whose
    only photo goes then is not named, though it was the best candidate when the search ran."""
    gallery = np.eye(4, dtype=np.float32)[[0, 1, 2]]
    identifier = identifier_over(gallery, ["a", "b", "c"], ids=[10, 12, 13])

    class DeletingVerifier(_InliersByPhoto):
        def inliers(self, query: int, image_ids: np.ndarray) -> np.ndarray:
            counts = super().inliers(query, image_ids)
            identifier.gallery.remove([10])  # deleted while its matches were being counted
            return counts

    identifier.verifier = DeletingVerifier({10: 90, 12: 40, 13: 0})
    ranking = identifier.rank(np.eye(4, dtype=np.float32)[[0]], k=3)[0]
    assert [hit.individual for hit in ranking] == ["b", "c"] and 10 not in [hit.image_id for hit in ranking]


def test_individuals_beyond_the_verified_photos_are_named_without_an_inlier_count() -> None:
    """Only the query's most similar photos are matched; an individual found further down still fills the answer,
    scored as if nothing matched, but its evidence says it was never matched (None), not that it matched 0 points."""
    gallery = np.eye(6, dtype=np.float32)
    verifier = _InliersByPhoto({i: 3 * i for i in range(10, 16)})
    verifier.candidates = 2
    identifier = identifier_over(gallery, ["a", "b", "c", "d", "e", "f"], ids=list(range(10, 16)), verifier=verifier)
    query = np.array([[1.0, 0.9, 0.5, 0.4, 0.3, 0.2]], dtype=np.float32)
    ranking = identifier.rank(query / np.linalg.norm(query), k=5)[0]
    assert sorted(verifier.asked) == [10, 11]
    assert {hit.individual: hit.inliers for hit in ranking} == {"a": 30, "b": 33, "c": None, "d": None, "e": None}


def test_fit_threshold_is_scored_on_individuals_it_was_not_fitted_on() -> None:
    vectors, identities = _clusters(individuals=12, photos=4, spread=0.3, seed=0)
    is_query = np.arange(len(identities)) % 4 == 0
    ids = np.asarray(identities)
    calibration = calibrate_on_held_out_individuals(vectors[~is_query], ids[~is_query].tolist(),
                                                    vectors[is_query], ids[is_query].tolist(), folds=4, seed=0)
    assert calibration is not None
    # separable individuals: known and held-out ones told apart, by a threshold other individuals chose
    assert calibration.metrics["auroc"] == pytest.approx(1.0)
    assert calibration.metrics["balanced_accuracy"] >= 0.9 and calibration.metrics["known_accuracy"] == 1.0
    within = float((vectors[0] * vectors[1]).sum())
    assert 0.0 < calibration.threshold < within
    assert "12 individuals" in calibration.origin and "4 folds" in calibration.origin

    # the fit keeps working when individuals blur into each other, and says how well the threshold did
    vague, names = _clusters(individuals=12, photos=4, spread=3.0, seed=1)
    names = np.asarray(names)
    blurred = calibrate_on_held_out_individuals(vague[~is_query], names[~is_query].tolist(), vague[is_query],
                                                names[is_query].tolist(), seed=0)
    assert blurred is not None and blurred.metrics["balanced_accuracy"] < 0.9
    # the answers it kept are the ones it scored: every query once per fold, new turtles where their fold was out
    assert len(blurred.rankings) == len(blurred.truths) == len(blurred.predictions) == 4 * int(is_query.sum())
    assert blurred.truths.count(NEW_TURTLE) == int(is_query.sum())
    assert map_at_k(blurred.predictions, blurred.truths) == pytest.approx(blurred.metrics["map5"])
    known = [p[0] == t for p, t in zip(blurred.predictions, blurred.truths) if t != NEW_TURTLE]
    assert np.mean(known) == pytest.approx(blurred.metrics["known_accuracy"])


def test_no_threshold_without_two_individuals_to_hold_out() -> None:
    vectors, identities = _clusters(individuals=1, photos=4, spread=0.3, seed=0)
    assert calibrate_on_held_out_individuals(vectors[:2], identities[:2], vectors[2:], identities[2:]) is None


def test_a_runner_up_weight_places_new_turtle_alike_whatever_k_and_scores_it_by_its_bar() -> None:
    gallery = np.eye(4, dtype=np.float32)[[0, 1, 2, 3]]
    identifier = identifier_over(gallery, ["a", "b", "c", "d"])
    query = np.array([[0.75, 0.66, 0, 0]], dtype=np.float32) / np.hypot(0.75, 0.66)  # a and b alike: ~0.75 / ~0.66
    threshold = Threshold(0.5, "checkpoint", "reid fit", runner_up_weight=0.5)
    five, one = (identifier.answer(query, k=k, threshold=threshold)[0] for k in (5, 1))
    assert five.labels[:2] == [NEW_TURTLE, "a"] and five.new_turtle
    assert one.labels == [NEW_TURTLE]  # k=1 still looks at the runner-up, so the decision does not change
    assert five.predictions[0].score == pytest.approx(0.5 + 0.5 * five.predictions[2].score)
    plain = identifier.answer(query, k=5, threshold=Threshold(0.5, "checkpoint", "reid fit"))[0]
    assert plain.labels[:3] == ["a", "b", NEW_TURTLE]
