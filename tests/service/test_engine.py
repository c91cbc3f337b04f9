"""The engine in-process: approximate index kinds stay in sync with the store, and where the threshold comes from."""

from __future__ import annotations

import functools
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from reid.imageio import decode_image
from reid.inference import write_checkpoint_metadata
from service.engine import Engine, Threshold
from service.errors import StorageFullError, StoreError
from service.folder_lock import FolderInUseError
from service.settings import Settings
from service.store import Store
from tests.service.helpers import photos


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_follow_enrolments_deletions_and_restarts(tmp_path: Path, checkpoint_a: Path,
                                                                     records: pd.DataFrame, kind: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(checkpoint=checkpoint_a, data_dir=tmp_path / "data", index=kind)
    engine = Engine.open(settings)
    uploads = [photos(records, f"ind_00{i}")[:3] for i in range(4)]
    for i, triple in enumerate(uploads):
        engine.enroll(f"turtle-{i}", [engine.decode_upload(data, "files", None) for data in triple], "new")
    query = decode_image(uploads[2][1])
    best = engine.identify([query], k=3, threshold=None)[0].predictions[0]
    assert best.individual_id == "turtle-2" and best.score == pytest.approx(1.0, abs=1e-4)

    engine.delete_individual("turtle-2")
    engine.delete_image("turtle-3", 10)
    assert len(engine.gallery) == engine.store.counts()[1] == 8
    answer = engine.identify([query], k=50, threshold=None)[0]
    assert "turtle-2" not in [p.individual_id for p in answer.predictions]

    with pytest.raises(FolderInUseError, match=r"in use by reid serve \(pid \d+\) at http://127.0.0.1:8000"):
        Engine.open(settings)  # one process serves a data folder: a second index would miss the first's writes
    engine.close()
    # the store read back 3 photos at a time, as a large store is read 10,000 at a time
    monkeypatch.setattr(Store, "embeddings", functools.partialmethod(Store.embeddings, batch_size=3))
    reopened = Engine.open(settings)
    assert reopened.gallery.kind == kind and len(reopened.gallery) == 8
    if kind == "ivf":  # trained once, for every stored photo, not on the first batch alone
        assert reopened.gallery._ivf_trained_on == 8
    assert reopened.gallery.identities() == {"turtle-0", "turtle-1", "turtle-3"}


def test_threshold_comes_from_request_then_checkpoint_then_settings(tmp_path: Path, checkpoint_a: Path,
                                                                   records: pd.DataFrame) -> None:
    calibrated = shutil.copy(checkpoint_a, tmp_path / "calibrated.ckpt")
    write_checkpoint_metadata(calibrated, threshold=0.7)
    plain = Engine.open(Settings(checkpoint=checkpoint_a, data_dir=tmp_path / "a"))
    configured = Engine.open(Settings(checkpoint=checkpoint_a, data_dir=tmp_path / "b", default_threshold=0.5))
    with_checkpoint = Engine.open(Settings(checkpoint=calibrated, data_dir=tmp_path / "c", default_threshold=0.5))

    assert plain.threshold(None) == Threshold(None, None)
    assert configured.threshold(None) == Threshold(0.5, "settings")
    assert with_checkpoint.threshold(None) == Threshold(0.7, "checkpoint")
    assert with_checkpoint.threshold(-0.2) == Threshold(-0.2, "request")

    query = decode_image(photos(records, "ind_000")[0])
    first_turtle = with_checkpoint.identify([query], 5, None)[0]  # empty gallery: every turtle is new
    assert first_turtle.new_turtle and [p.individual_id for p in first_turtle.predictions] == ["new_turtle"]
    assert plain.identify([query], 5, None)[0].predictions == []


def test_a_thread_that_already_read_sees_every_later_write(tmp_path: Path, checkpoint_a: Path,
                                                           records: pd.DataFrame) -> None:
    """Reads keep one connection per thread: a request thread that read before must still see later enrolments and
    deletions (a kept connection answering from an old snapshot would show deleted photos as evidence)."""
    engine = Engine.open(Settings(checkpoint=checkpoint_a, data_dir=tmp_path / "data"))
    with ThreadPoolExecutor(max_workers=1) as request_thread:  # one thread: every read below reuses its connection
        assert request_thread.submit(engine.store.counts).result() == (0, 0)
        stored = engine.enroll("turtle-0", [engine.decode_upload(data, "files", None)
                                            for data in photos(records, "ind_000")[:2]], "new")
        ids = [image.image_id for image in stored]
        assert request_thread.submit(engine.store.counts).result() == (1, 2)
        assert set(request_thread.submit(engine.store.images, ids).result()) == set(ids)
        engine.delete_image("turtle-0", ids[0])
        assert set(request_thread.submit(engine.store.images, ids).result()) == {ids[1]}
        engine.delete_individual("turtle-0")
        assert request_thread.submit(engine.store.individuals, 10, 0).result() == (0, [])
    engine.close()


def test_the_checkpoints_runner_up_weight_raises_the_bar_in_answers(tmp_path: Path, checkpoint_a: Path,
                                                                    records: pd.DataFrame) -> None:
    """A checkpoint fitted with a runner-up weight is served with it: the answer reports it, and new_turtle is
    scored by its bar (threshold + weight x the second individual's score)."""
    weighted = shutil.copy(checkpoint_a, tmp_path / "weighted.ckpt")
    write_checkpoint_metadata(weighted, threshold=0.1, runner_up_weight=0.5)
    engine = Engine.open(Settings(checkpoint=weighted, data_dir=tmp_path / "data"))
    for i in range(3):
        engine.enroll(f"turtle-{i}", [engine.decode_upload(data, "files", None)
                                      for data in photos(records, f"ind_00{i}")[:2]], "new")
    answer = engine.identify([decode_image(photos(records, "ind_000")[3])], 1, None)[0]
    assert answer.runner_up_weight == 0.5 and answer.threshold == 0.1
    everything = engine.identify([decode_image(photos(records, "ind_000")[3])], 5, None)[0]
    scores = {p.individual_id: p.score for p in everything.predictions}
    runner_up = [p.score for p in everything.predictions if p.individual_id != "new_turtle"][1]
    assert scores["new_turtle"] == pytest.approx(0.1 + 0.5 * runner_up)
    assert answer.new_turtle == everything.new_turtle  # k=1 decides as k=5 does
    engine.close()


@pytest.mark.parametrize("damage", ["missing", "empty"])
def test_a_store_whose_database_is_missing_or_empty_is_refused_and_its_photos_kept(
        tmp_path: Path, checkpoint_a: Path, records: pd.DataFrame, damage: str) -> None:
    """A restore that left the database behind (or a 0-byte copy) is not a new store: opened as one, the start-up
    sweep would delete every photo as unreferenced."""
    settings = Settings(checkpoint=checkpoint_a, data_dir=tmp_path / "data")
    engine = Engine.open(settings)
    engine.enroll("turtle-0", [engine.decode_upload(data, "files", None) for data in photos(records, "ind_000")[:3]],
                  "new")
    engine.close()
    database = settings.data_dir / "reid.sqlite3"
    for path in settings.data_dir.glob("reid.sqlite3*"):
        path.unlink()
    if damage == "empty":
        database.write_bytes(b"")
    files = sorted((settings.data_dir / "photos").rglob("*.*"))
    assert len(files) == 3
    with pytest.raises(StoreError, match=rf"photos holds 3 photo files but .*reid.sqlite3 is {damage}: put the store's "
                                         r"database back \(e.g. from a backup\) and start again; to start an empty "
                                         r"store here, move .*photos away"):
        Engine.open(settings)
    assert sorted((settings.data_dir / "photos").rglob("*.*")) == files


def test_a_photo_file_that_cannot_be_removed_leaves_the_deletion_standing(tmp_path: Path, checkpoint_a: Path,
                                                                        records: pd.DataFrame,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A read-only photos/ (restored by another user) once made DELETE a 500 that had removed the rows but left the
    individual in the index, named by every identify until a restart."""
    settings = Settings(checkpoint=checkpoint_a, data_dir=tmp_path / "data")
    engine = Engine.open(settings)
    for i in range(2):
        engine.enroll(f"turtle-{i}", [engine.decode_upload(data, "files", None)
                                      for data in photos(records, f"ind_00{i}")[:2]], "new")
    query = decode_image(photos(records, "ind_001")[0])

    def refuse(path: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(Path, "unlink", refuse)
        engine.delete_individual("turtle-1")
    assert "could not remove" in caplog.text and "Permission denied" in caplog.text
    answer = engine.identify([query], k=5, threshold=None)[0]
    assert [p.individual_id for p in answer.predictions] == ["turtle-0"]
    assert len(engine.gallery) == engine.store.counts()[1] == 2
    engine.close()
    Engine.open(settings).close()  # the files left are swept at the next start
    assert len(list((settings.data_dir / "photos").rglob("*.*"))) == 2


def test_a_request_is_decoded_and_embedded_a_pixel_budget_at_a_time(tmp_path: Path, checkpoint_a: Path,
                                                                  records: pd.DataFrame,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding a whole request before embedding any photo held them all at full size: sixteen 62-megapixel PNGs in
    a 1 MB request took 3 GB. Photos are now drawn one by one and embedded in runs of at most max_pixels."""
    uploads = [photo for identity in ("ind_000", "ind_001") for photo in photos(records, identity)[:3]]
    side = decode_image(uploads[0]).shape[0]  # the synthetic photos are square
    engine = Engine.open(Settings(checkpoint=checkpoint_a, data_dir=tmp_path / "data", max_pixels=2 * side * side))
    sizes: list[tuple[int, int]] = []  # (photos embedded, photos decoded so far) at each embedding
    decoded: list[int] = []
    embed = engine.embedder.embed
    monkeypatch.setattr(engine.embedder, "embed", lambda images, *a, **kw: sizes.append((len(images), len(decoded)))
                        or embed(images, *a, **kw))

    def drawn(data: list[bytes]):  # noqa: ANN202 (a generator of photos, recording when each is decoded)
        for i, upload in enumerate(data):
            decoded.append(i)
            yield engine.decode_upload(upload, f"files[{i}]", None)

    stored = engine.enroll("turtle-0", drawn(uploads[:3]), "new")
    assert sizes == [(2, 3), (1, 3)] and len(stored) == 3 and all(image.width == side for image in stored)
    sizes.clear()
    decoded.clear()
    answers = list(engine.identify_photos(((i, photo) for i, photo in enumerate(drawn(uploads[3:]))), 1, None))
    assert sizes == [(2, 3), (1, 3)] and [position for position, _ in answers] == [0, 1, 2]
    assert answers[0][1].predictions[0].individual_id == "turtle-0"


def test_a_full_disk_is_a_507_naming_the_folder_and_leaves_no_file_behind(tmp_path: Path, checkpoint_a: Path,
                                                                        records: pd.DataFrame,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk was an opaque 500, and the photo files the failed enrolment had written took the little space left
    until the next start."""
    import errno

    import service.store

    settings = Settings(checkpoint=checkpoint_a, data_dir=tmp_path / "data")
    engine = Engine.open(settings)
    engine.enroll("turtle-0", [engine.decode_upload(photos(records, "ind_000")[0], "files", None)], "new")
    writes = []
    write = service.store.write_atomically

    def fills_the_disk(path: Path, data: bytes) -> None:
        writes.append(path)
        if len(writes) > 1:  # the first photo fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(path, data)

    monkeypatch.setattr(service.store, "write_atomically", fills_the_disk)
    with pytest.raises(StorageFullError, match=r"the disk of the data folder .*data is full \(\[Errno 28\] No space "
                                               r"left on device: .*\); the request changed nothing: free space on it") as error:
        engine.enroll("turtle-1", [engine.decode_upload(data, "files", None) for data in photos(records, "ind_001")[:2]],
                      "new")
    assert error.value.status == 507
    assert not writes[0].exists(), "the file the failed enrolment wrote is removed again"
    assert engine.store.counts() == (1, 1) and len(list((settings.data_dir / "photos").rglob("*.*"))) == 1


def test_a_damaged_embedding_is_one_clear_error_at_start(tmp_path: Path, checkpoint_a: Path,
                                                         records: pd.DataFrame) -> None:
    import sqlite3

    settings = Settings(checkpoint=checkpoint_a, data_dir=tmp_path / "data")
    engine = Engine.open(settings)
    engine.enroll("turtle-0", [engine.decode_upload(data, "files", None) for data in photos(records, "ind_000")[:2]],
                  "new")
    engine.close()
    with sqlite3.connect(settings.data_dir / "reid.sqlite3") as database:
        database.execute("UPDATE embeddings SET vector = x'0011223344556677' WHERE image_id = 2")
    with pytest.raises(StoreError, match=r"the embedding of image 2 of individual 'turtle-0' in .*reid.sqlite3 is "
                                         r"damaged \(8 bytes where the model's \d+ dimensions take \d+\): restore"):
        Engine.open(settings)


def test_a_new_store_beside_leftover_temporary_files_opens(tmp_path: Path) -> None:
    """Only stored photos make a missing database a restore gone wrong: not a .DS_Store, nor an interrupted write's
    temporary file (both start with a dot), which the start-up sweep removes."""
    photos_dir = tmp_path / "data" / "photos" / "ab"
    photos_dir.mkdir(parents=True)
    (photos_dir / ".abcd.jpg.1234.tmp").write_bytes(b"partial")
    (tmp_path / "data" / "photos" / ".DS_Store").write_bytes(b"finder")
    assert Store(tmp_path / "data").counts() == (0, 0)
