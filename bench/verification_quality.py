"""Does geometric verification of the top candidates improve identification? Measured on real photos, honestly.

For every query the gallery photos are ranked by cosine similarity of embeddings (exact search, as the flat
FAISS gallery does); the top ``--top`` photos are verified with RootSIFT + ratio test + MAGSAC homography
(reid.local_features) and their inlier counts re-score them. An individual is scored by its best photo, and
the individuals outside the verified photos follow in cosine order. Variants compared:

* ``cosine``: embeddings alone (the baseline);
* ``inliers``: the verified photos ordered by inlier count (ties by cosine);
* ``fused mean``: WildFusion (Cermak et al. 2024): each score calibrated into P(same individual) by isotonic
  regression, then averaged (every count read, as fusions were before ``reid.verification.DEFAULT_INLIER_FLOOR``;
  this bench is the record of the earlier levers, and ranks as the product did then: ``bench/open_set_levers.py``
  scores the product's fusion and ranking of today);
* ``fused log-odds``: the calibrated probabilities combined as a sum of log-odds (naive Bayes);
* ``naive additive``: cosine + inliers / 100, uncalibrated, for reference.

Calibration is fitted on gallery (training) photos only: each gallery photo is a query against the *other*
gallery photos (leave-one-out) with the same top-N candidates, and every verified pair is labelled same or
different individual. Query photos never influence the calibration. Protocols: the dataset's own split (``val``
queries against the ``train`` gallery) and ``--seeds`` re-drawn by-image splits (reid.data.splits).

Local features are extracted once per photo and cached in ``--cache-dir`` (with the embeddings and the inlier
count of every verified pair, so a rerun only computes what is new). Run by hand, niced on a shared machine:

    nice .venv/bin/python bench/verification_quality.py --data /work/shared/data/turtles_dev \\
        --checkpoint /tmp/frozen.ckpt --out /tmp/verification.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from reid.data.records import read_dataset
from reid.data.splits import split_by_image
from reid.imageio import decode_image
from reid.local_features import Extraction, LocalFeatures, extract_features, match_features
from reid.metrics import map_at_k, rank_individuals, top_k_accuracy
from reid.score_calibration import ScoreCalibration

log = logging.getLogger("verification_quality")

#: Naive reference fusion: one inlier is worth this much cosine similarity.
NAIVE_INLIER_WEIGHT = 0.01
#: Probabilities are kept this far from 0 and 1 before taking log-odds, so one flat calibration cannot veto.
_EPSILON = 1e-3


# --------------------------------------------------------------------------------------------- caches


def _digest(*parts: object) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:12]


def cached_embeddings(checkpoint: Path, paths: list[str], cache_dir: Path, batch_size: int) -> np.ndarray:
    """Embeddings of ``paths`` by ``checkpoint``, computed once and kept in ``cache_dir``."""
    from reid.inference import Embedder

    stat = checkpoint.stat()
    cache = cache_dir / f"embeddings_{_digest(checkpoint.resolve(), stat.st_size, stat.st_mtime_ns, *paths)}.npy"
    if cache.exists():
        log.info("embeddings from %s", cache)
        return np.load(cache)
    embedder = Embedder.from_checkpoint(checkpoint, device="cpu")
    start = time.perf_counter()
    embeddings = embedder.embed(paths, batch_size=batch_size, progress=True)
    log.info("embedded %d photos with %s in %.1f s", len(paths), embedder.name, time.perf_counter() - start)
    np.save(cache, embeddings)
    return embeddings


def _settings_name(extraction: Extraction, max_keypoints: int, ratio: float | None = None) -> str:
    """Part of a cache file's name (plain RootSIFT keeps the name it had before equalisation existed)."""
    matching = "" if ratio is None else f"_r{ratio}"
    return f"{extraction.max_side}px_{max_keypoints}kp{matching}" + ("_clahe" if extraction.equalise else "")


