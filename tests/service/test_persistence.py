"""Durability and model changes: restarts, kill -9 during enrolment, offline enrol, the model-change refusal and
``reid reindex`` (including a re-index that dies half-way)."""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from PIL import Image

from reid.errors import ReIDError
from reid.inference import Embedder
from service.engine import Engine
from service.errors import ModelMismatchError
from service.offline import EnrollReport, enroll_dataset, reindex
from service.settings import Settings
from service.store import Store
from tests.service.conftest import StartServer, reid_command
from tests.service.helpers import enroll, identify, numbered, photo, photos, top

#: Each test starts its own servers (about 5-10 s each on a 2-core machine).
pytestmark = pytest.mark.slow


def test_restart_keeps_everything(start_server: StartServer, tmp_path: Path, checkpoint_a: Path,
                                  records: pd.DataFrame) -> None:
    data_dir = tmp_path / "data"
    first = start_server(checkpoint_a, data_dir)
    assert "no API key set" in first.log(), "an open server says so at start-up"
    uploads = {f"turtle-{number}": photos(records, identity)[:2]
               for number, identity in enumerate(["ind_000", "ind_001", "ind_002"])}
    with first.client(api_key=None) as client:
        for name, pair in uploads.items():
            assert enroll(client, name, pair).status_code == 201
        assert client.delete("/individuals/turtle-2/images/6").status_code == 204
        before = {name: client.get(f"/individuals/{name}").json() for name in ("turtle-0", "turtle-1", "turtle-2")}
    first.stop()

    second = start_server(checkpoint_a, data_dir, via_environment=True)
    with second.client(api_key=None) as client:
        for name, individual in before.items():
            assert client.get(f"/individuals/{name}").json() == individual
        image = before["turtle-1"]["images"][1]
        assert client.get(image["url"]).content == uploads["turtle-1"][1]
        assert top(identify(client, uploads["turtle-1"][1])) == ("turtle-1", pytest.approx(1.0, abs=1e-4))
        health = client.get("/health").json()
        assert (health["photos"], health["gallery_size"], health["individuals"]) == (5, 5, 3)


def test_kill_9_loses_no_acknowledged_enrolment(start_server: StartServer, tmp_path: Path, checkpoint_a: Path,
                                                records: pd.DataFrame) -> None:
    data_dir = tmp_path / "data"
    server = start_server(checkpoint_a, data_dir)
    base = photo(records, "ind_003")
    acknowledged: dict[str, bytes] = {}
    stop = threading.Event()

    def enrol_forever() -> None:
        with server.client() as client:
            for number in range(10_000):
                upload = numbered(base, number)
                try:
                    response = enroll(client, f"stream-{number}", [upload])
                except httpx.TransportError:
                    return  # the server is gone
                if response.status_code == 201:
                    acknowledged[f"stream-{number}"] = upload
                if stop.is_set():
                    return

    writer = threading.Thread(target=enrol_forever)
    writer.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 15 and time.monotonic() < deadline and writer.is_alive():
        time.sleep(0.02)
    server.kill()  # mid-stream: requests are in flight
    stop.set()
    writer.join(timeout=60)
    assert len(acknowledged) >= 15, server.log()

    restarted = start_server(checkpoint_a, data_dir)
    with restarted.client() as client:
        for name, upload in acknowledged.items():
            individual = client.get(f"/individuals/{name}")
            assert individual.status_code == 200, f"acknowledged {name} was lost"
            assert client.get(individual.json()["images"][0]["url"]).content == upload
        health = client.get("/health").json()
        assert health["gallery_size"] == health["photos"] >= len(acknowledged)
        last = max(acknowledged, key=lambda name: int(name.split("-")[1]))
        assert top(identify(client, acknowledged[last]))[1] == pytest.approx(1.0, abs=1e-4)


def test_offline_enrol_is_idempotent(tmp_path: Path, checkpoint_a: Path, synth_dataset: Path) -> None:
    first = reid_command("enroll", "--checkpoint", checkpoint_a, "--data-dir", tmp_path / "data",
                         "--data", synth_dataset)
    assert first.returncode == 0, first.stderr
    assert "enrolled 32 new photos of 8 individuals" in first.stdout
    again = enroll_dataset(checkpoint_a, tmp_path / "data", synth_dataset, progress=False)
    assert again == EnrollReport(added=0, already_enrolled=32, skipped=0, individuals=8)
    assert Store(tmp_path / "data").counts() == (8, 32)


