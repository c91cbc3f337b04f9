"""Search query photos against a gallery and score the answers: training validation, `reid evaluate` and
`reid calibrate` all go through here, and through the same FAISS gallery the service uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from reid.data.splits import split_by_image, split_by_individual
from reid.errors import DatasetError
from reid.identify import Threshold, Verifier, answer_from_ranking, identifier_over
from reid.metrics import (NEW_TURTLE, OBJECTIVE_NAMES, Individual, Ranking, ThresholdObjective, calibrate_threshold,
                          map_at_k, new_turtle_bar, runner_up_note, top_k_accuracy)


@dataclass
class RetrievalResult:
    """Rankings of every query, the truth each is scored against, and the scores a user reads."""

    rankings: list[Ranking]
    truths: list[Individual]
    metrics: dict[str, float] = field(default_factory=dict)


def search_gallery(gallery_embeddings: np.ndarray, gallery_identities: Sequence[Individual], query_embeddings: np.ndarray,
                   k: int = 5, verifier: Verifier | None = None) -> list[Ranking]:
    """Rank up to ``k`` individuals for each query through the service's own path (:class:`reid.identify.Identifier`);
    a hit's ``image_id`` is the row of its best-matching photo in ``gallery_embeddings``."""
    return identifier_over(gallery_embeddings, gallery_identities, verifier=verifier).rank(query_embeddings, k)


def score_rankings(rankings: list[Ranking], query_identities: Sequence[Individual], known: set[Individual],
                   threshold: float | None = None, k: int = 5, runner_up_weight: float = 0.0) -> RetrievalResult:
    """Insert new_turtle by ``threshold`` and score; queries of individuals not in ``known`` must be new_turtle.

    Reported: ``map5``, ``top1``, ``top5`` over all queries, and when some queries are unknown individuals,
    ``known_accuracy`` (top-1 right on known individuals), ``unknown_accuracy`` (new_turtle first on unknown
    ones) and their ``balanced_accuracy``.
    """
    truths = [identity if identity in known else NEW_TURTLE for identity in query_identities]
    predictions = [answer_from_ranking(ranking, Threshold(threshold, runner_up_weight=runner_up_weight), k).labels
                   for ranking in rankings]
    metrics = {
        "map5": map_at_k(predictions, truths, k),
        "top1": top_k_accuracy(predictions, truths, 1),
        "top5": top_k_accuracy(predictions, truths, 5),
        "queries": len(truths),
    }
    if NEW_TURTLE in truths:
        metrics.update(open_set_scores(rankings, predictions, truths, runner_up_weight))
    return RetrievalResult(rankings, truths, metrics)


def open_set_scores(rankings: Sequence[Ranking], predictions: Sequence[Sequence[Individual]],
                    truths: Sequence[Individual], runner_up_weight: float = 0.0) -> dict[str, float]:
    """``known_accuracy`` (top-1 right on known individuals), ``unknown_accuracy`` (new_turtle first on unknown
    ones), their ``balanced_accuracy`` and the ``auroc`` of the new_turtle score."""
    unknown = np.array([t == NEW_TURTLE for t in truths])
    first = np.array([bool(p) and p[0] == t for p, t in zip(predictions, truths)])
    scores = {"unknown_accuracy": float(first[unknown].mean()),
              "known_accuracy": float(first[~unknown].mean()) if (~unknown).any() else float("nan")}
    scores["balanced_accuracy"] = float(np.nanmean([scores["known_accuracy"], scores["unknown_accuracy"]]))
    scores["auroc"] = new_turtle_auroc(rankings, truths, runner_up_weight)
    return scores


def new_turtle_auroc(rankings: Sequence[Ranking], truths: Sequence[Individual], runner_up_weight: float = 0.0) -> float:
    """AUROC of the new_turtle score for telling unknown queries from known ones: 1.0 when every unknown query scores
    under every known one, whatever the threshold (nan: one class). The score is the negated margin that the
    threshold is compared with: the best individual's score less ``runner_up_weight`` times the runner-up's."""
    from sklearn.metrics import roc_auc_score

    unknown = np.array([t == NEW_TURTLE for t in truths])
    if unknown.all() or not unknown.any():
        return float("nan")
    best = np.array([ranking[0].score - new_turtle_bar(ranking, 0.0, runner_up_weight) if ranking else -np.inf
                     for ranking in rankings])
    return float(roc_auc_score(unknown, -np.nan_to_num(best, neginf=-2.0)))


