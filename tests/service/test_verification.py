"""Local verification in the service: a checkpoint calibrated with ``reid calibrate --verify`` makes identify check
its top candidates with local features cached at enrolment; the evidence carries the inlier count; a restart reads
the features back instead of extracting them again; an old store gets them; ``POST /identify/explain`` draws them.
"""

from __future__ import annotations

import io
import logging
import shutil
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reid import cli
from reid.imageio import decode_image
from reid.inference import Embedder, write_checkpoint_metadata
from reid.local_features import Extraction
from reid.verification import Fallback
from service.engine import Engine
from service.offline import enroll_dataset
from service.settings import Settings
from service.store import DATABASE_NAME, Store
from tests.service.conftest import StartServer
from tests.service.helpers import enroll, identify, photos


def feature_rows(data_dir: Path) -> dict[int, set[tuple[int, str]]]:
    """image id → the (long side, method) of each set of local features stored for it, read from the database."""
    rows: dict[int, set[tuple[int, str]]] = {}
    with sqlite3.connect(data_dir / DATABASE_NAME) as database:
        for image_id, max_side, method in database.execute("SELECT image_id, max_side, method FROM local_features"):
            rows.setdefault(image_id, set()).add((max_side, method))
    return rows


def png_bytes(pixels: np.ndarray) -> bytes:
    """An RGB array as PNG bytes, what a client uploads."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def explain(client: httpx.Client, query: bytes, individual_id: str, image_id: int) -> httpx.Response:
    return client.post("/identify/explain", files={"file": ("query.png", query)},
                       data={"individual_id": individual_id, "image_id": str(image_id)})


@pytest.mark.slow
def test_verified_identify_explain_delete_and_restart(start_server: StartServer, tmp_path: Path,
                                                      verified: tuple[Path, Path],
                                                      verified_records: pd.DataFrame) -> None:
    checkpoint, _ = verified
    data_dir = tmp_path / "data"
    server = start_server(checkpoint, data_dir)  # verify unset: on, because the checkpoint was calibrated for it
    uploads = {f"turtle-{i}": photos(verified_records, f"ind_00{i}") for i in range(5)}
    enrolled: dict[str, list[int]] = {}
    with server.client() as client:
        health = client.get("/health").json()
        assert health["verification"] is True
        assert health["threshold_source"] == "checkpoint"
        assert health["threshold"] == pytest.approx(Embedder.from_checkpoint(checkpoint).verification.threshold)
        for name, pictures in uploads.items():
            response = enroll(client, name, pictures[:3])
            assert response.status_code == 201, response.text
            enrolled[name] = [image["image_id"] for image in response.json()["images"]]
        assert sorted(feature_rows(data_dir)) == sorted(i for ids in enrolled.values() for i in ids)

        query = uploads["turtle-0"][3]  # another photo of the first individual, never enrolled
        answer = identify(client, query)
        assert answer.status_code == 200, answer.text
        best = answer.json()["predictions"][0]
        assert best["individual_id"] == "turtle-0"
        evidence = best["evidence"]
        assert evidence["image_id"] in enrolled["turtle-0"] and evidence["inliers"] > 0
        assert evidence["inliers_counted"] is True
        # the other turtles' photos match by chance at most: the answer says the score did not count those matches
        assert any(p["evidence"]["inliers_counted"] is False for p in answer.json()["predictions"][1:] if p["evidence"])
        assert -1.0 <= evidence["similarity"] <= 1.0

        drawn = explain(client, query, "turtle-0", evidence["image_id"])
        assert drawn.status_code == 200, drawn.text
        assert drawn.headers["content-type"] == "image/png"
        assert int(drawn.headers["x-inliers"]) == evidence["inliers"], "the drawing shows the matches identify counted"
        assert drawn.headers["x-inliers-counted"] == "true"
        assert float(drawn.headers["x-similarity"]) == pytest.approx(evidence["similarity"], abs=1e-4)
        with Image.open(io.BytesIO(drawn.content)) as png:
            assert png.format == "PNG"
            width, height = png.size
        assert height > 480 and width > 2 * 480, "both photos side by side at 480 px high, with a caption band"

        unknown = explain(client, query, "nobody", evidence["image_id"])
        assert unknown.status_code == 404 and unknown.json()["field"] == "individual_id"
        assert "'nobody'" in unknown.json()["message"]
        missing = explain(client, query, "turtle-0", 999_999)
        assert missing.status_code == 404 and missing.json()["field"] == "image_id"
        assert "999999" in missing.json()["message"]
        garbage = explain(client, b"not a photo", "turtle-0", evidence["image_id"])
        assert garbage.status_code == 422 and garbage.json()["error"] == "invalid_image"
        assert garbage.json()["field"] == "file"

        gone = enrolled["turtle-1"][0]
        assert client.delete(f"/individuals/turtle-1/images/{gone}").status_code == 204
        assert client.delete("/individuals/turtle-2").status_code == 204
        remaining = feature_rows(data_dir)
        assert gone not in remaining and not set(enrolled["turtle-2"]) & set(remaining)
        assert len(remaining) == 15 - 1 - 3
    server.stop()

    restarted = start_server(checkpoint, data_dir, "--verify")
    assert "(11 photos' features in memory)" in restarted.log()
    assert "extracting the local features" not in restarted.log(), "features are read back, not extracted again"
    assert len(feature_rows(data_dir)) == 11
    with restarted.client() as client:
        best = identify(client, uploads["turtle-3"][4]).json()["predictions"][0]
        assert best["individual_id"] == "turtle-3" and best["evidence"]["inliers"] > 0


def test_old_store_gets_features_when_verification_is_turned_on(tmp_path: Path, verified: tuple[Path, Path],
                                                                verified_records: pd.DataFrame,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    checkpoint, _ = verified
    data_dir = tmp_path / "data"
    plain = Engine.open(Settings(checkpoint=checkpoint, data_dir=data_dir, verify=False))
    assert not plain.verifying
    assert plain.threshold(None).value == pytest.approx(Embedder.from_checkpoint(checkpoint).threshold)
    for i in range(3):
        plain.enroll(f"turtle-{i}", [plain.decode_upload(data, "files", None) for data in photos(verified_records,
                                                                                      f"ind_00{i}")[:2]], "new")
    query = decode_image(photos(verified_records, "ind_001")[3])
    evidence = [p.evidence for p in plain.identify([query], 3, None)[0].predictions if p.evidence is not None]
    assert evidence and all(e.inliers is None for e in evidence), "no verification ran"
    assert feature_rows(data_dir) == {}, "verification off: no features are extracted at enrolment"
    with sqlite3.connect(data_dir / DATABASE_NAME) as database:  # make it a store from before the features table
        database.execute("DROP TABLE local_features")
        database.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")

    plain.close()
    with caplog.at_level(logging.INFO, logger="service"):
        verifying = Engine.open(Settings(checkpoint=checkpoint, data_dir=data_dir))
    assert "upgraded from schema version 1 to 4" in caplog.text
    assert "extracting the local features of 6 photos" in caplog.text and "6/6 photos done" in caplog.text
    extraction = verifying.verification.fusion.extraction
    assert extraction.equalise, "a freshly calibrated checkpoint equalises"
    assert feature_rows(data_dir) == {image_id: {(1024, "rootsift-clahe")} for image_id in range(1, 7)}
    best = verifying.identify([query], 3, None)[0].predictions[0]
    assert best.individual_id == "turtle-1" and best.evidence.inliers > 0

    verifying.close()
    with sqlite3.connect(data_dir / DATABASE_NAME) as database:  # a version 2 store: one row a photo, no method
        database.executescript("""
            CREATE TABLE old (image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
                              max_side INTEGER NOT NULL, features BLOB NOT NULL);
            INSERT INTO old SELECT image_id, max_side, features FROM local_features;
            DROP TABLE local_features;
            ALTER TABLE old RENAME TO local_features;
            UPDATE meta SET value = '2' WHERE key = 'schema';""")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="service"):
        Engine.open(Settings(checkpoint=checkpoint, data_dir=data_dir)).close()
    assert "upgraded from schema version 2 to 4" in caplog.text
    assert "extracting the local features of 6 photos" in caplog.text, \
        "features of a version 2 store were not equalised: they are not mixed with equalised queries"
    assert feature_rows(data_dir) == {image_id: {(1024, "rootsift"), (1024, "rootsift-clahe")}
                                      for image_id in range(1, 7)}, "the old rows are kept beside the new ones"


def test_empty_gallery_and_offline_enrolment_with_verification(tmp_path: Path, verified: tuple[Path, Path],
                                                               verified_records: pd.DataFrame,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    checkpoint, dataset = verified
    data_dir = tmp_path / "data"
    empty = Engine.open(Settings(checkpoint=checkpoint, data_dir=data_dir))
    answer = empty.identify([decode_image(photos(verified_records, "ind_000")[0])], 5, None)[0]
    assert answer.new_turtle and [p.individual_id for p in answer.predictions] == ["new_turtle"]

    empty.close()
    enroll_dataset(checkpoint, data_dir, dataset, progress=False)
    assert len(feature_rows(data_dir)) == 60, "offline enrolment stores the features a verifying server needs"
    with caplog.at_level(logging.INFO, logger="service"):
        Engine.open(Settings(checkpoint=checkpoint, data_dir=data_dir)).close()
    assert "extracting" not in caplog.text and "(60 photos' features in memory)" in caplog.text


def test_verify_with_an_uncalibrated_checkpoint_refuses_to_start(tmp_path: Path, checkpoint_a: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    def serve_anyway(*_: object, **__: object) -> None:
        raise AssertionError("the server started")

    monkeypatch.setattr("uvicorn.run", serve_anyway)
    monkeypatch.setenv("REID_VERIFY", "true")
    assert cli.main(["serve", "--checkpoint", str(checkpoint_a), "--data-dir", str(tmp_path / "data")]) == 2
    message = capsys.readouterr().err
    assert message.startswith("reid: error:") and "Traceback" not in message
    assert str(checkpoint_a) in message and "REID_VERIFY" in message and "reid calibrate --verify" in message
    assert not (tmp_path / "data").exists(), "refused before touching the data folder"


def test_explain_without_verification_extracts_features_on_the_fly(client: httpx.Client,
                                                                   records: pd.DataFrame) -> None:
    pictures = photos(records, "ind_006")
    image_id = enroll(client, "explained", pictures[:1]).json()["images"][0]["image_id"]
    drawn = explain(client, pictures[0], "explained", image_id)
    assert drawn.status_code == 200, drawn.text
    assert drawn.content.startswith(b"\x89PNG\r\n\x1a\n") and int(drawn.headers["x-inliers"]) >= 0
    assert float(drawn.headers["x-similarity"]) == pytest.approx(1.0, abs=1e-3), "a photo against itself"
    assert client.get("/health").json()["verification"] is False

    sliver = io.BytesIO()
    Image.new("RGB", (20_000, 16)).save(sliver, format="PNG")  # a few hundred bytes; 20,000 x 1 once cost the server 24 GB
    drawn = explain(client, sliver.getvalue(), "explained", image_id)
    assert drawn.status_code == 200 and drawn.content.startswith(b"\x89PNG"), drawn.text
    assert Image.open(io.BytesIO(drawn.content)).width < 3_000
    assert client.get("/health").status_code == 200

    documented = client.get("/openapi.json").json()["paths"]["/identify/explain"]["post"]["responses"]
    assert "image/png" in documented["200"]["content"]
    assert documented["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")


def fallback_checkpoint(verified: tuple[Path, Path], destination: Path) -> Path:
    """The verified checkpoint with a cheap ASIFT fallback on its 4 most similar photos."""
    shutil.copy(verified[0], destination)
    verification = Embedder.from_checkpoint(destination).verification
    fallback = Fallback(top=4, extraction=Extraction(max_keypoints=300, affine_tilt=2))
    write_checkpoint_metadata(destination, verification=replace(
        verification, fusion=replace(verification.fusion, fallback=fallback)).to_dict())
    return destination


def test_a_deletion_during_a_verified_query_neither_waits_for_it_nor_breaks_it(
        tmp_path: Path, verified: tuple[Path, Path]) -> None:
    """A photo deleted while a query is matching it again under simulated tilts (a fallback's first extraction takes
    seconds): the deletion completes at once, and the query is still answered, naming no evidence for that photo."""
    engine = Engine.open(Settings(checkpoint=fallback_checkpoint(verified, tmp_path / "fallback.ckpt"),
                                  data_dir=tmp_path / "data"))
    noise = [np.random.default_rng(seed).integers(0, 256, (160, 160, 3), dtype=np.uint8) for seed in range(3)]
    for i, photo in enumerate(noise[:2]):  # noise matches noise by a few inliers at most: the query falls back
        engine.enroll(f"noise-{i}", [engine.decode_upload(png_bytes(photo), "files", None)], "new")
    fallback_features = engine._fallback_features
    deleted: list[int] = []

    def delete_first(image_id: int):
        if not deleted:
            deleted.append(image_id)
            deletion = threading.Thread(target=engine.delete_image, args=(f"noise-{image_id - 1}", image_id))
            deletion.start()
            deletion.join(timeout=30)
            assert not deletion.is_alive(), "the deletion waited for the query in flight"
        return fallback_features(image_id)

    engine._fallback_features = delete_first
    answer = engine.identify([noise[2]], 4, None)[0]
    assert deleted, "the query fell back"
    named = [p.individual_id for p in answer.predictions]
    assert f"noise-{deleted[0] - 1}" not in named and f"noise-{2 - deleted[0]}" in named, "its only photo was deleted"
    assert engine.store.images(deleted) == {} and len(engine.gallery) == 1
    engine.close()


def test_the_fallback_matches_a_slanted_photo_and_keeps_its_features_in_the_store(
        tmp_path: Path, verified: tuple[Path, Path], slanted_turtle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint whose fusion falls back to simulated tilts: the slanted photo's individual is answered with the
    fallback's inliers as evidence, the gallery photos' fallback features are extracted once and stored beside the
    plain ones, and explain draws the fallback's matches."""
    upright, slanted = slanted_turtle
    data_dir = tmp_path / "data"
    engine = Engine.open(Settings(checkpoint=fallback_checkpoint(verified, tmp_path / "fallback.ckpt"),
                                  data_dir=data_dir))
    for i, photo in enumerate(upright):
        engine.enroll(f"turtle-{i}", [engine.decode_upload(png_bytes(photo), "files", None)], "new")
    assert all(methods == {(1024, "rootsift-clahe")} for methods in feature_rows(data_dir).values()), \
        "enrolment extracts no fallback features"

    answer = engine.identify([slanted], 4, None)[0]
    found = {p.individual_id: p.evidence for p in answer.predictions if p.evidence is not None}
    assert found["turtle-0"].inliers >= 30 and max(e.inliers for name, e in found.items() if name != "turtle-0") < 10
    assert answer.predictions[0].individual_id in ("turtle-0", "new_turtle")
    fallback_rows = {image_id for image_id, methods in feature_rows(data_dir).items()
                     if (1024, "rootsift-clahe-300-asift2") in methods}
    assert fallback_rows == {1, 2, 3, 4}
    tilted_extractions: list[tuple[int, int]] = []
    extract = Extraction.extract

    def counted(self: Extraction, image: np.ndarray) -> object:
        if self.affine_tilt:
            tilted_extractions.append(image.shape[:2])
        return extract(self, image)

    monkeypatch.setattr(Extraction, "extract", counted)
    engine.identify([slanted], 4, None)
    assert tilted_extractions == [slanted.shape[:2]], "only the query is extracted again; the gallery's are read back"

    explanation = engine.explain(engine.decode_upload(png_bytes(slanted), "file", None), "slanted.png", "turtle-0", 1)
    assert explanation.fallback and explanation.inliers >= 30
    engine.close()