def test_offline_enrol_skips_every_unreadable_photo_and_names_it(tmp_path: Path, checkpoint_a: Path,
                                                                 synth_dataset: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """An empty file left by a failed card copy, a text file named .jpg and a truncated JPEG are each skipped with a
    warning naming the file, and the good photos of the same folder are enrolled."""
    dataset = tmp_path / "cards" / "t001"
    dataset.mkdir(parents=True)
    (tmp_path / "cards" / "t002").mkdir()
    (tmp_path / "cards" / "t002" / "lost.jpg").write_bytes(b"")  # an individual none of whose photos can be read
    good = sorted((synth_dataset / "images").rglob("*.png"))[0]
    (dataset / "good.png").write_bytes(good.read_bytes())
    (dataset / "empty.jpg").write_bytes(b"")
    (dataset / "notes.jpg").write_text("not a photo")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(buffer, format="JPEG")
    (dataset / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    with caplog.at_level(logging.WARNING, logger="service.offline"):
        report = enroll_dataset(checkpoint_a, tmp_path / "data", dataset.parent, progress=False)
    assert report == EnrollReport(added=1, already_enrolled=0, skipped=4, individuals=1)
    assert Store(tmp_path / "data").counts() == (1, 1)
    warnings = [record.getMessage() for record in caplog.records]
    assert all(any(f"skipping a photo: {dataset / name}:" in warning for warning in warnings)
               for name in ("empty.jpg", "notes.jpg", "truncated.jpg")), warnings
    assert not any("uploaded bytes" in warning for warning in warnings)


def test_model_change_is_refused_until_reindex(start_server: StartServer, tmp_path: Path, checkpoint_a: Path,
                                               checkpoint_b: Path, synth_dataset: Path, records: pd.DataFrame) -> None:
    data_dir = tmp_path / "data"
    enroll_dataset(checkpoint_a, data_dir, synth_dataset, progress=False)
    a, b = (Embedder.from_checkpoint(c).fingerprint for c in (checkpoint_a, checkpoint_b))
    assert a != b

    refused = reid_command("serve", "--checkpoint", checkpoint_b, "--data-dir", data_dir, "--port", "0", timeout=60)
    assert refused.returncode == 2
    message = refused.stderr
    assert message.startswith("reid: error:") and "Traceback" not in message
    assert a in message and b in message and str(checkpoint_a) in message and str(checkpoint_b) in message
    assert "reid reindex" in message

    reindexed = reid_command("reindex", "--checkpoint", checkpoint_b, "--data-dir", data_dir)
    assert reindexed.returncode == 0, reindexed.stderr
    assert "re-embedded 32 photos" in reindexed.stdout
    server = start_server(checkpoint_b, data_dir)
    with server.client() as client:
        assert client.get("/health").json()["model"]["fingerprint"] == b
        enrolled_file = Path(records[records["identity"] == "ind_005"]["path"].iloc[2]).read_bytes()
        assert top(identify(client, enrolled_file)) == ("ind_005", pytest.approx(1.0, abs=1e-4))
    server.stop()
    with pytest.raises(ModelMismatchError, match=f"{b}.*{a}"):
        Engine.open(Settings(checkpoint=checkpoint_a, data_dir=data_dir))


def test_reindex_that_dies_half_way_leaves_the_old_model_working(tmp_path: Path, checkpoint_a: Path,
                                                                 checkpoint_b: Path, synth_dataset: Path) -> None:
    data_dir = tmp_path / "data"
    enroll_dataset(checkpoint_a, data_dir, synth_dataset, progress=False)
    store = Store(data_dir)
    a, b = (Embedder.from_checkpoint(c).fingerprint for c in (checkpoint_a, checkpoint_b))
    victim = store.images_without_embedding("no-such-model")[20]  # a photo in the third batch of 8
    good = store.path_of(victim).read_bytes()
    store.path_of(victim).write_bytes(good[:100])  # a damaged file: the re-index dies when it reaches it

    with pytest.raises(ReIDError, match=f"image {victim.image_id} of individual '{victim.individual_id}'"):
        reindex(checkpoint_b, data_dir, batch_size=8, progress=False)
    with pytest.raises(ModelMismatchError, match=f"{a}.*{b}"):
        Engine.open(Settings(checkpoint=checkpoint_b, data_dir=data_dir))  # the old model stays current
    assert sum(len(batch.image_ids) for batch in store.embeddings(a)) == 32
    Engine.open(Settings(checkpoint=checkpoint_a, data_dir=data_dir)).close()  # the service still starts with it

    store.path_of(victim).write_bytes(good)
    assert reindex(checkpoint_b, data_dir, batch_size=8, progress=False) == 16, "batches done before are kept"
    with pytest.raises(ModelMismatchError, match=f"{b}.*{a}"):
        Engine.open(Settings(checkpoint=checkpoint_a, data_dir=data_dir))  # the new model is current
    assert list(store.embeddings(a)) == []