@dataclass
class HeldOutCalibration:
    """A new_turtle threshold fitted on queries of individuals held out of the gallery, with the open-set scores it
    earned on *other* held-out individuals (cross-validated over folds of individuals)."""

    threshold: float
    metrics: dict[str, float]
    origin: str
    #: every fold's answers, each fold's queries in query order, that ``metrics`` scored: the rankings, the truths
    #: (NEW_TURTLE for the held-out fold's queries) and the labels answered under the fold's own threshold; kept
    #: so that a diagnosis can say which answers were lost and with what evidence
    rankings: list[Ranking]
    truths: list[Individual]
    predictions: list[list[Individual]]


#: Folds of validation individuals that `reid fit` holds out of the gallery in turn to fit its thresholds.
HELD_OUT_FOLDS = 4


def held_out_folds(gallery_identities: Sequence[Individual], query_identities: Sequence[Individual],
                   folds: int = HELD_OUT_FOLDS) -> int:
    """How many folds :func:`calibrate_on_held_out_individuals` deals the individuals into (0: too few to hold out)."""
    return _fold_count(len(set(gallery_identities) & set(query_identities)), folds)


def _fold_count(shared: int, folds: int) -> int:
    """Folds for ``shared`` individuals with both gallery photos and queries: at most one each, none below two."""
    return min(folds, shared) if shared >= 2 else 0


def calibrate_on_held_out_individuals(gallery_embeddings: np.ndarray, gallery_identities: Sequence[Individual],
                                      query_embeddings: np.ndarray, query_identities: Sequence[Individual],
                                      folds: int = HELD_OUT_FOLDS,
                                      seed: int = 0, k: int = 5, verifier_for: VerifierFactory | None = None,
                                      runner_up_weight: float = 0.0,
                                      objective: ThresholdObjective = "map5") -> HeldOutCalibration | None:
    """Fit the new_turtle threshold without any photo of a truly new individual, as `reid fit` does.

    The individuals with queries are dealt into ``folds`` seeded folds. Removing one fold's photos from the
    gallery turns its queries into new turtles; the threshold for that fold is calibrated on the *other* folds
    and scored on it, so the reported scores never grade a threshold on the individuals that chose it. The
    returned threshold is calibrated on all folds together. ``None`` when fewer than two individuals have both
    gallery photos and queries (there is nothing to hold out). ``verifier_for(gallery_rows, query_rows)`` adds
    local verification (rows of the gallery and query arrays), and the threshold is then one on fused scores.
    Every threshold is fitted to maximise ``objective`` (:data:`reid.metrics.ThresholdObjective`).
    """
    gallery_ids = np.asarray(gallery_identities, dtype=object)
    query_ids = np.asarray(query_identities, dtype=object)
    shared = sorted(set(gallery_ids) & set(query_ids))
    folds = _fold_count(len(shared), folds)
    if not folds:
        return None
    fold_of = {identity: i % folds for i, identity in enumerate(np.random.default_rng(seed).permutation(shared))}
    problems: list[tuple[list[Ranking], list[Individual]]] = []
    for fold in range(folds):
        held_out = {identity for identity, f in fold_of.items() if f == fold}
        keep = np.array([identity not in held_out for identity in gallery_ids])
        verifier = None if verifier_for is None else verifier_for(np.flatnonzero(keep), np.arange(len(query_ids)))
        rankings = search_gallery(gallery_embeddings[keep], gallery_ids[keep].tolist(), query_embeddings, k, verifier)
        problems.append((rankings, [NEW_TURTLE if t in held_out else t for t in query_ids]))
    scored_rankings: list[Ranking] = []
    scored_truths: list[Individual] = []
    predictions: list[list[Individual]] = []
    for fold, (rankings, truths) in enumerate(problems):
        others = [problem for f, problem in enumerate(problems) if f != fold]
        threshold, _ = calibrate_threshold([r for p in others for r in p[0]], [t for p in others for t in p[1]], k,
                                           runner_up_weight, objective)
        scored_rankings += rankings
        scored_truths += truths
        predictions += [answer_from_ranking(r, Threshold(threshold, runner_up_weight=runner_up_weight), k).labels
                        for r in rankings]
    metrics = {"map5": map_at_k(predictions, scored_truths, k),
               **open_set_scores(scored_rankings, predictions, scored_truths, runner_up_weight)}
    threshold, _ = calibrate_threshold(scored_rankings, scored_truths, k, runner_up_weight, objective)
    origin = (f"fitted for {OBJECTIVE_NAMES[objective]} on {len(shared)} individuals, each held out of the gallery "
              f"in turn ({folds} folds, seed {seed}"
              + runner_up_note(runner_up_weight, ", ")
              + f"); on held-out folds: balanced accuracy {metrics['balanced_accuracy']:.3f}, "
              f"AUROC {metrics['auroc']:.3f}")
    return HeldOutCalibration(threshold, metrics, origin, scored_rankings, scored_truths, predictions)


