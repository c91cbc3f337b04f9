"""Which way of fusing the two scores tells a new turtle from a known one best? And where are the answers lost?

    .venv/bin/python bench/open_set_levers.py --checkpoint C [--split image --val-fraction 0.33 --seed N]
        [--max-keypoints 3000] [--test-crops 0.5] [--affine-fallback 20] [--objective balanced_accuracy]

The checkpoint's validation photos are verified against its training photos exactly as ``reid fit --verify``
does it (:func:`reid.verification.verification_from_validation`'s steps: a fusion learnt on the training photos
alone, then the new_turtle threshold fitted and scored on folds of validation individuals held out of the gallery),
once per fusion variant:

* ``mean``: the default, the mean of the two calibrated probabilities (WildFusion), inlier counts under
  ``--inlier-floor`` (:data:`reid.verification.DEFAULT_INLIER_FLOOR`) read as 0, as ``reid fit --verify`` stores it;
* ``log-odds``: the calibrated probabilities combined as a sum of log-odds (naive Bayes) (this and the next two
  read the counts under the default's floor as 0 too);
* ``max``: the larger of the two probabilities;
* ``logistic``: a logistic regression on the two calibrated log-odds, fitted on the same training pairs;
* ``floor-N``: the mean with other floors (``--floors``; ``floor-0`` reads every count, the fusion before the floor).

Each variant is printed with its closed-set verified MAP@5 and top-1, and its held-out balanced accuracy and AUROC.
``--objective`` fits each fold's threshold for ``map5`` or ``balanced_accuracy`` (default: what the checkpoint's
``model.threshold_objective`` says ``reid fit`` fits for).
Then the diagnosis of the default fusion: how the known queries of the held-out folds are lost (wrong individual
at rank 1, or right but flagged new_turtle) and how many unknown ones are accepted, split by whether the best
individual was matched geometrically (``--match-inliers``, 10 by default: more than random matches reach) or the
answer rests on the cosine alone; and, for every closed-set rank-1 error, the most inliers the query reaches
against *any* training photo of its own individual: when that is low, no re-weighting of the scores can find the
match.

Two levers outside the fusion can be scored the same way: ``--max-keypoints N`` extracts (and learns the fusion
on) N SIFT keypoints a photo instead of 1,500, and ``--test-crops F`` embeds every photo with its centre crops of
fraction F (``model.test_crops``) in place of the checkpoint's own preprocessing.

``--affine-fallback N`` scores a third, verification's ASIFT fallback (:class:`reid.verification.Fallback`, what
``reid fit --verify_fallback N`` stores): where none of a query's verified photos reaches ``--match-inliers``, its N
most similar photos are matched again under simulated camera tilts, and a count replaces the plain one where it is
larger and reaches ``--match-inliers`` too; the fusion stays the one learnt on plain SIFT pairs. Those features are
extracted only for the photos a fallback needs (into ``$REID_FEATURE_CACHE``), and their counts kept in
``--cache-dir`` like the plain ones.

Inlier counts are kept in ``--cache-dir`` keyed by the two photos' paths and the extraction, so a second checkpoint
of the same photos only matches the pairs the first did not. The split options must be those the checkpoint was
trained with (the file's split by default).
"""

from __future__ import annotations

import argparse
import logging
import pickle
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from runner_up_weight import add_split_arguments, validation_sets
from verification_quality import log_odds
from sklearn.linear_model import LogisticRegression

from reid.evaluation import HeldOutCalibration, calibrate_on_held_out_individuals, score_rankings, search_gallery
from reid.fileio import write_atomically
from reid.local_features import DEFAULT_MAX_KEYPOINTS, Extraction, LocalFeatures, match_features
from reid.metrics import NEW_TURTLE, THRESHOLD_OBJECTIVES
from reid.verification import (DEFAULT_INLIER_FLOOR, Fallback, FallbackFeatures, FeaturesOnDemand, Fusion,
                               LocalVerifier, extract_all, fusion_from_pairs, fusion_training_pairs)

log = logging.getLogger("open_set_levers")

