"""Local verification through the CLI: `reid calibrate --verify` teaches a checkpoint to verify, and evaluate,
predict and explain then show the verified evidence."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from reid.cli import main
from reid.errors import FeatureError
from reid.imageio import decode_image
from reid.inference import Embedder, export_encoder, write_checkpoint_metadata
from reid.local_features import Extraction, LocalFeatures, extract_features
from reid.verification import (DEFAULT_INLIER_FLOOR, Fallback, FallbackFeatures, Fusion, LocalVerifier,
                               extract_all, feature_cache_dir)


@pytest.fixture(scope="module")
def textured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic individuals at 160 px: enough texture for SIFT keypoints."""
    from reid.data.synth import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("textured")
    generate_synthetic_dataset(root, individuals=6, images_per_individual=4, seed=3, image_size=160, progress=False)
    return root


@pytest.fixture(scope="module")
def verified(tmp_path_factory: pytest.TempPathFactory, textured: Path) -> Path:
    """An untrained encoder (it cannot tell these individuals apart) calibrated for verification; its random
    weights are seeded, so the test does not depend on the process's starting seed."""
    torch.manual_seed(2)
    checkpoint = export_encoder(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", "lcnet_050", False, 48)
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(textured), "--verify",
                 "--candidates", "8"]) == 0
    return checkpoint


def test_calibrate_verify_stores_fusion_and_its_own_threshold(verified: Path) -> None:
    verification = Embedder.from_checkpoint(verified).verification
    assert verification is not None and 0.0 <= verification.threshold <= 1.0 + 1e-5  # probabilities (a bar can top the best)
    assert verification.threshold_origin.startswith("reid calibrate --verify")
    fusion = verification.fusion
    assert fusion.candidates == 8 and fusion.extraction == Extraction(1024, equalise=True)
    # more verified matches never make a pair less likely to be the same individual
    assert list(fusion.inliers([0, 5, 20, 60])) == sorted(fusion.inliers([0, 5, 20, 60]))


def test_a_fusion_stored_before_equalisation_keeps_extracting_without_it(verified: Path, textured: Path) -> None:
    fusion = Embedder.from_checkpoint(verified).verification.fusion
    stored = fusion.to_dict()
    assert Fusion.from_dict(stored) == fusion
    del stored["equalise"]  # what checkpoints calibrated before equalisation hold: their inliers were counted without
    legacy = Fusion.from_dict(stored)
    assert legacy.extraction == Extraction(1024, equalise=False)
    photo = sorted((textured / "images").glob("*/*.png"))[0]
    plain, equalised = extract_all([photo], legacy.extraction)[0], extract_all([photo], fusion.extraction)[0]
    assert plain == extract_features(decode_image(photo), equalise=False)  # not the equalised photo's cache entry
    assert equalised == extract_features(decode_image(photo)) and plain != equalised


def test_a_keypoint_budget_other_than_the_default_is_stored_and_keyed_apart(verified: Path, textured: Path) -> None:
    """A fusion learnt on 3,000 keypoints a photo keeps extracting 3,000; one stored before the budget was a
    setting extracts the default 1,500; and the two never share a cache entry or a store column."""
    fusion = Embedder.from_checkpoint(verified).verification.fusion
    larger = replace(fusion, extraction=Extraction(1024, equalise=True, max_keypoints=3000))
    assert Fusion.from_dict(larger.to_dict()).extraction.max_keypoints == 3000
    stored = fusion.to_dict()
    del stored["max_keypoints"]
    assert Fusion.from_dict(stored).extraction == Extraction(1024, equalise=True, max_keypoints=1500)
    assert (larger.extraction.method, fusion.extraction.method) == ("rootsift-clahe-3000", "rootsift-clahe")
    photo = sorted((textured / "images").glob("*/*.png"))[0]
    few, many = extract_all([photo], Extraction(max_keypoints=20))[0], extract_all([photo], larger.extraction)[0]
    assert len(few) == 20 < len(many) and many == extract_features(decode_image(photo), max_keypoints=3000)
    with pytest.raises(FeatureError, match="max_keypoints must be an integer >= 1, got 0"):
        Extraction(max_keypoints=0)


def test_dataset_features_are_extracted_once_and_read_back(verified: Path, textured: Path) -> None:
    photos = sorted((textured / "images").glob("*/*.png"))
    cached = list(feature_cache_dir().rglob("*.bin"))
    assert len(cached) >= len(photos)  # calibrate extracted every photo once
    before = {path: path.stat().st_mtime_ns for path in cached}
    again = extract_all(photos[:3])
    assert again == [extract_features(decode_image(photo)) for photo in photos[:3]]
    assert all(path.stat().st_mtime_ns == before[path] for path in cached)  # read back, not written again