#: ``query_split`` value that ignores a dataset's split column and uses the seeded protocols instead.
IGNORE_SPLIT_COLUMN = "none"


@dataclass
class Protocol:
    """Which photos are gallery and which are queries; queries of individuals absent from the gallery are unknown."""

    gallery: np.ndarray
    queries: np.ndarray
    description: str


def query_split_for(splits: set[str]) -> str:
    """The queries a dataset's split column suggests: its ``test`` photos, else its ``val`` ones, else none (the
    seeded protocols). Never ``train``: the gallery would be left empty."""
    return "test" if "test" in splits else "val" if "val" in splits else IGNORE_SPLIT_COLUMN


def query_split_of(data: Path | str) -> str:
    """:func:`query_split_for` the split column of the dataset in ``data`` (a header read: no image is opened)."""
    from reid.data.records import read_dataset

    return query_split_for(set(read_dataset(data, check_images=False)["split"]))


def closed_and_open_protocols(records: pd.DataFrame, seed: int = 0, query_fraction: float = 0.25,
                              unknown_fraction: float = 0.25, query_split: str = "test") -> tuple[Protocol, Protocol]:
    """The closed-set and open-set protocols for a dataset.

    With a ``split`` column (unless ``query_split`` is ``"none"``), photos of ``query_split`` are the queries and
    all others the gallery; the open set is
    the same, its unknown queries being those of individuals with no gallery photo. Without one, queries are a
    seeded by-image split (the same split ``reid fit`` validates on for the same seed and fraction), and the
    open set also removes a seeded ``unknown_fraction`` of individuals from the gallery, so that all their photos
    must come back as new_turtle.
    """
    if query_split != IGNORE_SPLIT_COLUMN and (records["split"] != "").any():
        is_query = (records["split"] == query_split).to_numpy()
        if not is_query.any():
            other = query_split_for(set(records["split"]) - {query_split})
            raise DatasetError(f"no photos with split {query_split!r} to use as queries; the dataset's splits are "
                               f"{sorted(set(records['split']))}: "
                               + (f"--query-split {other} picks another, " if other != IGNORE_SPLIT_COLUMN else "")
                               + "--query-split none ignores the column")
        protocol = Protocol(np.flatnonzero(~is_query), np.flatnonzero(is_query), f"split column: {query_split} vs rest")
        return protocol, protocol
    by_image = (split_by_image(records, query_fraction, seed) == "val").to_numpy()
    closed = Protocol(np.flatnonzero(~by_image), np.flatnonzero(by_image), f"by image, seed {seed}")
    unknown = (split_by_individual(records, unknown_fraction, seed) == "val").to_numpy()
    open_set = Protocol(np.flatnonzero(~by_image & ~unknown), np.flatnonzero(by_image | unknown),
                        f"{int(records.loc[unknown, 'identity'].nunique())} individuals held out of the gallery, seed {seed}")
    return closed, open_set


#: Builds the local verifier of one protocol from its gallery rows and query rows (rows of the record table).
VerifierFactory = Callable[[np.ndarray, np.ndarray], Verifier]


def run_protocol(embeddings: np.ndarray, identities: Sequence[str], protocol: Protocol, threshold: float | None,
                 k: int = 5, verifier_for: VerifierFactory | None = None) -> RetrievalResult:
    """Search the protocol's queries against its gallery and score them."""
    identities = np.asarray(identities, dtype=object)
    gallery_ids = identities[protocol.gallery].tolist()
    verifier = None if verifier_for is None else verifier_for(protocol.gallery, protocol.queries)
    rankings = search_gallery(embeddings[protocol.gallery], gallery_ids, embeddings[protocol.queries], k, verifier)
    return score_rankings(rankings, identities[protocol.queries].tolist(), known=set(gallery_ids), threshold=threshold, k=k)


