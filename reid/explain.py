"""Why did the system match these two photos? The query beside an enrolled photo, with their similarity and the
local-feature matches that agree on one geometric transform joined by lines: what a biologist looks at before
accepting a match. ``reid explain`` and the service's ``POST /identify/explain`` both draw through here."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from reid.inference import Embedder
from reid.local_features import Extraction, LocalFeatures, draw_matches, match_features


@dataclass(frozen=True)
class Explanation:
    """The drawn evidence (PNG bytes) and the two numbers it shows."""

    png: bytes
    similarity: float
    inliers: int


def explain_match(embedder: Embedder, query: np.ndarray, photo: np.ndarray, labels: tuple[str, str],
                  photo_features: LocalFeatures | None = None) -> Explanation:
    """Compare two decoded RGB photos: cosine similarity of their embeddings and verified local-feature matches.

    ``photo_features`` are the enrolled photo's cached features, when the caller has them (the service does).
    Features are extracted the way the checkpoint verifies, so the count drawn is the count ranked.
    """
    vectors = embedder.embed([query, photo])
    similarity = float(vectors[0] @ vectors[1])
    extraction = embedder.verification.fusion.extraction if embedder.verification else Extraction()
    match = match_features(extraction.extract(query), photo_features or extraction.extract(photo))
    query_label, photo_label = labels
    canvas = draw_matches(query, photo, match, labels=(query_label, f"{photo_label} (cosine {similarity:.3f})"))
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return Explanation(buffer.getvalue(), similarity, match.inliers)