def test_verification_rescues_an_encoder_that_cannot_tell_individuals_apart(
        verified: Path, textured: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(verified), "--data", str(textured), "--no-verify", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--checkpoint", str(verified), "--data", str(textured), "--json"]) == 0
    checked = json.loads(capsys.readouterr().out)
    assert (plain["verified"], checked["verified"]) == (False, True)  # on by default once calibrated
    assert checked["closed_set"]["map5"] > plain["closed_set"]["map5"] + 0.2
    assert checked["threshold_origin"].startswith("reid calibrate --verify")


def test_predict_report_names_the_matched_photo_and_its_inliers(verified: Path, textured: Path, tmp_path: Path) -> None:
    queries = tmp_path / "queries"
    queries.mkdir()
    photo = sorted((textured / "images").glob("*/*.png"))[1]
    shutil.copy(photo, queries / "q1.png")
    report = tmp_path / "report.json"
    assert main(["predict", "--checkpoint", str(verified), "--gallery", str(textured), "--queries", str(queries),
                 "--out", str(tmp_path / "submission.csv"), "--report", str(report)]) == 0
    answer = json.loads(report.read_text())["queries"][0]
    best = answer["predictions"][0]
    assert answer["image_id"] == "q1" and best["individual"] == photo.parent.name
    assert Path(best["evidence"]["path"]) == photo  # the very photo, found again, with its geometric matches
    assert best["evidence"]["inliers"] > 20 and best["evidence"]["similarity"] == pytest.approx(1.0, abs=1e-4)
    # other turtles' photos match by chance at most: the report says their counts were not counted as a match
    counted = [(p["evidence"]["inliers"], p["evidence"]["inliers_counted"]) for p in answer["predictions"]
               if p["evidence"]]
    assert counted[0] == (best["evidence"]["inliers"], True) and (0, False) in counted[1:]
    assert all(flag is (None if inliers is None else inliers >= DEFAULT_INLIER_FLOOR) for inliers, flag in counted)


def test_explain_draws_the_pair_and_verify_without_calibration_is_refused(
        verified: Path, textured: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = sorted((textured / "images").glob("*/*.png"))[:2]
    out = tmp_path / "explain.png"
    assert main(["explain", "--checkpoint", str(verified), "--query", str(first), "--photo", str(second),
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "verified local-feature matches" in capsys.readouterr().out
    other = next(path for path in sorted((textured / "images").glob("*/*.png")) if path.parent != first.parent)
    assert main(["explain", "--checkpoint", str(verified), "--query", str(first), "--photo", str(other),
                 "--out", str(out)]) == 0  # another individual: chance-level matches at most, and it says so
    assert ("fewer than the inlier floor of 8, as many as photos of different individuals reach by chance, so the "
            "score reads them as no match") in capsys.readouterr().out
    assert main(["explain", "--checkpoint", str(verified), "--query", str(first), "--photo", str(second),
                 "--out", str(tmp_path / "explain.jpg")]) == 2
    assert "--out " + str(tmp_path / "explain.jpg") + ": the drawing is a PNG" in capsys.readouterr().err
    plain = export_encoder(tmp_path / "plain.ckpt", "lcnet_050", False, 48)
    assert main(["evaluate", "--checkpoint", str(plain), "--data", str(textured), "--verify"]) == 2
    assert "reid calibrate --verify" in capsys.readouterr().err


def test_a_fusion_learnt_from_cached_inlier_counts_equals_one_learnt_by_matching(textured: Path) -> None:
    """Benchmarks compare fusions on counts they cached (bench/open_set_levers.py): the counts must stand in for
    matching exactly, each pair asked once."""
    import numpy as np

    from reid.data.records import read_dataset
    from reid.local_features import match_features
    from reid.verification import fit_fusion, fusion_from_pairs, fusion_training_pairs

    records = read_dataset(textured)
    identities = records["identity"].tolist()
    features = extract_all(records["path"].tolist())
    vectors = np.random.default_rng(0).normal(size=(len(identities), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    asked: list[tuple[int, int]] = []

    def cached(i: int, j: int) -> int:
        asked.append((i, j))
        return match_features(features[i], features[j]).inliers

    matched = fit_fusion(vectors, identities, features, candidates=5)
    cached_pairs = fusion_training_pairs(vectors, identities, features, candidates=5, pair_inliers=cached)
    assert fusion_from_pairs(cached_pairs, candidates=5) == matched
    assert len(asked) == len(set(asked)) == len(identities) * 5
    similarities, inliers, same = cached_pairs
    assert len(similarities) == len(inliers) == len(same) == len(identities) * 5
    assert same.any() and not same.all()


#: A cheaper fallback extraction for the tests' 512 px photos (the default keeps 700 keypoints a simulated view).
TEST_FALLBACK = Extraction(max_keypoints=300, affine_tilt=2)


def test_the_fallback_matches_a_slanted_photo_that_plain_matching_misses(verified: Path, slanted_turtle) -> None:
    """Where no candidate reaches the floor, the most similar are matched again under simulated tilts: the slanted
    photo's own individual is found, the others stay under the floor. A query plain matching already matches never
    pays for the fallback."""
    import numpy as np

    upright, slanted = slanted_turtle
    fusion = replace(Embedder.from_checkpoint(verified).verification.fusion,
                     fallback=Fallback(top=4, floor=10, extraction=TEST_FALLBACK))
    plain = [extract_features(photo) for photo in upright]
    tilted = [TEST_FALLBACK.extract(photo) for photo in upright]
    asked: list[int] = []

    def verifier(query: np.ndarray, fused: Fusion = fusion) -> LocalVerifier:
        def gallery(image_id: int) -> LocalFeatures:
            asked.append(image_id)
            return tilted[image_id]
        return LocalVerifier(fused, plain.__getitem__, [extract_features(query)],
                             fallback=FallbackFeatures(gallery, lambda _: TEST_FALLBACK.extract(query)))

    without = verifier(slanted, replace(fusion, fallback=None)).inliers(0, np.arange(4))
    assert without.max() < 10 and asked == []
    with_fallback = verifier(slanted).inliers(0, np.arange(4))
    assert with_fallback[0] >= 30 and with_fallback[1:].max() < 10 and sorted(asked) == [0, 1, 2, 3]
    asked.clear()
    assert verifier(upright[0]).inliers(0, np.arange(4))[0] > 100 and asked == []
    with pytest.raises(ValueError, match="needs their features"):
        LocalVerifier(fusion, plain.__getitem__, [plain[0]])


def test_a_fallback_travels_in_the_fusion_and_older_fusions_have_none(verified: Path) -> None:
    fusion = Embedder.from_checkpoint(verified).verification.fusion
    assert fusion.fallback is None
    with_fallback = replace(fusion, fallback=Fallback(top=5))
    stored = with_fallback.to_dict()
    assert Fusion.from_dict(stored) == with_fallback
    assert Fusion.from_dict(stored).fallback.extraction.method == "rootsift-clahe-700-asift2"
    del stored["fallback"]  # what checkpoints calibrated before fallbacks existed hold
    assert Fusion.from_dict(stored).fallback is None
    with pytest.raises(FeatureError, match="fallback top must be an integer >= 1, got 0"):
        Fallback(top=0)


def test_counts_under_the_inlier_floor_score_as_no_match_and_older_fusions_read_every_count(
        verified: Path, textured: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fusion = Embedder.from_checkpoint(verified).verification.fusion
    assert fusion.inlier_floor == DEFAULT_INLIER_FLOOR == 8  # what calibrate --verify stores by default
    similarities, counts = [0.5] * 4, [0, 7, 8, 30]
    scores = fusion(similarities, counts)
    every_count = replace(fusion, inlier_floor=0)(similarities, counts)
    # a random-looking 7 counts as no match, 8 and more as they are
    assert scores[1] == scores[0] and list(scores[2:]) == list(every_count[2:])
    stored = fusion.to_dict()
    assert Fusion.from_dict(stored) == fusion
    del stored["inlier_floor"]  # what checkpoints calibrated before the floor hold: they keep scoring as they did
    assert Fusion.from_dict(stored).inlier_floor == 0
    with pytest.raises(FeatureError, match="inlier floor must be an integer >= 0, got -1"):
        replace(fusion, inlier_floor=-1)

    checkpoint = tmp_path / "floor.ckpt"
    shutil.copy(verified, checkpoint)
    capsys.readouterr()
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(textured), "--verify",
                 "--candidates", "8", "--inlier-floor", "0"]) == 0
    verification = Embedder.from_checkpoint(checkpoint).verification
    assert verification.fusion.inlier_floor == 0 and "inliers read as none" not in verification.threshold_origin
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(textured), "--verify",
                 "--candidates", "8", "--inlier-floor", "5"]) == 0
    verification = Embedder.from_checkpoint(checkpoint).verification
    assert verification.fusion.inlier_floor == 5 and "under 5 inliers read as none" in verification.threshold_origin
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(textured)]) == 0
    assert "under 5 inliers read as none" in capsys.readouterr().out
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(textured), "--inlier-floor", "5"]) == 2
    assert "--inlier-floor 5 needs --verify: it is a setting of the verification" in capsys.readouterr().err


