"""Verification of a query's top candidates by local features, fused with the embedding similarity.

WildFusion (Cermak et al., 2024) showed that a deep embedding and local-feature matching make different mistakes,
and that each score should first be turned into a probability of "same individual" (isotonic regression on
training pairs) before they are combined. This module learns that :class:`Fusion` from training photos and
provides the :class:`LocalVerifier` that :class:`reid.identify.Identifier` calls: it verifies only the most
similar gallery photos, whose features were extracted once (at enrolment, or once per dataset), never per query.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from reid.gallery import Gallery
from reid.imageio import decode_image
from reid.errors import FeatureError
from reid.fileio import write_atomically
from reid.local_features import DEFAULT_MAX_KEYPOINTS, FORMAT_VERSION, Extraction, LocalFeatures, match_features
from reid.score_calibration import ScoreCalibration

log = logging.getLogger(__name__)

#: Photos verified per query. On turtles_dev the true individual is already among the 20 most similar photos for
#: 98.7-100% of queries, but verifying 80 finds a better-matching photo of it more often: verified MAP@5 rose for 9
#: of the 10 checkpoints measured and held for the tenth; +0.017 over the five runs of the default recipe
#: (bench/verification_quality.py --top; README, "How many photos to verify"). Each photo costs one match (~11 ms
#: with equalised features at 1024 px on one idle core of the 2-core development machine), so a query's matching
#: costs 4x what 20 cost.
DEFAULT_CANDIDATES = 80
#: Environment variable naming the folder of cached local features of dataset photos.
FEATURE_CACHE_ENV = "REID_FEATURE_CACHE"


@dataclass(frozen=True)
class Fusion:
    """How a (similarity, inliers) pair becomes one score: the mean of both calibrated probabilities.

    ``extraction`` is how the local features whose inliers it calibrated were extracted: queries and gallery photos
    are extracted the same way, so that the calibration holds.
    """

    similarity: ScoreCalibration
    inliers: ScoreCalibration
    candidates: int = DEFAULT_CANDIDATES
    extraction: Extraction = Extraction()

    def __call__(self, similarities: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        return (self.similarity(np.asarray(similarities, np.float64))
                + self.inliers(np.asarray(inliers, np.float64))) / 2

    def to_dict(self) -> dict[str, Any]:
        """Plain values, so the fusion travels inside a checkpoint read with ``weights_only=True``."""
        return {"similarity": self.similarity.to_dict(), "inliers": self.inliers.to_dict(),
                "candidates": self.candidates, "max_side": self.extraction.max_side,
                "equalise": self.extraction.equalise, "max_keypoints": self.extraction.max_keypoints}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fusion:
        """A fusion stored before features were equalised has no ``equalise``: it keeps extracting without, as it
        was calibrated; one stored before the keypoint budget was a setting used the default budget."""
        extraction = Extraction(int(data["max_side"]), bool(data.get("equalise", False)),
                                int(data.get("max_keypoints", DEFAULT_MAX_KEYPOINTS)))
        return cls(ScoreCalibration.from_dict(data["similarity"]), ScoreCalibration.from_dict(data["inliers"]),
                   int(data["candidates"]), extraction)


def feature_cache_dir() -> Path:
    """Where the local features of dataset photos are kept: ``$REID_FEATURE_CACHE``, else
    ``~/.cache/turtle-reid/local_features``."""
    return Path(os.environ.get(FEATURE_CACHE_ENV) or Path.home() / ".cache" / "turtle-reid" / "local_features")


def _cached_file(image: Path, extraction: Extraction) -> Path:
    """The cache entry of one photo file: keyed by its path, size and modification time, so an edited photo misses,
    and by how it is extracted."""
    stat = image.stat()
    key = hashlib.sha256(f"{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{extraction.max_side}|"
                         f"{extraction.method}|{FORMAT_VERSION}".encode())
    digest = key.hexdigest()
    return feature_cache_dir() / digest[:2] / f"{digest}.bin"


def _features_of_file(image: Path, extraction: Extraction) -> LocalFeatures:
    """Extract once, then read back: extraction costs ~0.2-0.4 s a photo on a CPU, reading ~2 ms."""
    cached = _cached_file(image, extraction)
    if cached.is_file():
        try:
            return LocalFeatures.from_bytes(cached.read_bytes())
        except FeatureError:
            log.warning("unreadable cached features %s: extracting again", cached)
    features = extraction.extract(decode_image(image))
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(cached, features.to_bytes())
    return features


def extract_all(images: Sequence[str | Path | np.ndarray], extraction: Extraction = Extraction(),
                progress: bool = False) -> list[LocalFeatures]:
    """Local features of image files (cached on disk, see :func:`feature_cache_dir`) or decoded RGB arrays."""
    return [extraction.extract(image) if isinstance(image, np.ndarray)
            else _features_of_file(Path(image), extraction)
            for image in tqdm(images, desc="local features", unit="photo", disable=not progress)]


class LocalVerifier:
    """The :class:`reid.identify.Verifier` of one set of queries against one gallery.

    ``gallery_features(image_id)`` returns a gallery photo's cached features; ``query_features[q]`` are the
    features of query number ``q`` (extracted once per query). Each pair's inlier count is kept in ``memo`` under
    ``pair_key(query, image_id)``: a factory shares one memo between the verifiers of several protocols over the same
    photos, so a pair matched by one is not matched again by the next.
    """

    def __init__(self, fusion: Fusion, gallery_features: Callable[[int], LocalFeatures],
                 query_features: Sequence[LocalFeatures], memo: dict[tuple[int, int], int] | None = None,
                 pair_key: Callable[[int, int], tuple[int, int]] = lambda query, image_id: (query, image_id)) -> None:
        self.fusion = fusion
        self.candidates = fusion.candidates
        self.gallery_features = gallery_features
        self.query_features = query_features
        self.memo = {} if memo is None else memo
        self.pair_key = pair_key

    def _inliers(self, query: int, image_id: int) -> int:
        key = self.pair_key(query, image_id)
        if key not in self.memo:
            self.memo[key] = match_features(self.query_features[query], self.gallery_features(image_id)).inliers
        return self.memo[key]

    def inliers(self, query: int, image_ids: np.ndarray) -> np.ndarray:
        return np.array([self._inliers(query, int(i)) for i in image_ids], dtype=np.int64)

    def fuse(self, similarities: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        return self.fusion(similarities, inliers)


def verifier_factory(fusion: Fusion, features: Sequence[LocalFeatures],
                     query_features: Sequence[LocalFeatures] | None = None,
                     memo: dict[tuple[int, int], int] | None = None
                     ) -> Callable[[np.ndarray, np.ndarray], LocalVerifier]:
    """The verifier of any (gallery rows, query rows) pair of one set of photos whose features are ``features``.

    Query rows index ``query_features`` when the queries are separate photos (as in `reid predict`), else
    ``features`` too (the protocols of `reid evaluate` and `reid calibrate` draw both sides from one dataset).
    A ``memo`` keeps every (query row, gallery row) pair's inliers across the verifiers the factory builds.
    """
    queries = features if query_features is None else query_features

    def build(gallery_rows: np.ndarray, query_rows: np.ndarray) -> LocalVerifier:
        return LocalVerifier(fusion, lambda i: features[int(gallery_rows[i])], [queries[int(r)] for r in query_rows],
                             memo, lambda q, i: (int(query_rows[q]), int(gallery_rows[i])))

    return build


#: The inlier count of photos ``(i, j)`` (rows of the photos a fusion is fitted on).
PairInliers = Callable[[int, int], int]


def fusion_training_pairs(embeddings: np.ndarray, identities: Sequence[str], features: Sequence[LocalFeatures],
                          candidates: int = DEFAULT_CANDIDATES, progress: bool = False,
                          pair_inliers: PairInliers | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labelled pairs a fusion is learnt from: each training photo as a query against all the others.

    Its ``candidates`` most similar other photos are verified exactly as a real query's would be. Returns each
    pair's cosine similarity, inlier count and whether both photos show the same individual. ``pair_inliers``
    replaces matching ``features`` when the caller already has the counts (bench/open_set_levers.py keeps them
    across runs, so that comparing fusions on the same photos costs no matching).
    """
    count = pair_inliers or (lambda i, j: match_features(features[i], features[j]).inliers)
    gallery = Gallery(int(embeddings.shape[1]))
    gallery.add(np.arange(len(identities)), embeddings, list(identities))
    scores, ids = gallery.search_photos(embeddings, candidates + 1)
    similarities, inliers, same = [], [], []
    for q in tqdm(range(len(identities)), desc="fitting the fusion", unit="photo", disable=not progress):
        for score, i in zip(scores[q], ids[q]):
            if i < 0 or i == q:
                continue
            similarities.append(float(score))
            inliers.append(count(q, int(i)))
            same.append(identities[q] == identities[int(i)])
    return np.array(similarities), np.array(inliers, dtype=np.int64), np.array(same, dtype=bool)


