"""MAP@5 exactly as Zindi scores it, individual ranking, new_turtle placement and threshold calibration."""

from __future__ import annotations

import numpy as np
import pytest

from reid.metrics import (
    NEW_TURTLE,
    Hit,
    average_precision_at_k,
    calibrate_threshold,
    insert_new_turtle,
    new_turtle_bar,
    map_at_k,
    rank_individuals,
    top_k_accuracy,
)


@pytest.mark.parametrize(
    ("predicted", "actual", "expected"),
    [
        (["a", "b", "c", "d", "e"], "a", 1.0),
        (["b", "a", "c", "d", "e"], "a", 0.5),
        (["b", "c", "d", "e", "a"], "a", 0.2),
        (["b", "c", "d", "e", "f", "a"], "a", 0.0),  # sixth place earns nothing
        (["a", "a", "a", "b", "c"], "a", 1.0),  # a repeated true label is credited once
        (["b", "b", "a", "c", "d"], "a", 1 / 3),  # positions count duplicates, as Zindi's scorer does
        (["x", NEW_TURTLE, "y"], NEW_TURTLE, 0.5),  # new_turtle is a label like any other
        (["x"], "a", 0.0),  # fewer than five answers
        ([], "a", 0.0),
    ],
)
def test_average_precision_hand_computed(predicted: list[str], actual: str, expected: float) -> None:
    assert average_precision_at_k(predicted, actual) == pytest.approx(expected)