def test_calibrate_with_a_fallback_stores_it_and_evaluate_uses_it(
        verified: Path, textured: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "fallback.ckpt"
    shutil.copy(verified, checkpoint)
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(textured), "--verify",
                 "--candidates", "8", "--fallback", "3"]) == 0
    verification = Embedder.from_checkpoint(checkpoint).verification
    assert verification.fusion.fallback == Fallback(top=3)
    assert "ASIFT fallback on the 3 most similar photos" in verification.threshold_origin
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(textured)]) == 0
    assert "ASIFT fallback on the 3 most similar photos" in capsys.readouterr().out
    # recalibrated without naming them, the checkpoint's verification settings stay: a turtles_cpu.yaml checkpoint
    # recalibrated on other data keeps its fallback
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(textured), "--verify", "--seed", "2"]) == 0
    kept = Embedder.from_checkpoint(checkpoint).verification
    assert (kept.fusion.fallback, kept.fusion.candidates, kept.fusion.extraction) == (Fallback(top=3), 8,
                                                                                      verification.fusion.extraction)
    assert "ASIFT fallback on the 3 most similar photos" in kept.threshold_origin
    assert ("verification settings (the checkpoint's, unless given): the 8 most similar photos, features at 1024 px, "
            "inlier floor 8, ASIFT fallback on the 3 most similar") in capsys.readouterr().out
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(textured), "--verify", "--fallback", "0"]) == 0
    assert Embedder.from_checkpoint(checkpoint).verification.fusion.fallback is None  # 0 turns a stored one off
    # a fusion learnt before contrast equalisation (no "equalise" stored) is learnt again with it
    legacy = Embedder.from_checkpoint(checkpoint).verification.to_dict()
    del legacy["fusion"]["equalise"]
    write_checkpoint_metadata(checkpoint, verification=legacy)
    assert Embedder.from_checkpoint(checkpoint).verification.fusion.extraction.equalise is False
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(textured), "--verify", "--fallback", "3",
                 "--max-side", "512"]) == 0
    verification = Embedder.from_checkpoint(checkpoint).verification
    assert verification.fusion.extraction == Extraction(512, equalise=True)
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(textured), "--fallback", "0"]) == 2
    assert "--fallback 0 needs --verify" in capsys.readouterr().err
    for flag in ("--fallback", "--candidates", "--max-side", "--inlier-floor"):
        assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(textured), flag, "300"]) == 2
        assert f"{flag} 300 needs --verify: it is a setting of the verification" in capsys.readouterr().err
    # without --verify only the similarity threshold is refitted, which this verifying checkpoint does not answer by
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(textured)]) == 0
    assert (f"note: this checkpoint verifies its answers, so evaluate, predict and serve use its threshold "
            f"{verification.threshold:.4f} on fused scores, not this one (which applies with --no-verify)"
            ) in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
        main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(textured), "--verify", "--fallback", "-1"])
    assert exit_info.value.code == 2 and "argument --fallback: must be at least 0, got -1" in capsys.readouterr().err
    assert Embedder.from_checkpoint(checkpoint).verification == verification, "a refused command changes nothing"


