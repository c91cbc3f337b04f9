"""Why did the system match these two photos? The query beside an enrolled photo, with their similarity and the
local-feature matches that agree on one geometric transform joined by lines: what a biologist looks at before
accepting a match. ``reid explain`` and the service's ``POST /identify/explain`` both draw through here."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from reid.inference import Embedder
from reid.local_features import Extraction, LocalFeatures, draw_matches, match_features


@dataclass(frozen=True)
class Explanation:
    """The drawn evidence (PNG bytes) and the numbers it shows; ``fallback`` when the matches drawn are those of
    verification's fallback (simulated camera tilts), found where plain matching found too few."""

    png: bytes
    similarity: float
    inliers: int
    fallback: bool = False


def explain_match(embedder: Embedder, query: np.ndarray, photo: np.ndarray, labels: tuple[str, str],
                  photo_features: LocalFeatures | None = None,
                  fallback_photo_features: Callable[[], LocalFeatures] | None = None) -> Explanation:
    """Compare two decoded RGB photos: cosine similarity of their embeddings and verified local-feature matches.

    ``photo_features`` are the enrolled photo's cached features, when the caller has them (the service does), and
    ``fallback_photo_features`` gives its features for the fallback. Features are extracted the way the checkpoint
    verifies. Where its fusion has a fallback and this pair's plain matches stay under the floor, the fallback's
    matches are drawn when they reach it: the most this pair can show. A ranking counts those only where none of the
    query's verified photos reached the floor and this photo was among the fallback's most similar, so an answer's
    ``evidence.inliers`` can be lower than the count drawn (never higher).
    """
    vectors = embedder.embed([query, photo])
    similarity = float(np.clip(vectors[0] @ vectors[1], -1.0, 1.0))  # as the gallery reports it: no 1.0000001
    fusion = embedder.verification.fusion if embedder.verification else None
    extraction = fusion.extraction if fusion else Extraction()
    match = match_features(extraction.extract(query), photo_features or extraction.extract(photo))
    fallback = fusion.fallback if fusion else None
    used_fallback = False
    if fallback is not None and match.inliers < fallback.floor:
        tilted = match_features(fallback.extraction.extract(query), fallback_photo_features()
                                if fallback_photo_features else fallback.extraction.extract(photo))
        if tilted.inliers >= fallback.floor:
            match, used_fallback = tilted, True
    query_label, photo_label = labels
    how = ", simulated tilts" if used_fallback else ""
    canvas = draw_matches(query, photo, match, labels=(query_label, f"{photo_label} (cosine {similarity:.3f}{how})"))
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return Explanation(buffer.getvalue(), similarity, match.inliers, used_fallback)
