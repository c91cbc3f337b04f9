"""Local features: keypoints in original pixels, a geometric check that tells one pattern from another, safe storage."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest

from reid import local_features
from reid.data.synth import generate_synthetic_dataset
from reid.errors import FeatureError, ReIDError
from reid.imageio import decode_image
from reid.local_features import (Extraction, LocalFeatures, Match, draw_matches, extract_features, match_all,
                                 match_features)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[np.ndarray]]:
    """Three photos (top, left, right views) of each of four synthetic individuals, 256 px."""
    root = tmp_path_factory.mktemp("local_features")
    generate_synthetic_dataset(root, individuals=4, images_per_individual=3, seed=0, image_size=256, progress=False)
    images: dict[str, list[np.ndarray]] = {}
    for path in sorted((root / "images").glob("*/*.png")):
        images.setdefault(path.parent.name, []).append(decode_image(path))
    return images


def _warped(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``image`` rotated 25 degrees, scaled 0.8, shifted and cropped to another size; and the 2 x 3 transform."""
    height, width = image.shape[:2]
    transform = cv2.getRotationMatrix2D((width / 2, height / 2), 25.0, 0.8)
    transform[:, 2] += (-30.0, 12.0)
    warped = cv2.warpAffine(image, transform, (width - 60, height - 20), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT)
    return warped, transform


def test_keypoints_are_in_original_pixels_and_survive_a_similarity_transform(photos) -> None:
    # Upscale first, then extract at half size, so that both photos go through the downscaling path.
    photo = cv2.resize(photos["ind_000"][0], (512, 512), interpolation=cv2.INTER_CUBIC)
    warped, transform = _warped(photo)
    original, copy = extract_features(photo, max_side=256), extract_features(warped, max_side=256)
    assert original.image_size == (512, 512) and copy.image_size == (warped.shape[1], warped.shape[0])
    assert original.keypoints[:, 0].max() > 300  # original pixels, not the 256-px extraction copy

    match = match_features(original, copy)
    assert match.inliers >= 40
    assert match.query_points.shape == match.photo_points.shape == (match.inliers, 2)
    projected = match.query_points @ transform[:, :2].T + transform[:, 2]
    error = np.linalg.norm(projected - match.photo_points, axis=1)
    assert np.median(error) < 2.0 and np.quantile(error, 0.9) < 5.0


def test_equalisation_finds_the_pattern_of_a_dim_unevenly_lit_photo(photos) -> None:
    """A photo taken in shade (a quarter of the contrast at most, light falling off across it) still matches the
    well-lit photo of the same turtle once local contrast is equalised; without it SIFT finds almost nothing."""
    for image in (photos["ind_000"][0], photos["ind_001"][2]):
        light = np.linspace(0.12, 0.35, image.shape[1])[None, :, None]
        dim = np.clip(image.astype(np.float32) * light + 8, 0, 255).astype(np.uint8)
        plain = match_features(extract_features(image, equalise=False), extract_features(dim, equalise=False))
        equalised = match_features(Extraction().extract(image), Extraction().extract(dim))
        assert plain.inliers < 30 and equalised.inliers >= 40 and equalised.inliers > 2 * plain.inliers


def test_affine_tilt_matches_a_turtle_seen_from_a_slant(slanted_turtle) -> None:
    """A photo seen at a slant is matched once tilts are simulated (ASIFT); SIFT alone finds no more than random
    matches reach."""
    (photo, *_), slanted = slanted_turtle
    plain = match_features(extract_features(slanted), extract_features(photo)).inliers
    simulated = [extract_features(image, max_keypoints=500, affine_tilt=2) for image in (slanted, photo)]
    assert plain <= 12 and match_features(*simulated).inliers >= 60
    assert len(simulated[1]) > 2000  # each simulated view keeps up to 500
    assert simulated[0].keypoints[:, 0].max() < 154 and simulated[0].image_size == (154, 512)
    with pytest.raises(FeatureError, match="affine_tilt must be an integer >= 0, got -1"):
        extract_features(photo, affine_tilt=-1)


def test_same_individual_scores_above_different_individuals(photos) -> None:
    features = {name: [extract_features(image) for image in images] for name, images in photos.items()}
    self_match = match_features(features["ind_000"][0], extract_features(_warped(photos["ind_000"][0])[0]))
    others = [match_features(features["ind_000"][0], features[name][view]).inliers
              for name in ("ind_001", "ind_002", "ind_003") for view in range(3)]
    assert self_match.inliers >= 40 and max(others) <= 12
    # Across individuals, each one's best match among all other photos is one of its own other views.
    names = sorted(features)
    for name in names:
        for view, query in enumerate(features[name]):
            scores = {(other, v): match_features(query, candidate).inliers
                      for other in names for v, candidate in enumerate(features[other]) if (other, v) != (name, view)}
            assert max(scores, key=scores.get)[0] == name


def test_extraction_is_deterministic_and_compact(photos) -> None:
    first, second = extract_features(photos["ind_001"][0]), extract_features(photos["ind_001"][0])
    assert np.array_equal(first.keypoints, second.keypoints)
    assert np.array_equal(first.descriptors, second.descriptors)
    assert first.descriptors.dtype == np.uint8 and first.descriptors.shape[1] == 128
    # RootSIFT: unit L2 norm up to quantisation.
    norms = np.linalg.norm(first.descriptors.astype(np.float64) / 512.0, axis=1)
    assert np.allclose(norms, 1.0, atol=0.02)
    few = extract_features(photos["ind_001"][0], max_keypoints=20)
    assert len(few) == 20