def evaluate(embeddings: np.ndarray, records: pd.DataFrame, threshold: Threshold, seed: int = 0,
             query_fraction: float = 0.25, unknown_fraction: float = 0.25, query_split: str = "test",
             verifier_for: VerifierFactory | None = None, objective: ThresholdObjective = "map5") -> dict[str, object]:
    """Closed-set and open-set scores of embedded records, as ``reid evaluate`` reports them.

    The closed set counts only queries of individuals that have gallery photos. The open set is scored at
    ``threshold`` (the checkpoint's calibrated one, or the user's); the best threshold for *this* data is reported
    beside it as ``oracle_threshold`` (fitted for ``objective``; optimistic, for comparison only) and used when there
    is no threshold. When no query shows an individual missing from the gallery, there is no open set to score and
    ``open_set`` is ``None``.
    Likewise ``closed_set`` is ``None`` when no query shows an individual of the gallery (e.g. a ``split`` column
    whose test photos are all of new individuals): a score of 0 would read as a model that finds nothing.
    ``verifier_for(gallery_rows, query_rows)`` adds local verification to both protocols.
    """
    closed, open_set = closed_and_open_protocols(records, seed, query_fraction, unknown_fraction, query_split)
    identities = np.asarray(records["identity"].tolist(), dtype=object)
    known_closed = np.isin(identities[closed.queries], identities[closed.gallery])
    closed = Protocol(closed.gallery, closed.queries[known_closed], closed.description)
    closed_scores = None
    if len(closed.queries):
        closed_result = run_protocol(embeddings, identities.tolist(), closed, threshold=None, verifier_for=verifier_for)
        closed_scores = {**closed_result.metrics, "protocol": closed.description}
    report: dict[str, object] = {
        "closed_set": closed_scores,
        "open_set": None,
        "threshold": threshold.value,
        "threshold_source": threshold.source,
        "threshold_origin": threshold.origin,
        "runner_up_weight": threshold.runner_up_weight,
        "threshold_objective": objective,
        "oracle_threshold": None,
    }
    open_plain = run_protocol(embeddings, identities.tolist(), open_set, threshold=None, verifier_for=verifier_for)
    if NEW_TURTLE not in open_plain.truths:
        return report
    oracle, _ = calibrate_threshold(open_plain.rankings, open_plain.truths, runner_up_weight=threshold.runner_up_weight,
                                    objective=objective)
    if threshold.value is None:
        report.update(threshold=oracle, threshold_source="oracle",
                      threshold_origin="the best threshold for this very data (optimistic): the checkpoint has none")
    open_result = score_rankings(open_plain.rankings, identities[open_set.queries].tolist(),
                                 known=set(identities[open_set.gallery]), threshold=report["threshold"],
                                 runner_up_weight=threshold.runner_up_weight)
    report.update(open_set={**open_result.metrics, "protocol": open_set.description}, oracle_threshold=oracle)
    return report


def calibrate(embeddings: np.ndarray, records: pd.DataFrame, seed: int = 0, query_fraction: float = 0.25,
              unknown_fraction: float = 0.25, query_split: str = "test", verifier_for: VerifierFactory | None = None,
              runner_up_weight: float = 0.0, objective: ThresholdObjective = "map5") -> tuple[float, float, str]:
    """The new_turtle threshold that maximises ``objective`` (open-set MAP@5 by default) on ``records``:
    (threshold, that score, protocol)."""
    _, open_set = closed_and_open_protocols(records, seed, query_fraction, unknown_fraction, query_split)
    result = run_protocol(embeddings, records["identity"].tolist(), open_set, threshold=None, verifier_for=verifier_for)
    if all(t != NEW_TURTLE for t in result.truths):
        raise DatasetError("calibration needs queries of individuals absent from the gallery; with this split column "
                           "every query's individual is in the gallery: --query-split none holds a seeded share of "
                           "the individuals out instead (or mark test photos of individuals not in train/val)"
                           if query_split != IGNORE_SPLIT_COLUMN and (records["split"] != "").any() else
                           "calibration needs queries of individuals absent from the gallery; this data has none")
    threshold, score = calibrate_threshold(result.rankings, result.truths, runner_up_weight=runner_up_weight,
                                           objective=objective)
    return threshold, score, open_set.description