class InlierCache:
    """Inlier counts of (query photo, gallery photo) pairs keyed by their paths, kept on disk between runs (a pickle
    this bench wrote itself)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts: dict[tuple[str, str], int] = pickle.loads(path.read_bytes()) if path.exists() else {}

    def count(self, query: tuple[str, LocalFeatures], photo: tuple[str, LocalFeatures]) -> int:
        key = (query[0], photo[0])
        if key not in self.counts:
            self.counts[key] = match_features(query[1], photo[1]).inliers
        return self.counts[key]

    def save(self) -> None:
        write_atomically(self.path, pickle.dumps(self.counts))


class Variant:
    """A fusion rule over the default fusion's two calibrations, reading inlier counts under its floor as 0 as it
    does (the verifier only calls it and reads ``candidates`` and ``fallback``, both the default fusion's)."""

    def __init__(self, base: Fusion, rule: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        self.candidates, self.fallback, self.floor, self.rule = base.candidates, base.fallback, base.inlier_floor, rule

    def __call__(self, similarities: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        counts = np.asarray(inliers, np.float64)
        return self.rule(np.asarray(similarities, np.float64), np.where(counts < self.floor, 0.0, counts))


def variants(base: Fusion, pairs: tuple[np.ndarray, np.ndarray, np.ndarray], floors: list[int]) -> dict[str, object]:
    """The fusions compared, each built on the same calibrations (and, for ``logistic``, the same training pairs)."""
    similarity, inliers = base.similarity, base.inliers

    def both(s: np.ndarray, i: np.ndarray) -> np.ndarray:
        return np.stack([log_odds(similarity(s)), log_odds(inliers(i))], axis=1)

    logistic = LogisticRegression().fit(both(pairs[0], pairs[1]), pairs[2])
    found: dict[str, object] = {
        "mean": base,
        "log-odds": Variant(base, lambda s, i: 1 / (1 + np.exp(-both(s, i).sum(axis=1)))),
        "max": Variant(base, lambda s, i: np.maximum(similarity(s), inliers(i))),
        "logistic": Variant(base, lambda s, i: logistic.predict_proba(both(s, i))[:, 1]),
    }
    for floor in floors:
        found[f"floor-{floor}"] = replace(base, inlier_floor=floor)
    return found


def print_by_geometric_match(held_out: HeldOutCalibration, match_inliers: int) -> None:
    """The held-out folds' answers split by whether the best-ranked individual was matched geometrically (at least
    ``match_inliers`` inliers): where the fused score has local evidence, and where it rests on the cosine alone."""
    print("\n| held-out answers: best individual's inliers | known queries | right, accepted | right, flagged | "
          "wrong individual at rank 1 | unknown queries | unknown, accepted |")
    print("|---|---|---|---|---|---|---|")
    for matched in (True, False):
        outcome: Counter[str] = Counter()
        for ranking, truth, labels in zip(held_out.rankings, held_out.truths, held_out.predictions):
            if (bool(ranking) and (ranking[0].inliers or 0) >= match_inliers) != matched:
                continue
            if truth == NEW_TURTLE:
                outcome["unknown"] += 1
                outcome["unknown, accepted"] += labels[0] != NEW_TURTLE
            else:
                outcome["known"] += 1
                outcome["wrong" if ranking[0].individual != truth else
                        "right, accepted" if labels[0] == truth else "right, flagged"] += 1
        print(f"| {'>=' if matched else '<'} {match_inliers} | "
              + " | ".join(str(outcome[key]) for key in ("known", "right, accepted", "right, flagged", "wrong",
                                                          "unknown", "unknown, accepted")) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(parser)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/verification_cache"))
    parser.add_argument("--max-keypoints", type=int, default=DEFAULT_MAX_KEYPOINTS,
                        help="SIFT keypoints a photo (the fusion is learnt for this extraction)")
    parser.add_argument("--inlier-floor", type=int, default=DEFAULT_INLIER_FLOOR,
                        help="the default fusion's floor: inlier counts under it read as 0")
    parser.add_argument("--floors", type=int, nargs="*", default=[0], help="other inlier floors to score")
    parser.add_argument("--match-inliers", type=int, default=10,
                        help="inliers from which the diagnosis calls a best answer a geometric match")
    parser.add_argument("--objective", choices=THRESHOLD_OBJECTIVES,
                        help="what each held-out fold's threshold maximises on the other folds (default: the "
                             "checkpoint's model.threshold_objective, as `reid fit` fits it)")
    parser.add_argument("--affine-fallback", type=int, default=0, metavar="N",
                        help="where no verified photo of a query reaches --match-inliers, match its N most similar "
                             "again with simulated tilts (ASIFT); 0: off")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    embedder, gallery, gallery_vectors, queries, query_vectors = validation_sets(args)
    runner_up_weight = embedder.runner_up_weight  # what `reid fit` fitted its thresholds with
    objective = args.objective or embedder.threshold_objective
    extraction = Extraction(max_keypoints=args.max_keypoints)
    gallery_paths, query_paths = gallery["path"].tolist(), queries["path"].tolist()
    gallery_ids, query_ids = gallery["identity"].tolist(), queries["identity"].tolist()
    gallery_features = list(zip(gallery_paths, extract_all(gallery_paths, extraction, True)))
    query_features = list(zip(query_paths, extract_all(query_paths, extraction, True)))
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    cache = InlierCache(args.cache_dir / f"inliers_{extraction.method}_{extraction.max_side}.pkl")
    fallback = Fallback(args.affine_fallback, args.match_inliers) if args.affine_fallback else None
    if fallback is not None:
        tilted = fallback.extraction
        affine_cache = InlierCache(args.cache_dir / f"inliers_{tilted.method}_{tilted.max_side}.pkl")
        affine_gallery, affine_queries = FeaturesOnDemand(gallery_paths, tilted), FeaturesOnDemand(query_paths, tilted)

    def gallery_pair(i: int, j: int) -> int:
        return cache.count(gallery_features[i], gallery_features[j])

    def verifier_for(fusion: object) -> Callable[[np.ndarray, np.ndarray], LocalVerifier]:
        def build(gallery_rows: np.ndarray, query_rows: np.ndarray) -> LocalVerifier:
            # the verifier's memo is the cache itself, keyed by the two photos' paths
            verifier = (fusion, lambda i: gallery_features[int(gallery_rows[i])][1],
                        [query_features[int(r)][1] for r in query_rows], cache.counts,
                        lambda q, i: (query_paths[int(query_rows[q])], gallery_paths[int(gallery_rows[i])]))
            if fallback is None:
                return LocalVerifier(*verifier)
            return LocalVerifier(*verifier, fallback=FallbackFeatures(
                lambda i: affine_gallery[int(gallery_rows[i])], lambda q: affine_queries[int(query_rows[q])],
                affine_cache.counts))
        return build

    pairs = fusion_training_pairs(gallery_vectors, gallery_ids, [f for _, f in gallery_features], progress=True,
                                  pair_inliers=gallery_pair)
    base = replace(fusion_from_pairs(pairs, extraction=extraction, inlier_floor=args.inlier_floor), fallback=fallback)
    print(f"{args.checkpoint} (split {args.split}, seed {args.seed}): {len(queries)} validation photos against "
          f"{len(gallery)} training photos, {base.candidates} verified a query, "
          f"runner-up weight {runner_up_weight:g}, thresholds fitted for {objective}, inlier floor {base.inlier_floor}"
          + (f", ASIFT fallback on the {args.affine_fallback} most similar" if args.affine_fallback else "") + "\n")
    print("| fusion | verified MAP@5 | top-1 | held-out balanced accuracy | AUROC |")
    print("|---|---|---|---|---|")
    everything = np.arange(len(gallery_ids))
    for name, fusion in variants(base, pairs, args.floors).items():
        factory = verifier_for(fusion)
        closed = score_rankings(search_gallery(gallery_vectors, gallery_ids, query_vectors, 5,
                                               factory(everything, np.arange(len(query_ids)))),
                                query_ids, known=set(gallery_ids))
        held_out = calibrate_on_held_out_individuals(gallery_vectors, gallery_ids, query_vectors, query_ids,
                                                     seed=args.seed, verifier_for=factory,
                                                     runner_up_weight=runner_up_weight, objective=objective)
        scores = held_out.metrics
        print(f"| {name} | {closed.metrics['map5']:.3f} | {closed.metrics['top1']:.3f} | "
              f"{scores['balanced_accuracy']:.3f} | {scores['auroc']:.3f} |", flush=True)
        if name == "mean":
            default_closed, default_held_out = closed, held_out
        cache.save()
        if fallback is not None:
            affine_cache.save()

    default = default_held_out.metrics
    print(f"\nDefault fusion, held-out folds: known queries {default['known_accuracy']:.3f} right at rank 1 "
          f"and not flagged, unknown queries {default['unknown_accuracy']:.3f} flagged new_turtle; MAP@5 of the "
          f"answers with new_turtle placed by each fold's threshold {default['map5']:.3f}")
    print_by_geometric_match(default_held_out, args.match_inliers)
    errors = [q for q, (ranking, truth) in enumerate(zip(default_closed.rankings, default_closed.truths))
              if ranking and ranking[0].individual != truth]
    best_own = []
    for q in errors:
        own = [i for i, identity in enumerate(gallery_ids) if identity == query_ids[q]]
        best_own.append(max((cache.count(query_features[q], gallery_features[i]) for i in own), default=0))
    cache.save()
    print(f"Closed-set rank-1 errors: {len(errors)} of {len(query_ids)}; the most inliers each reaches against any "
          f"training photo of its own individual: {sorted(best_own, reverse=True)}")
    for q, inliers in zip(errors, best_own):
        hit = default_closed.rankings[q][0]
        print(f"  {query_paths[q]}: answered {hit.individual} (cosine {hit.similarity:.3f}, {hit.inliers} inliers); "
              f"its own individual {query_ids[q]}: at most {inliers} inliers")


if __name__ == "__main__":
    main()