def test_map_and_top_k_over_queries() -> None:
    predictions = [["a", "b"], ["b", "a"], ["c", "d"]]
    truths = ["a", "a", "a"]
    assert map_at_k(predictions, truths) == pytest.approx((1 + 0.5 + 0) / 3)
    assert top_k_accuracy(predictions, truths, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(predictions, truths, 5) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions for 3 truths"):
        map_at_k(predictions[:2], truths)


def test_rank_individuals_counts_each_individual_once_by_best_photo() -> None:
    scores = np.array([0.9, 0.85, 0.8, 0.7, 0.6, 0.5])
    identities = ["a", "a", "b", "a", "c", "d"]
    image_ids = [10, 11, 12, 13, 14, 15]
    assert rank_individuals(scores, identities, k=3, image_ids=image_ids) == [
        Hit("a", 0.9, 10), Hit("b", 0.8, 12), Hit("c", 0.6, 14)]  # each individual's best photo is its evidence


def test_new_turtle_is_inserted_where_similarity_falls_below_threshold() -> None:
    ranking = [Hit("a", 0.9), Hit("b", 0.7), Hit("c", 0.5), Hit("d", 0.4), Hit("e", 0.3)]
    assert insert_new_turtle(ranking, 0.6) == ["a", "b", NEW_TURTLE, "c", "d"]
    assert insert_new_turtle(ranking, 0.95) == [NEW_TURTLE, "a", "b", "c", "d"]
    assert insert_new_turtle(ranking, 0.1) == ["a", "b", "c", "d", "e"]  # no room left in the top five
    assert insert_new_turtle(ranking[:2], 0.1) == ["a", "b", NEW_TURTLE]
    assert insert_new_turtle(ranking, None) == ["a", "b", "c", "d", "e"]


def test_calibrated_threshold_separates_known_from_unknown() -> None:
    # known queries match their individual at ~0.8; unknown queries' best match is ~0.4
    rankings = [[Hit("a", 0.82), Hit("b", 0.3)], [Hit("b", 0.78), Hit("a", 0.2)], [Hit("a", 0.41), Hit("b", 0.35)],
                [Hit("b", 0.38), Hit("a", 0.1)]]
    truths = ["a", "b", NEW_TURTLE, NEW_TURTLE]
    threshold, score = calibrate_threshold(rankings, truths)
    assert 0.41 < threshold <= 0.78
    assert score == pytest.approx(1.0)
    assert [insert_new_turtle(r, threshold)[0] for r in rankings] == truths


def test_a_runner_up_close_behind_raises_the_new_turtle_bar() -> None:
    """Two answers with the same best score: the one whose second individual scores alike is the new turtle."""
    stands_out, look_alike = [Hit("a", 0.7), Hit("b", 0.2)], [Hit("c", 0.7), Hit("d", 0.65)]
    assert insert_new_turtle(stands_out, 0.5) == ["a", NEW_TURTLE, "b"]  # weight 0: the plain threshold
    assert insert_new_turtle(look_alike, 0.5) == ["c", "d", NEW_TURTLE]
    # bar = 0.5 + 0.5 x runner-up: 0.6 for the first answer (0.7 passes), 0.825 for the second (0.7 does not)
    assert insert_new_turtle(stands_out, 0.5, runner_up_weight=0.5) == ["a", NEW_TURTLE, "b"]
    assert insert_new_turtle(look_alike, 0.5, runner_up_weight=0.5) == [NEW_TURTLE, "c", "d"]
    assert new_turtle_bar(look_alike, 0.5, 0.5) == pytest.approx(0.825)
    assert new_turtle_bar([Hit("a", 0.7)], 0.5, 0.5) == pytest.approx(0.5)  # no runner-up: the threshold


def test_calibration_with_a_runner_up_weight_separates_what_the_best_score_alone_cannot() -> None:
    """Known and unknown queries with the same best scores, told apart only by how close the runner-up is."""
    rankings = [[Hit("a", 0.7), Hit("b", 0.2)], [Hit("b", 0.6), Hit("a", 0.1)],
                [Hit("a", 0.7), Hit("b", 0.68)], [Hit("b", 0.6), Hit("a", 0.58)]]
    truths = ["a", "b", NEW_TURTLE, NEW_TURTLE]
    _, plain = calibrate_threshold(rankings, truths)
    threshold, weighted = calibrate_threshold(rankings, truths, runner_up_weight=1.0)
    assert plain < 1.0 and weighted == pytest.approx(1.0)
    assert [insert_new_turtle(r, threshold, runner_up_weight=1.0)[0] for r in rankings] == truths


def test_a_threshold_fitted_for_balanced_accuracy_flags_what_map5_would_rank() -> None:
    """MAP@5 credits an unknown query's new_turtle at rank 2 and a known one's individual behind it; balanced accuracy
    reads only the first answer. On the same answers the two objectives choose different thresholds, each the best
    for its own score (worked by hand: MAP@5 0.8 for thresholds in (0.3, 0.55], balanced accuracy 2/3 in (0.6, 0.9])."""
    rankings = [[Hit("a", 0.9), Hit("b", 0.1)],   # known a, right and clear
                [Hit("b", 0.55), Hit("a", 0.5)],  # known b, right but weak
                [Hit("a", 0.7), Hit("c", 0.65)],  # known c, wrong individual first
                [Hit("a", 0.6), Hit("b", 0.2)],   # a new turtle that resembles a
                [Hit("b", 0.3), Hit("a", 0.2)]]   # a new turtle like no one
    truths = ["a", "b", "c", NEW_TURTLE, NEW_TURTLE]
    by_map5, map5 = calibrate_threshold(rankings, truths)
    by_balance, balance = calibrate_threshold(rankings, truths, objective="balanced_accuracy")
    assert (by_map5, map5) == pytest.approx((0.425, 0.8))
    assert (by_balance, balance) == pytest.approx((0.75, 2 / 3))
    assert [insert_new_turtle(r, by_balance)[0] for r in rankings] == ["a"] + [NEW_TURTLE] * 4
    assert [insert_new_turtle(r, by_map5)[0] for r in rankings] == ["a", "b", "a", "a", NEW_TURTLE]
    # with no unknown query there is nothing to flag: the threshold accepts every first answer
    threshold, accuracy = calibrate_threshold(rankings[:3], truths[:3], objective="balanced_accuracy")
    assert accuracy == pytest.approx(2 / 3) and threshold <= 0.55
    with pytest.raises(ValueError, match="objective must be one of map5, balanced_accuracy, got 'accuracy'"):
        calibrate_threshold(rankings, truths, objective="accuracy")


# answers with only known (or only unknown) queries score the accuracy of those, after numpy warns of the empty half
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("objective", ["map5", "balanced_accuracy"])
@pytest.mark.parametrize("runner_up_weight", [0.0, 0.5, 1.0])
def test_the_calibrated_threshold_earns_the_score_returned_beside_it(objective: str, runner_up_weight: float) -> None:
    """The score calibration reports is what the answers at its threshold score, cosines of either sign included:
    a runner-up with a negative cosine lifts the bar's scale above 1, and a threshold clipped to 1 once accepted
    the new turtle it had been fitted to flag."""
    from reid.evaluation import open_set_scores

    rng = np.random.default_rng(0)
    for _ in range(200):
        queries = int(rng.integers(1, 8))
        rankings = [[Hit(name, float(score)) for name, score in zip(rng.permutation(list("abcdef"))[:3],
                                                                      np.sort(rng.uniform(-1, 1, 3))[::-1])]
                    for _ in range(queries)]
        truths = [str(rng.choice(["a", "b", "c", NEW_TURTLE])) for _ in range(queries)]
        threshold, score = calibrate_threshold(rankings, truths, runner_up_weight=runner_up_weight,
                                               objective=objective)
        answers = [insert_new_turtle(r, threshold, runner_up_weight=runner_up_weight) for r in rankings]
        earned = (map_at_k(answers, truths) if objective == "map5" else
                  open_set_scores(rankings, answers, truths, runner_up_weight)["balanced_accuracy"])
        assert earned == pytest.approx(score), (rankings, truths, threshold)
