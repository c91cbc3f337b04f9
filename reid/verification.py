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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from reid.gallery import Gallery
from reid.imageio import decode_image
from reid.errors import FeatureError
from reid.fileio import write_atomically
from reid.local_features import FORMAT_VERSION, Extraction, LocalFeatures, check_integer, match_all
from reid.metrics import ThresholdObjective
from reid.score_calibration import ScoreCalibration

log = logging.getLogger(__name__)

#: Photos verified per query. On turtles_dev the true individual is already among the 20 most similar photos for
#: 98.7-100% of queries, but verifying 80 finds a better-matching photo of it more often: verified MAP@5 rose for 9
#: of the 10 checkpoints measured and held for the tenth; +0.017 over the five runs of the default recipe
#: (bench/verification_quality.py --top; docs/results.md, "How many photos to verify"). Each photo costs one match (~11 ms
#: with equalised features at 1024 px on one idle core of the 2-core development machine), so a query's matching
#: costs 4x what 20 cost.
DEFAULT_CANDIDATES = 80
#: Inlier counts below this are read as no match at all by a new fusion: a homography needs 4 matches, and random
#: pairs of turtles_dev photos reach 4-8 inliers, so such counts only add noise to the ranking and to the new_turtle
#: score. Chosen from that principle before the ten fits of today's recipe it was scored on: it raised verified MAP@5
#: in 8 of 10 (+0.006; -0.002 over the four splits re-drawn by image), the AUROC of the new_turtle score in 9 and
#: the held-out balanced accuracy in 6 (+0.004, to 0.904) (docs/results.md, "Counts random matches reach").
DEFAULT_INLIER_FLOOR = 8
#: Environment variable naming the folder of cached local features of dataset photos.
FEATURE_CACHE_ENV = "REID_FEATURE_CACHE"


#: Inlier count from which a fallback's count is kept: pairs of different turtles_dev individuals reached 9 at most
#: under simulated tilts (3,245 pairs), so a lower count would lift new turtles rather than find known ones.
DEFAULT_FALLBACK_FLOOR = 10
#: Photos matched again by a fallback: a query's 20 most similar. All 80 verified photos gave about the same mean
#: held-out balanced accuracy over five turtles_dev runs (0.895 against 0.894) and +0.006 MAP@5, at four times the
#: cost (docs/results.md, "The ASIFT fallback").
DEFAULT_FALLBACK_TOP = 20
#: How a fallback extracts: simulated tilts up to 2 (ten views), 700 keypoints a view, ~6,900 a turtles_dev photo.
FALLBACK_EXTRACTION = Extraction(max_keypoints=700, affine_tilt=2)


