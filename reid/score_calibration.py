"""Turn one raw score (a cosine similarity, an inlier count) into P(same individual), so scores can be fused.

A cosine of 0.7 and 25 inliers live on different scales, and neither scale carries across models or datasets;
adding them weights one arbitrarily. WildFusion (Cermak, Picek, Adam, Papafitsoros 2024, "WildFusion:
Individual Animal Identification with Calibrated Similarity Fusion") calibrates each score separately with
isotonic regression (Zadrozny & Elkan 2002) on labelled training pairs, then combines the probabilities. Isotonic
regression assumes only that a higher score never means a *less* likely match, which holds for both scores.

:class:`ScoreCalibration` is fitted with scikit-learn but stores only the fitted breakpoints, as plain floats,
so it can live inside a torch checkpoint loaded with ``weights_only=True`` and is evaluated with ``np.interp``
(the same piecewise-linear function, clipped at the ends, that ``IsotonicRegression.predict`` computes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reid.errors import CheckpointError, DatasetError

log = logging.getLogger(__name__)

__all__ = ["ScoreCalibration"]

#: Version of the dictionary written by :meth:`ScoreCalibration.to_dict`.
FORMAT_VERSION = 1


def _as_vector(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise ValueError(f"{name} must be finite; {name}[{bad}] is {array[bad]}")
    return array


@dataclass(frozen=True)
class ScoreCalibration:
    """A monotone map from a raw score to the probability that a pair shows the same individual.

    Attributes:
        thresholds: increasing raw scores at which the fitted function has a breakpoint.
        probabilities: the probability at each threshold (non-decreasing, within [0, 1]).
        name: what score this calibrates (e.g. ``"cosine"``, ``"inliers"``), for messages and reports.
        pairs: how many (score, same) pairs it was fitted on, and how many of them were the same individual.
    """

    thresholds: tuple[float, ...]
    probabilities: tuple[float, ...]
    name: str = "score"
    pairs: int = 0
    positives: int = 0

    def __post_init__(self) -> None:
        x, y = np.asarray(self.thresholds, float), np.asarray(self.probabilities, float)
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"calibration {self.name!r} needs as many thresholds as probabilities (at least one), "
                             f"got {len(x)} and {len(y)}")
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise ValueError(f"calibration {self.name!r} has non-finite breakpoints")
        if np.any(np.diff(x) <= 0):
            raise ValueError(f"calibration {self.name!r} thresholds must be strictly increasing, got {list(x)[:10]}")
        if np.any(np.diff(y) < 0) or y.min() < 0 or y.max() > 1:
            raise ValueError(f"calibration {self.name!r} probabilities must be non-decreasing within [0, 1], "
                             f"got {list(y)[:10]}")

    @classmethod
    def fit(cls, scores: Sequence[float] | np.ndarray, same: Sequence[bool] | np.ndarray,
            name: str = "score") -> ScoreCalibration:
        """Fit isotonic regression of ``same`` (1 = same individual) on ``scores``.

        Fit on pairs from *training* photos only, drawn the way queries will be scored (e.g. each training photo
        against its top candidates among the others), so the probabilities describe the pairs seen at query time.

        Raises:
            ValueError: ``scores`` and ``same`` differ in length or hold non-finite values.
            DatasetError: every pair is the same individual, or every pair is different: nothing to calibrate.
        """
        from sklearn.isotonic import IsotonicRegression  # only fitting needs scikit-learn

        x = _as_vector("scores", scores)
        labels = _as_vector("same", np.asarray(same, dtype=np.float64))
        if len(x) != len(labels):
            raise ValueError(f"{len(x)} scores but {len(labels)} same/different labels")
        if not np.isin(labels, (0.0, 1.0)).all():
            raise ValueError(f"same must hold only 0/1 or booleans, got values {sorted(set(labels.tolist()))[:10]}")
        positives = int(labels.sum())
        if positives == 0 or positives == len(labels):
            kind = "same-individual" if positives else "different-individual"
            raise DatasetError(
                f"cannot calibrate {name!r}: all {len(labels)} training pairs are {kind} pairs; calibration needs "
                "both (photos of several individuals, some with two or more photos)"
            )
        model = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0, increasing=True).fit(x, labels)
        thresholds = tuple(float(v) for v in model.X_thresholds_)
        probabilities = tuple(float(v) for v in np.clip(model.y_thresholds_, 0.0, 1.0))
        log.info("calibrated %s on %d pairs (%d same): %d breakpoints over [%.4g, %.4g]", name, len(x), positives,
                 len(thresholds), thresholds[0], thresholds[-1])
        return cls(thresholds, probabilities, name=name, pairs=len(x), positives=positives)

    def __call__(self, scores: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """P(same individual) for each score, as float64 (scores outside the fitted range are clipped to it)."""
        x = np.asarray(scores, dtype=np.float64)
        return np.interp(x, self.thresholds, self.probabilities)

    def to_dict(self) -> dict[str, Any]:
        """Plain python values only (str, int, lists of float): safe for JSON and ``torch.load(weights_only=True)``."""
        return {
            "format": FORMAT_VERSION,
            "method": "isotonic",
            "name": self.name,
            "thresholds": list(self.thresholds),
            "probabilities": list(self.probabilities),
            "pairs": self.pairs,
            "positives": self.positives,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreCalibration:
        """Rebuild from :meth:`to_dict`'s output.

        Raises:
            CheckpointError: the dictionary is not a stored calibration, has another format, or is malformed.
        """
        if not isinstance(data, Mapping):
            raise CheckpointError(f"a stored score calibration must be a dict, got {type(data).__name__}")
        if data.get("format") != FORMAT_VERSION or data.get("method") != "isotonic":
            raise CheckpointError(f"stored score calibration has format {data.get('format')!r} and method "
                                  f"{data.get('method')!r}; expected format {FORMAT_VERSION}, method 'isotonic'")
        try:
            thresholds = tuple(float(v) for v in data["thresholds"])
            probabilities = tuple(float(v) for v in data["probabilities"])
            if not all(math.isfinite(v) for v in thresholds + probabilities):
                raise ValueError("non-finite breakpoint")
            return cls(thresholds, probabilities, name=str(data.get("name", "score")),
                       pairs=int(data.get("pairs", 0)), positives=int(data.get("positives", 0)))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"stored score calibration {data.get('name', '')!r} is malformed: {error}") from error