def test_predict_with_a_fallback_finds_the_slanted_photo_in_a_gallery_of_files(
        verified: Path, slanted_turtle, tmp_path: Path) -> None:
    """`reid predict` with a checkpoint whose fusion falls back: the photo files' fallback features are extracted
    on demand, and the report's evidence for the right individual carries the fallback's inliers."""
    from PIL import Image

    from reid.inference import write_checkpoint_metadata

    upright, slanted = slanted_turtle
    checkpoint = tmp_path / "fallback.ckpt"
    shutil.copy(verified, checkpoint)
    verification = Embedder.from_checkpoint(checkpoint).verification
    write_checkpoint_metadata(checkpoint, verification=replace(verification, fusion=replace(
        verification.fusion, fallback=Fallback(top=4, extraction=TEST_FALLBACK))).to_dict())
    for i, photo in enumerate(upright):
        (tmp_path / "gallery" / f"ind_00{i}").mkdir(parents=True)
        Image.fromarray(photo).save(tmp_path / "gallery" / f"ind_00{i}" / "upright.png")
    (tmp_path / "queries").mkdir()
    Image.fromarray(slanted).save(tmp_path / "queries" / "slanted.png")
    report = tmp_path / "report.json"
    assert main(["predict", "--checkpoint", str(checkpoint), "--gallery", str(tmp_path / "gallery"), "--queries",
                 str(tmp_path / "queries"), "--out", str(tmp_path / "submission.csv"), "--report", str(report)]) == 0
    evidence = {p["individual"]: p["evidence"] for p in json.loads(report.read_text())["queries"][0]["predictions"]
                if p.get("evidence")}
    assert evidence["ind_000"]["inliers"] >= 30
    assert max(e["inliers"] for name, e in evidence.items() if name != "ind_000") < 10