def cached_features(paths: list[str], cache_dir: Path, extraction: Extraction, max_keypoints: int
                    ) -> tuple[list[LocalFeatures], dict[str, float]]:
    """Local features of every photo, extracted once (as enrolment would) and stored as their blobs."""
    cache = cache_dir / f"features_{_settings_name(extraction, max_keypoints)}_{_digest(*paths)}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            blobs, offsets = stored["blobs"], stored["offsets"]
            timing = {"extract_ms_per_photo": float(stored["extract_ms_per_photo"]),
                      "decode_ms_per_photo": float(stored["decode_ms_per_photo"])}
        log.info("local features from %s", cache)
    else:
        blob_list, extract_s, decode_s = [], 0.0, 0.0
        for path in tqdm(paths, desc=f"local features, {extraction.describe()}", unit="photo"):
            start = time.perf_counter()
            image = decode_image(path)
            middle = time.perf_counter()
            blob_list.append(extract_features(image, extraction.max_side, max_keypoints, extraction.equalise).to_bytes())
            decode_s += middle - start
            extract_s += time.perf_counter() - middle
        timing = {"extract_ms_per_photo": 1000 * extract_s / len(paths),
                  "decode_ms_per_photo": 1000 * decode_s / len(paths)}
        offsets = np.cumsum([0] + [len(b) for b in blob_list])
        blobs = np.frombuffer(b"".join(blob_list), dtype=np.uint8)
        np.savez(cache, blobs=blobs, offsets=offsets, **{k: np.float64(v) for k, v in timing.items()})
        log.info("cached local features of %d photos in %s (%.1f MB)", len(paths), cache, blobs.nbytes / 1e6)
    start = time.perf_counter()
    features = [LocalFeatures.from_bytes(blobs[offsets[i]:offsets[i + 1]].tobytes()) for i in range(len(paths))]
    timing["load_ms_per_photo"] = 1000 * (time.perf_counter() - start) / len(paths)
    timing["blob_kb_per_photo"] = float(offsets[-1]) / len(paths) / 1000
    timing["keypoints_per_photo"] = float(np.mean([len(f) for f in features]))
    return features, timing


class PairCache:
    """Inlier counts of verified (query photo, gallery photo) pairs, with the time each match took."""

    def __init__(self, features: list[LocalFeatures], path: Path, ratio: float) -> None:
        self.features, self.path, self.ratio = features, path, ratio
        self.inliers: dict[tuple[int, int], int] = {}
        self.seconds: dict[tuple[int, int], float] = {}
        if path.exists():
            with np.load(path, allow_pickle=False) as stored:
                pairs, counts, seconds = (stored[k].tolist() for k in ("pairs", "inliers", "seconds"))
                for (i, j), count, took in zip(pairs, counts, seconds, strict=True):
                    self.inliers[(i, j)], self.seconds[(i, j)] = count, took
            log.info("%d verified pairs from %s", len(self.inliers), path)
        self.computed = 0

    def __call__(self, query: int, photo: int) -> int:
        key = (query, photo)
        if key not in self.inliers:
            start = time.perf_counter()
            self.inliers[key] = match_features(self.features[query], self.features[photo], self.ratio).inliers
            self.seconds[key] = time.perf_counter() - start
            self.computed += 1
        return self.inliers[key]

    def save(self) -> None:
        if not self.inliers:
            return
        keys = list(self.inliers)
        np.savez(self.path, pairs=np.array(keys, dtype=np.int64).reshape(-1, 2),
                 inliers=np.array([self.inliers[k] for k in keys], dtype=np.int64),
                 seconds=np.array([self.seconds[k] for k in keys], dtype=np.float64))


# --------------------------------------------------------------------------------------------- protocol


@dataclass
class Candidates:
    """One query's gallery photos best first by cosine, and the verified top ones' scores."""

    order: np.ndarray  # gallery photo indices (into the protocol's gallery), all of them, by cosine
    cosine: np.ndarray  # cosine of the top photos
    inliers: np.ndarray  # inliers of the top photos


def candidates(similarity: np.ndarray, query: int, gallery: np.ndarray, top: int, pairs: PairCache,
               exclude: int | None = None) -> Candidates:
    """Rank ``gallery`` photos for photo ``query`` by cosine (``similarity`` row), verify the first ``top``."""
    scores = similarity.copy()
    if exclude is not None:
        scores[exclude] = -np.inf
    order = np.argsort(-scores, kind="stable")
    if exclude is not None:
        order = order[order != exclude]
    head = order[:top]
    inliers = np.array([pairs(query, int(gallery[j])) for j in head], dtype=np.float64)
    return Candidates(order, scores[head], inliers)


def ranked_labels(found: Candidates, score: np.ndarray | None, identities: np.ndarray, k: int = 5) -> list[str]:
    """Individuals for one query: the verified photos by ``score`` (ties by cosine), then the rest by cosine."""
    head = found.order[: len(found.cosine)]
    if score is None:
        reordered = head
    else:
        reordered = head[np.lexsort((-found.cosine, -score))]
    order = np.concatenate([reordered, found.order[len(head):]])
    ranking = rank_individuals(-np.arange(len(order), dtype=np.float64), identities[order].tolist(), k)
    return [hit[0] for hit in ranking]  # a hit is (individual, score, ...)