def fusion_from_pairs(pairs: tuple[np.ndarray, np.ndarray, np.ndarray], candidates: int = DEFAULT_CANDIDATES,
                      extraction: Extraction = Extraction()) -> Fusion:
    """Calibrate each score of :func:`fusion_training_pairs`'s labelled pairs by isotonic regression (WildFusion's
    recipe); ``candidates`` and ``extraction`` are how the pairs were drawn and their features extracted."""
    similarities, inliers, same = pairs
    return Fusion(ScoreCalibration.fit(similarities, same, name="cosine"),
                  ScoreCalibration.fit(inliers, same, name="inliers"), candidates, extraction)


def fit_fusion(embeddings: np.ndarray, identities: Sequence[str], features: Sequence[LocalFeatures],
               candidates: int = DEFAULT_CANDIDATES, extraction: Extraction = Extraction(),
               progress: bool = False) -> Fusion:
    """Learn the fusion from training photos alone: their labelled pairs (:func:`fusion_training_pairs`), each score
    calibrated (:func:`fusion_from_pairs`). ``features`` were extracted by ``extraction``."""
    pairs = fusion_training_pairs(embeddings, identities, features, candidates, progress)
    fusion = fusion_from_pairs(pairs, candidates, extraction)
    log.info("fusion fitted on %d pairs of %d training photos (%d of the same individual)", len(pairs[2]),
             len(identities), int(np.sum(pairs[2])))
    return fusion