def test_a_verifying_server_starts_over_a_lost_photo_file_so_it_can_be_deleted(tmp_path: Path,
                                                                              verified: tuple[Path, Path],
                                                                              verified_records: pd.DataFrame,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A restore that missed one photo file once kept a verifying server down, advising a DELETE through it."""
    checkpoint, _ = verified
    data_dir = tmp_path / "data"
    plain = Engine.open(Settings(checkpoint=checkpoint, data_dir=data_dir, verify=False))
    for i in range(2):
        plain.enroll(f"turtle-{i}", [plain.decode_upload(data, "files", None) for data in photos(verified_records,
                                                                                      f"ind_00{i}")[:2]], "new")
    plain.close()
    lost = data_dir / Store(data_dir).images([1])[1].file
    lost.unlink()
    with caplog.at_level(logging.WARNING, logger="service"):
        verifying = Engine.open(Settings(checkpoint=checkpoint, data_dir=data_dir))
    assert ("image 1 of individual 'turtle-0' is served without local features, so it matches nothing locally, until "
            "its file is restored or it is deleted (DELETE /individuals/turtle-0/images/1)") in caplog.text
    best = verifying.identify([decode_image(photos(verified_records, "ind_001")[3])], 3, None)[0].predictions[0]
    assert best.individual_id == "turtle-1"
    verifying.delete_image("turtle-0", 1)
    assert len(verifying.gallery) == verifying.store.counts()[1] == 3