def test_matching_is_deterministic(photos) -> None:
    a, b = extract_features(photos["ind_002"][0]), extract_features(photos["ind_002"][1])
    first, second = match_features(a, b), match_features(a, b)
    assert first == second and first.inliers > 0


def test_bytes_round_trip(photos) -> None:
    features = extract_features(photos["ind_003"][1])
    restored = LocalFeatures.from_bytes(features.to_bytes())
    assert restored == features and restored.image_size == features.image_size
    assert restored.keypoints.dtype == np.float32 and restored.descriptors.dtype == np.uint8
    assert restored.to_bytes() == features.to_bytes()
    assert len(features.to_bytes()) < 1000 + 140 * len(features)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "empty"])
def test_corrupt_blob_is_refused(photos, damage: str) -> None:
    blob = extract_features(photos["ind_003"][1]).to_bytes()
    bad = {"truncate": blob[: len(blob) // 2], "garbage": blob[:7] + b"\x00" * 200, "foreign": b"\x89PNG\r\n" + blob,
           "empty": b""}[damage]
    with pytest.raises(FeatureError, match="blob") as caught:
        LocalFeatures.from_bytes(bad)
    assert isinstance(caught.value, ReIDError)


def test_blob_of_another_version_is_refused() -> None:
    buffer = io.BytesIO()
    buffer.write(local_features._MAGIC)
    np.savez(buffer, format=np.array(99), keypoints=np.zeros((0, 2), np.float32),
             descriptors=np.zeros((0, 128), np.uint8), image_size=np.array([4, 4]))
    with pytest.raises(FeatureError, match="format version 99"):
        LocalFeatures.from_bytes(buffer.getvalue())


def test_flat_image_gives_no_keypoints_and_zero_inliers(photos) -> None:
    flat = np.full((120, 160, 3), 128, dtype=np.uint8)
    features = extract_features(flat)
    assert len(features) == 0 and features.keypoints.shape == (0, 2) and features.image_size == (160, 120)
    restored = LocalFeatures.from_bytes(features.to_bytes())
    textured = extract_features(photos["ind_000"][0])
    for query, photo in ((restored, textured), (textured, restored), (restored, restored)):
        match = match_features(query, photo)
        assert match.inliers == 0 and match.query_points.shape == (0, 2)
    assert draw_matches(flat, photos["ind_000"][0], match_features(restored, textured)).shape[2] == 3


def test_bad_inputs_name_the_value() -> None:
    with pytest.raises(FeatureError, match="uint8"):
        extract_features(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(FeatureError, match="max_side"):
        extract_features(np.zeros((10, 10, 3), dtype=np.uint8), max_side=0)
    empty = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), (10, 10))
    with pytest.raises(FeatureError, match="ratio"):
        match_features(empty, empty, ratio=1.5)


def test_matching_in_parallel_gives_each_pair_its_own_match_and_leaves_blas_as_it_was(photos) -> None:
    """match_all is match_features pair by pair, whoever else matches at the same time; the BLAS libraries, held to
    one thread while the pairs run, get their own thread counts back."""
    import threading

    import threadpoolctl

    features = [extract_features(image) for name in sorted(photos) for image in photos[name]]
    pairs = [(features[a], features[b]) for a in range(len(features)) for b in range(len(features)) if a != b]
    expected = [match_features(query, photo) for query, photo in pairs]
    before = [(library["filepath"], library["num_threads"]) for library in threadpoolctl.threadpool_info()]
    results: dict[int, list[Match]] = {}

    def run(slot: int) -> None:
        results[slot] = match_all(pairs[slot::2])

    threads = [threading.Thread(target=run, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [m.inliers for m in results[0]] == [m.inliers for m in expected[0::2]]
    assert [m.inliers for m in results[1]] == [m.inliers for m in expected[1::2]]
    assert all(np.array_equal(got.query_points, want.query_points) for got, want in zip(results[0], expected[0::2]))
    assert max(m.inliers for m in expected) > 20, "some pairs are of one individual"
    assert [(library["filepath"], library["num_threads"]) for library in threadpoolctl.threadpool_info()] == before


def test_draw_matches_size(photos) -> None:
    query, photo = photos["ind_000"][0], cv2.resize(photos["ind_000"][1], (384, 256))
    match = match_features(extract_features(query), extract_features(photo))
    canvas = draw_matches(query, photo, match, max_lines=10, labels=("query.png", "ind_000 photo 1"))
    # 256x256 -> 480x480 and 384x256 -> 720x480, an 8-px gap, a 2 x 30-px caption band
    assert canvas.dtype == np.uint8 and canvas.shape == (480 + 60, 480 + 8 + 720, 3)
    assert draw_matches(query, photo, Match(0, np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)),
                        height=200).shape[0] == 200 + 40


def test_a_sliver_of_a_photo_is_drawn_at_a_bounded_size(photos) -> None:
    """A 20,000 x 1 photo passes any pixel limit; scaled to the panel height it would be 9.6 million pixels wide."""
    sliver = np.full((1, 20_000, 3), 128, dtype=np.uint8)
    none = Match(0, np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32))
    canvas = draw_matches(sliver, photos["ind_000"][0], none)
    assert canvas.shape == (480 + 60, 3 * 480 + 8 + 480, 3), "the sliver's panel is three heights wide at most"
    assert draw_matches(photos["ind_000"][0], sliver.transpose(1, 0, 2).copy(), none).shape[1] == 480 + 8 + 1


def test_features_of_a_real_file(tmp_path: Path, photos) -> None:
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), cv2.cvtColor(photos["ind_001"][2], cv2.COLOR_RGB2BGR))
    features = extract_features(decode_image(path), max_side=128)
    assert len(features) > 0 and features.keypoints[:, 0].max() < 256