def verification_from_validation(gallery_embeddings: np.ndarray, gallery_identities: Sequence[str],
                                 gallery_features: Sequence[LocalFeatures], query_embeddings: np.ndarray,
                                 query_identities: Sequence[str], query_features: Sequence[LocalFeatures],
                                 candidates: int = DEFAULT_CANDIDATES, extraction: Extraction = Extraction(),
                                 seed: int = 0, progress: bool = False, runner_up_weight: float = 0.0
                                 ) -> tuple[Verification, dict[str, float]]:
    """What `reid fit --verify` stores, from the photos its validation uses (training photos as the gallery).

    The fusion is learnt on the gallery photos alone, each against the others (:func:`fit_fusion`); the new_turtle
    threshold on fused scores is fitted like fit's similarity threshold, on validation individuals held out of the
    gallery in turn, so the reported open-set scores never grade a threshold on the individuals that chose it.
    Returns the verification and the verified validation scores (closed-set MAP@5 and top-1, and the held-out
    balanced accuracy and AUROC when there were individuals to hold out). Each (query, photo) pair is matched once.
    """
    from reid.evaluation import calibrate_on_held_out_individuals, score_rankings, search_gallery

    fusion = fit_fusion(gallery_embeddings, gallery_identities, gallery_features, candidates, extraction, progress)
    factory = verifier_factory(fusion, gallery_features, query_features, memo={})
    log.info("verifying %d validation photos against their %d most similar training photos, then again with each "
             "validation individual held out in turn", len(query_identities), candidates)
    closed = score_rankings(
        search_gallery(gallery_embeddings, gallery_identities, query_embeddings, 5,
                       factory(np.arange(len(gallery_identities)), np.arange(len(query_identities)))),
        list(query_identities), known=set(gallery_identities))
    metrics = {"map5": closed.metrics["map5"], "top1": closed.metrics["top1"]}
    calibration = calibrate_on_held_out_individuals(gallery_embeddings, gallery_identities, query_embeddings,
                                                    query_identities, seed=seed, verifier_for=factory,
                                                    runner_up_weight=runner_up_weight)
    origin = f"reid fit --verify, fusion learnt on the {len(gallery_identities)} training photos"
    if calibration is None:
        return Verification(fusion, None, f"{origin}; no threshold (fewer than 2 validation individuals)",
                            runner_up_weight), metrics
    metrics.update(balanced_accuracy=calibration.metrics["balanced_accuracy"], auroc=calibration.metrics["auroc"])
    return Verification(fusion, calibration.threshold, f"{origin}; threshold {calibration.origin}",
                        runner_up_weight), metrics


#: Key of the verification settings inside a checkpoint's ``reid`` metadata.
CHECKPOINT_FIELD = "verification"


@dataclass(frozen=True)
class Verification:
    """What a checkpoint stores to verify its answers: the fusion, and the new_turtle threshold on fused scores
    (fused scores are probabilities, so the plain similarity threshold does not apply to them)."""

    fusion: Fusion
    threshold: float | None = None
    threshold_origin: str | None = None
    #: how much the runner-up's fused score raises the threshold's bar (reid.metrics.new_turtle_bar)
    runner_up_weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"fusion": self.fusion.to_dict(), "threshold": self.threshold, "threshold_origin": self.threshold_origin,
                "runner_up_weight": self.runner_up_weight}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Verification | None:
        if not data:
            return None
        threshold = data.get("threshold")
        return cls(Fusion.from_dict(data["fusion"]), None if threshold is None else float(threshold),
                   data.get("threshold_origin"), float(data.get("runner_up_weight", 0.0)))
