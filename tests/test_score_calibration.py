"""ScoreCalibration: a monotone map into [0, 1] that survives a checkpoint loaded with weights_only=True."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reid.errors import CheckpointError, DatasetError
from reid.score_calibration import ScoreCalibration


@pytest.fixture
def pairs() -> tuple[np.ndarray, np.ndarray]:
    """Inlier-like scores: same-individual pairs score higher on average, with overlap."""
    rng = np.random.default_rng(0)
    same = rng.random(400) < 0.3
    scores = np.where(same, rng.poisson(30, 400), rng.poisson(6, 400)).astype(float)
    return scores, same


def test_monotone_and_within_unit_interval(pairs) -> None:
    scores, same = pairs
    calibration = ScoreCalibration.fit(scores, same, name="inliers")
    grid = np.linspace(-10, 200, 500)
    probabilities = calibration(grid)
    assert probabilities.min() >= 0.0 and probabilities.max() <= 1.0
    assert np.all(np.diff(probabilities) >= 0)
    assert calibration(0.0) < 0.1 and calibration(60.0) > 0.9
    assert calibration.pairs == 400 and calibration.positives == int(same.sum())


def test_matches_sklearn_predictions(pairs) -> None:
    from sklearn.isotonic import IsotonicRegression

    scores, same = pairs
    model = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1, increasing=True).fit(scores, same)
    grid = np.linspace(-5, 80, 300)
    assert np.allclose(ScoreCalibration.fit(scores, same)(grid), model.predict(grid))


def test_round_trip_through_json_and_weights_only_checkpoint(pairs, tmp_path: Path) -> None:
    calibration = ScoreCalibration.fit(*pairs, name="cosine")
    data = calibration.to_dict()
    assert ScoreCalibration.from_dict(json.loads(json.dumps(data))) == calibration
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "reid": {"calibration": {"cosine": data}}}, path)
    loaded = torch.load(path, weights_only=True)["reid"]["calibration"]["cosine"]
    restored = ScoreCalibration.from_dict(loaded)
    assert restored == calibration
    grid = np.linspace(-5, 80, 50)
    assert np.array_equal(restored(grid), calibration(grid))


@pytest.mark.parametrize("label", [True, False])
def test_one_class_is_refused(label: bool) -> None:
    with pytest.raises(DatasetError, match="all 5 training pairs"):
        ScoreCalibration.fit([0.1, 0.2, 0.3, 0.4, 0.5], [label] * 5, name="cosine")


def test_bad_inputs_name_the_value() -> None:
    with pytest.raises(ValueError, match="3 scores but 2"):
        ScoreCalibration.fit([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match=r"scores\[1\] is nan"):
        ScoreCalibration.fit([0.1, float("nan")], [True, False])
    with pytest.raises(CheckpointError, match="format"):
        ScoreCalibration.from_dict({"format": 99, "method": "isotonic"})
    with pytest.raises(CheckpointError, match="malformed"):
        ScoreCalibration.from_dict({"format": 1, "method": "isotonic", "thresholds": [2.0, 1.0],
                                    "probabilities": [0.1, 0.2]})