def log_odds(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), with ``p`` kept :data:`_EPSILON` away from 0 and 1."""
    p = np.clip(p, _EPSILON, 1 - _EPSILON)
    return np.log(p / (1 - p))


def variants(calibrations: dict[str, ScoreCalibration]) -> dict[str, Callable[[Candidates], np.ndarray | None]]:
    """Each variant's photo score over the verified candidates (``None``: plain cosine order)."""
    def probabilities(c: Candidates) -> tuple[np.ndarray, np.ndarray]:
        return calibrations["cosine"](c.cosine), calibrations["inliers"](c.inliers)

    return {
        "cosine": lambda c: None,
        "inliers": lambda c: c.inliers,
        "fused mean (WildFusion)": lambda c: np.mean(probabilities(c), axis=0),
        "fused log-odds": lambda c: sum(log_odds(p) for p in probabilities(c)),
        "naive additive": lambda c: c.cosine + NAIVE_INLIER_WEIGHT * c.inliers,
    }


def run_protocol(name: str, is_query: np.ndarray, embeddings: np.ndarray, identities: np.ndarray, top: int,
                 pairs: PairCache) -> dict[str, object]:
    """Calibrate on the gallery (leave-one-out), then score every variant on the queries."""
    gallery = np.flatnonzero(~is_query)
    queries = np.flatnonzero(is_query)
    queries = queries[np.isin(identities[queries], identities[gallery])]  # closed set: the answer is in the gallery
    gallery_identities = identities[gallery]
    similarity = embeddings @ embeddings[gallery].T

    # Calibration pairs: every gallery photo against the other gallery photos, the same top-N as a query gets.
    cosines, inliers, same = [], [], []
    for position, photo in enumerate(tqdm(gallery, desc=f"{name}: calibrating", unit="photo")):
        found = candidates(similarity[photo], int(photo), gallery, top, pairs, exclude=position)
        cosines.append(found.cosine)
        inliers.append(found.inliers)
        same.append(gallery_identities[found.order[: len(found.cosine)]] == identities[photo])
    same_all = np.concatenate(same)
    calibrations = {"cosine": ScoreCalibration.fit(np.concatenate(cosines), same_all, name="cosine"),
                    "inliers": ScoreCalibration.fit(np.concatenate(inliers), same_all, name="inliers")}
    pairs.save()

    scorers = variants(calibrations)
    predictions: dict[str, list[list[str]]] = {v: [] for v in scorers}
    truths, hit_in_top, match_seconds = [], [], []
    for query in tqdm(queries, desc=f"{name}: queries", unit="query"):
        found = candidates(similarity[query], int(query), gallery, top, pairs)
        truths.append(identities[query])
        hit_in_top.append(identities[query] in set(gallery_identities[found.order[:top]]))
        match_seconds.append(sum(pairs.seconds[(int(query), int(gallery[j]))] for j in found.order[:top]))
        for variant, scorer in scorers.items():
            predictions[variant].append(ranked_labels(found, scorer(found), gallery_identities))
    pairs.save()
    result = {
        "protocol": name,
        "gallery": len(gallery),
        "queries": len(queries),
        "recall_at_top": float(np.mean(hit_in_top)),
        "calibration_pairs": len(same_all),
        "calibration_same_share": float(same_all.mean()),
        "matching_ms_per_query": 1000 * float(np.mean(match_seconds)),
        "calibration": {k: v.to_dict() for k, v in calibrations.items()},
        "variants": {v: {"map5": map_at_k(p, truths, 5), "top1": top_k_accuracy(p, truths, 1)}
                     for v, p in predictions.items()},
    }
    log.info("%s: %s", name, {v: round(r["map5"], 4) for v, r in result["variants"].items()})
    return result


# --------------------------------------------------------------------------------------------- report