@dataclass(frozen=True)
class Fallback:
    """Where none of a query's verified photos reaches ``floor`` inliers, its ``top`` most similar are matched again
    under simulated camera tilts (ASIFT, ``extraction``), and a count replaces the plain one where it is larger and
    reaches ``floor``.

    A third of the known turtles_dev queries are answered on the cosine alone, because no gallery photo matches them
    geometrically; some are turtles seen from a slant that SIFT's descriptors do not survive. Under simulated tilts
    three of 17 such errors reached 25-40 inliers against their own individual where plain SIFT reached 6-8. On the
    five runs of the default recipe it raised the held-out balanced accuracy in four and left the fifth level (0.889
    -> 0.894), and the AUROC of the new_turtle score in all five (docs/results.md, "The ASIFT fallback"). The price: ~1.5 s to extract a
    photo's features (0.2 s plain) and ~190 ms a match (7 ms), paid by the queries that fall back (43-46% on
    turtles_dev).
    The fusion is the one learnt on plain counts: a kept count is one a plain match of the same individual reaches.
    """

    top: int = DEFAULT_FALLBACK_TOP
    floor: int = DEFAULT_FALLBACK_FLOOR
    extraction: Extraction = FALLBACK_EXTRACTION

    def __post_init__(self) -> None:
        check_integer("fallback top", self.top, 1)
        check_integer("fallback floor", self.floor, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"top": self.top, "floor": self.floor, **self.extraction.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Fallback | None:
        return None if not data else cls(int(data["top"]), int(data["floor"]), Extraction.from_dict(data))


@dataclass(frozen=True)
class Fusion:
    """How a (similarity, inliers) pair becomes one score: the mean of both calibrated probabilities.

    ``extraction`` is how the local features whose inliers it calibrated were extracted: queries and gallery photos
    are extracted the same way, so that the calibration holds. Inlier counts under ``inlier_floor`` are read as 0:
    :func:`fusion_from_pairs` gives new fusions :data:`DEFAULT_INLIER_FLOOR`, and the field's own default, 0 (every
    count read), is what a fusion stored before the floor existed scores with.
    """

    similarity: ScoreCalibration
    inliers: ScoreCalibration
    candidates: int = DEFAULT_CANDIDATES
    extraction: Extraction = Extraction()
    #: where plain matches find nothing, match again under simulated tilts (None: never)
    fallback: Fallback | None = None
    inlier_floor: int = 0

    def __post_init__(self) -> None:
        check_integer("inlier floor", self.inlier_floor, 0)

    def __call__(self, similarities: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        counts = np.asarray(inliers, np.float64)
        return (self.similarity(np.asarray(similarities, np.float64))
                + self.inliers(np.where(counts < self.inlier_floor, 0.0, counts))) / 2

    def to_dict(self) -> dict[str, Any]:
        """Plain values, so the fusion travels inside a checkpoint read with ``weights_only=True``."""
        return {"similarity": self.similarity.to_dict(), "inliers": self.inliers.to_dict(),
                "candidates": self.candidates, **self.extraction.to_dict(),
                "fallback": None if self.fallback is None else self.fallback.to_dict(),
                "inlier_floor": self.inlier_floor}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fusion:
        """A fusion keeps extracting and scoring as it was calibrated, even when stored before a setting existed
        (:meth:`Extraction.from_dict`): one stored before fallbacks has none, one stored before the floor reads every
        count."""
        return cls(ScoreCalibration.from_dict(data["similarity"]), ScoreCalibration.from_dict(data["inliers"]),
                   int(data["candidates"]), Extraction.from_dict(data), Fallback.from_dict(data.get("fallback")),
                   int(data.get("inlier_floor", 0)))


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


class FeaturesOnDemand(Sequence[LocalFeatures]):
    """Local features of image files, each extracted (or read from the disk cache) when first asked for, never
    kept in memory: a fallback's features cost ~1.5 s a photo and ~1 MB, and most photos are never asked for."""

    def __init__(self, images: Sequence[str | Path], extraction: Extraction) -> None:
        self.images, self.extraction = [Path(image) for image in images], extraction

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> LocalFeatures:  # type: ignore[override]
        return _features_of_file(self.images[index], self.extraction)


@dataclass
class FallbackFeatures:
    """Where a verifier finds the features its fusion's :class:`Fallback` matches: a gallery photo's by image id, a
    query's by its number (asked for only when the query falls back), and the counts already matched, keyed like
    :class:`LocalVerifier`'s memo."""

    gallery: Callable[[int], LocalFeatures]
    query: Callable[[int], LocalFeatures]
    memo: dict[tuple[Any, Any], int] = field(default_factory=dict)


class LocalVerifier:
    """The :class:`reid.identify.Verifier` of one set of queries against one gallery.

    ``gallery_features(image_id)`` returns a gallery photo's cached features; ``query_features[q]`` are the
    features of query number ``q`` (extracted once per query). Each pair's inlier count is kept in ``memo`` under
    ``pair_key(query, image_id)``: a factory shares one memo between the verifiers of several protocols over the same
    photos, so a pair matched by one is not matched again by the next. ``fallback`` gives the features of the
    fusion's fallback, which it needs when it has one.
    """

    def __init__(self, fusion: Fusion, gallery_features: Callable[[int], LocalFeatures],
                 query_features: Sequence[LocalFeatures], memo: dict[tuple[Any, Any], int] | None = None,
                 pair_key: Callable[[int, int], tuple[Any, Any]] = lambda query, image_id: (query, image_id),
                 fallback: FallbackFeatures | None = None) -> None:
        self.fusion = fusion
        self.candidates = fusion.candidates
        self.gallery_features = gallery_features
        self.query_features = query_features
        self.memo = {} if memo is None else memo
        self.pair_key = pair_key
        if fusion.fallback is not None and fallback is None:
            raise ValueError("this fusion falls back to simulated tilts; the verifier needs their features")
        self.fallback = fallback

    def _counts(self, query: int, image_ids: Sequence[int], memo: dict[tuple[Any, Any], int],
                query_features: Callable[[], LocalFeatures],
                photo_features: Callable[[int], LocalFeatures]) -> list[int]:
        """The inlier count of ``query`` against each photo, from ``memo`` or matched (in parallel) and memoised.
        The query's features are asked for only when a pair is missing (a fallback's are extracted on demand)."""
        keys = [self.pair_key(query, image_id) for image_id in image_ids]
        missing = [n for n, key in enumerate(keys) if key not in memo]
        if missing:
            features = query_features()
            matches = match_all([(features, photo_features(image_ids[n])) for n in missing])
            for n, match in zip(missing, matches):
                memo[keys[n]] = match.inliers
        return [memo[key] for key in keys]

    def inliers(self, query: int, image_ids: np.ndarray) -> np.ndarray:
        """Each photo's plain inlier count; where none reaches the fallback's floor, the fallback's counts of the
        most similar photos that reach it (:class:`Fallback`)."""
        ids = [int(i) for i in image_ids]
        counts = np.array(self._counts(query, ids, self.memo, lambda: self.query_features[query],
                                       self.gallery_features), dtype=np.int64)
        settings = self.fusion.fallback
        if settings is not None and len(counts) and counts.max() < settings.floor:
            affine = self._counts(query, ids[:settings.top], self.fallback.memo,
                                  lambda: self.fallback.query(query), self.fallback.gallery)
            for n, count in enumerate(affine):
                if count >= settings.floor:
                    counts[n] = max(counts[n], count)
        return counts

    def fuse(self, similarities: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        return self.fusion(similarities, inliers)


class ProgressVerifier:
    """A verifier that ticks a progress bar at each query it verifies: `reid fit --verify` verifies every validation
    photo once per held-out fold and once more, minutes of matching on a CPU that a user should see advance."""

    def __init__(self, verifier: LocalVerifier, bar: tqdm) -> None:
        self.verifier, self.bar, self.candidates = verifier, bar, verifier.candidates

    def inliers(self, query: int, image_ids: np.ndarray) -> np.ndarray:
        counts = self.verifier.inliers(query, image_ids)
        self.bar.update()
        return counts

    def fuse(self, similarities: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        return self.verifier.fuse(similarities, inliers)


def verifier_factory(fusion: Fusion, features: Sequence[LocalFeatures],
                     query_features: Sequence[LocalFeatures] | None = None,
                     memo: dict[tuple[int, int], int] | None = None,
                     fallback_features: Sequence[LocalFeatures] | None = None,
                     fallback_query_features: Sequence[LocalFeatures] | None = None
                     ) -> Callable[[np.ndarray, np.ndarray], LocalVerifier]:
    """The verifier of any (gallery rows, query rows) pair of one set of photos whose features are ``features``.

    Query rows index ``query_features`` when the queries are separate photos (as in `reid predict`), else
    ``features`` too (the protocols of `reid evaluate` and `reid calibrate` draw both sides from one dataset).
    A ``memo`` keeps every (query row, gallery row) pair's inliers across the verifiers the factory builds.
    ``fallback_features`` (and ``fallback_query_features``, alike) are the same photos' features for the fusion's
    fallback, when it has one: a :class:`FeaturesOnDemand`, so that only the photos a fallback asks for are extracted.
    """
    queries = features if query_features is None else query_features
    fallback_queries = fallback_features if fallback_query_features is None else fallback_query_features
    fallback_memo: dict[tuple[Any, Any], int] = {}

    def build(gallery_rows: np.ndarray, query_rows: np.ndarray) -> LocalVerifier:
        fallback = None
        if fallback_features is not None:
            fallback = FallbackFeatures(lambda i: fallback_features[int(gallery_rows[i])],
                                        lambda q: fallback_queries[int(query_rows[q])], fallback_memo)
        return LocalVerifier(fusion, lambda i: features[int(gallery_rows[i])], [queries[int(r)] for r in query_rows],
                             memo, lambda q, i: (int(query_rows[q]), int(gallery_rows[i])), fallback)

    return build


def inliers_counted(inliers: int | None, fusion: Fusion | None) -> bool | None:
    """For evidence a person reads: whether the fused score counted a photo's inliers as a match, False where they
    are under the fusion's floor, as many as photos of different individuals reach by chance (None: no count)."""
    return None if inliers is None or fusion is None else inliers >= fusion.inlier_floor


def fusion_note(fusion: Fusion) -> str:
    """``, ...`` naming the fusion's inlier floor and its fallback to simulated tilts, where it has them, for messages
    that say how it verifies."""
    fallback = fusion.fallback
    return ((f", under {fusion.inlier_floor} inliers read as none" if fusion.inlier_floor else "")
            + ("" if fallback is None else f", ASIFT fallback on the {fallback.top} most similar photos when none "
                                           f"reaches {fallback.floor} inliers"))


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
    gallery = Gallery(int(embeddings.shape[1]))
    gallery.add(np.arange(len(identities)), embeddings, list(identities))
    scores, ids = gallery.search_photos(embeddings, candidates + 1)
    similarities, inliers, same = [], [], []
    for q in tqdm(range(len(identities)), desc="fitting the fusion", unit="photo", disable=not progress):
        others = [(float(score), int(i)) for score, i in zip(scores[q], ids[q]) if i >= 0 and i != q]
        similarities.extend(score for score, _ in others)
        same.extend(identities[q] == identities[i] for _, i in others)
        inliers.extend([pair_inliers(q, i) for _, i in others] if pair_inliers is not None else
                       [match.inliers for match in match_all([(features[q], features[i]) for _, i in others])])
    return np.array(similarities), np.array(inliers, dtype=np.int64), np.array(same, dtype=bool)


def fusion_from_pairs(pairs: tuple[np.ndarray, np.ndarray, np.ndarray], candidates: int = DEFAULT_CANDIDATES,
                      extraction: Extraction = Extraction(), inlier_floor: int = DEFAULT_INLIER_FLOOR) -> Fusion:
    """Calibrate each score of :func:`fusion_training_pairs`'s labelled pairs by isotonic regression (WildFusion's
    recipe); ``candidates`` and ``extraction`` are how the pairs were drawn and their features extracted. The inlier
    calibration is fitted on every count, and the fusion reads counts under ``inlier_floor`` as 0 when it scores."""
    similarities, inliers, same = pairs
    return Fusion(ScoreCalibration.fit(similarities, same, name="cosine"),
                  ScoreCalibration.fit(inliers, same, name="inliers"), candidates, extraction,
                  inlier_floor=inlier_floor)


def fit_fusion(embeddings: np.ndarray, identities: Sequence[str], features: Sequence[LocalFeatures],
               candidates: int = DEFAULT_CANDIDATES, extraction: Extraction = Extraction(),
               progress: bool = False, inlier_floor: int = DEFAULT_INLIER_FLOOR) -> Fusion:
    """Learn the fusion from training photos alone: their labelled pairs (:func:`fusion_training_pairs`), each score
    calibrated (:func:`fusion_from_pairs`). ``features`` were extracted by ``extraction``."""
    pairs = fusion_training_pairs(embeddings, identities, features, candidates, progress)
    fusion = fusion_from_pairs(pairs, candidates, extraction, inlier_floor)
    log.info("fusion fitted on %d pairs of %d training photos (%d of the same individual)", len(pairs[2]),
             len(identities), int(np.sum(pairs[2])))
    return fusion


def verification_from_validation(gallery_embeddings: np.ndarray, gallery_identities: Sequence[str],
                                 gallery_features: Sequence[LocalFeatures], query_embeddings: np.ndarray,
                                 query_identities: Sequence[str], query_features: Sequence[LocalFeatures],
                                 candidates: int = DEFAULT_CANDIDATES, extraction: Extraction = Extraction(),
                                 seed: int = 0, progress: bool = False, runner_up_weight: float = 0.0,
                                 fallback: Fallback | None = None, objective: ThresholdObjective = "map5",
                                 fallback_features: tuple[Sequence[LocalFeatures],
                                                          Sequence[LocalFeatures]] | None = None,
                                 inlier_floor: int = DEFAULT_INLIER_FLOOR) -> tuple[Verification, dict[str, float]]:
    """What `reid fit --verify` stores, from the photos its validation uses (training photos as the gallery).

    The fusion is learnt on the gallery photos alone, each against the others (:func:`fit_fusion`); the new_turtle
    threshold on fused scores is fitted like fit's similarity threshold, on validation individuals held out of the
    gallery in turn, so the reported open-set scores never grade a threshold on the individuals that chose it.
    Returns the verification and the verified validation scores (closed-set MAP@5 and top-1, and the held-out
    balanced accuracy and AUROC when there were individuals to hold out). Each (query, photo) pair is matched once.
    A ``fallback`` is stored in the fusion and in force while the threshold is fitted; ``fallback_features`` are the
    gallery's and the queries' features for it (:class:`FeaturesOnDemand`). The threshold is fitted to maximise
    ``objective``. The fusion reads inlier counts under ``inlier_floor`` as 0.
    """
    from reid.evaluation import calibrate_on_held_out_individuals, held_out_folds, score_rankings, search_gallery

    fusion = replace(fit_fusion(gallery_embeddings, gallery_identities, gallery_features, candidates, extraction,
                                progress, inlier_floor), fallback=fallback)
    gallery_fallback, query_fallback = (None, None) if fallback is None else fallback_features
    plain_factory = verifier_factory(fusion, gallery_features, query_features, memo={},
                                     fallback_features=gallery_fallback, fallback_query_features=query_fallback)
    bar = tqdm(total=len(query_identities) * (1 + held_out_folds(gallery_identities, query_identities)),
               desc="verifying validation photos", unit="query", disable=not progress)

    def factory(gallery_rows: np.ndarray, query_rows: np.ndarray) -> ProgressVerifier:
        return ProgressVerifier(plain_factory(gallery_rows, query_rows), bar)

    log.info("verifying %d validation photos against their %d most similar training photos, then again with each "
             "validation individual held out in turn", len(query_identities), candidates)
    closed = score_rankings(
        search_gallery(gallery_embeddings, gallery_identities, query_embeddings, 5,
                       factory(np.arange(len(gallery_identities)), np.arange(len(query_identities)))),
        list(query_identities), known=set(gallery_identities))
    metrics = {"map5": closed.metrics["map5"], "top1": closed.metrics["top1"]}
    calibration = calibrate_on_held_out_individuals(gallery_embeddings, gallery_identities, query_embeddings,
                                                    query_identities, seed=seed, verifier_for=factory,
                                                    runner_up_weight=runner_up_weight, objective=objective)
    bar.close()
    origin = f"reid fit --verify, fusion learnt on the {len(gallery_identities)} training photos{fusion_note(fusion)}"
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