def table(results: list[dict], timing: dict[str, float], top: int) -> str:
    """One markdown table: MAP@5 (and top-1) on the file's split, mean ± std over re-drawn splits, ms/query."""
    own = results[0] if not results[0]["protocol"].startswith("by image") else None
    redrawn = results[1:] if own is not None else results
    matching = statistics.mean(r["matching_ms_per_query"] for r in results)
    lines = [
        f"| variant | MAP@5 file split | MAP@5 re-drawn by-image splits (mean ± std, n={len(redrawn)}) | "
        "top-1 file split | top-1 re-drawn | matching ms/query |",
        "|---|---|---|---|---|---|",
    ]

    def summary(variant: str, metric: str) -> str:
        values = [r["variants"][variant][metric] for r in redrawn]
        if not values:
            return "-"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {spread:.3f}"

    def own_value(variant: str, metric: str) -> str:
        return "-" if own is None else f"{own['variants'][variant][metric]:.3f}"

    for variant in results[0]["variants"]:
        cost = "0 (no verification)" if variant == "cosine" else f"{matching:.0f} (top {top})"
        lines.append(f"| {variant} | {own_value(variant, 'map5')} | {summary(variant, 'map5')} | "
                     f"{own_value(variant, 'top1')} | {summary(variant, 'top1')} | {cost} |")
    notes = [
        "",
        f"| protocol | gallery | queries | true individual in top-{top} photos | calibration pairs (same) |",
        "|---|---|---|---|---|",
        *[f"| {r['protocol']} | {r['gallery']} | {r['queries']} | {r['recall_at_top']:.3f} | "
          f"{r['calibration_pairs']} ({r['calibration_same_share']:.1%}) |" for r in results],
        "",
        (f"extraction {timing['extract_ms_per_photo']:.0f} ms/photo (+ decode {timing['decode_ms_per_photo']:.0f} ms), "
         f"{timing['keypoints_per_photo']:.0f} keypoints/photo, blob {timing['blob_kb_per_photo']:.0f} kB/photo "
         f"(load {timing['load_ms_per_photo']:.2f} ms); matching {timing['match_ms_per_pair']:.1f} ms/pair "
         f"(mean over {timing['pairs_timed']} pairs)"),
    ]
    return "\n".join(lines + notes)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/turtles_dev"))
    parser.add_argument("--checkpoint", type=Path, required=True, help="written by reid fit or reid export")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/verification_cache"))
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--top", type=int, default=20, help="gallery photos verified per query")
    parser.add_argument("--max-side", type=int, default=1024, help="long side for feature extraction (e.g. 512)")
    parser.add_argument("--max-keypoints", type=int, default=1500)
    parser.add_argument("--equalise", action=argparse.BooleanOptionalAction, default=True,
                        help="equalise local contrast (CLAHE) before SIFT, as reid does since; --no-equalise: as before")
    parser.add_argument("--ratio", type=float, default=0.8, help="Lowe ratio")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="re-drawn by-image splits")
    parser.add_argument("--query-fraction", type=float, default=0.33)
    parser.add_argument("--file-split", action=argparse.BooleanOptionalAction, default=True,
                        help="score the dataset's own split too (--no-file-split: a checkpoint trained on a re-drawn "
                             "split, whose training photos the file's val holds)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.cache_dir.mkdir(parents=True, exist_ok=True)

    records = read_dataset(args.data)
    paths = records["path"].tolist()
    identities = np.asarray(records["identity"].tolist(), dtype=object)
    embeddings = cached_embeddings(args.checkpoint, paths, args.cache_dir, args.batch_size)
    extraction = Extraction(args.max_side, args.equalise)
    features, timing = cached_features(paths, args.cache_dir, extraction, args.max_keypoints)
    settings = _settings_name(extraction, args.max_keypoints, args.ratio)
    pair_file = args.cache_dir / f"pairs_{settings}_{_digest(*paths)}.npz"
    pairs = PairCache(features, pair_file, args.ratio)

    protocols: list[tuple[str, np.ndarray]] = []
    if args.file_split and (records["split"] != "").any():
        protocols.append(("file split", (records["split"] == "val").to_numpy()))
    for seed in args.seeds:
        is_query = (split_by_image(records, args.query_fraction, seed) == "val").to_numpy()
        protocols.append((f"by image, seed {seed}", is_query))
    results = [run_protocol(name, is_query, embeddings, identities, args.top, pairs) for name, is_query in protocols]
    timing["match_ms_per_pair"] = 1000 * float(np.mean(list(pairs.seconds.values())))
    timing["pairs_timed"] = len(pairs.seconds)

    report = table(results, timing, args.top)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "data": str(args.data), "checkpoint": str(args.checkpoint), "top": args.top, "max_side": args.max_side,
        "equalise": args.equalise, "max_keypoints": args.max_keypoints, "ratio": args.ratio, "query_fraction": args.query_fraction,
        "timing": timing, "protocols": results, "table": report,
    }, indent=2))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
