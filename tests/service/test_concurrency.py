"""Identify requests in parallel with enrolments and deletions: every answer is well-formed, nothing deleted is
returned once its deletion was acknowledged, and afterwards the index and the database agree."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from service.store import DATABASE_NAME
from tests.service.conftest import StartServer
from tests.service.helpers import add, enroll, identify, photo, photos

#: Each test starts its own servers (about 5-10 s each on a 2-core machine).
pytestmark = pytest.mark.slow


def test_identify_while_enrolling_and_deleting(start_server: StartServer, tmp_path: Path, checkpoint_a: Path,
                                              records: pd.DataFrame) -> None:
    server = start_server(checkpoint_a, tmp_path / "data")
    queries = [photo(records, f"ind_00{i}", 0) for i in range(8)]
    with server.client() as client:
        for i in range(4):
            assert enroll(client, f"resident-{i}", photos(records, f"ind_00{i}")[:2]).status_code == 201

    deleted_at: dict[str, float] = {}  # individual → monotonic time its deletion was acknowledged
    problems: list[str] = []
    done = threading.Event()

    def identify_until_done() -> None:
        with server.client() as client:
            while not done.is_set():
                for query in queries:
                    started = time.monotonic()
                    response = identify(client, query, k=50)
                    if response.status_code != 200:
                        problems.append(f"identify answered {response.status_code}: {response.text}")
                        continue
                    names = [p["individual_id"] for p in response.json()["predictions"]]
                    if len(names) != len(set(names)):
                        problems.append(f"an individual ranked twice: {names}")
                    gone = [n for n in names if deleted_at.get(n, float("inf")) < started]
                    if gone:
                        problems.append(f"deleted individuals {gone} returned by a later identify")

    readers = [threading.Thread(target=identify_until_done) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        with server.client() as client:
            for round_ in range(6):
                name = f"visitor-{round_}"
                source = f"ind_00{4 + round_ % 4}"
                response = enroll(client, name, [photo(records, source, 0)])
                assert response.status_code == 201, response.text
                assert add(client, name, [photo(records, source, 1)]).status_code == 201
                assert client.delete(response.json()["images"][0]["url"]).status_code == 204
                if round_ % 2 == 0:
                    assert client.delete(f"/individuals/{name}").status_code == 204
                    deleted_at[name] = time.monotonic()
            assert client.delete("/individuals/resident-0").status_code == 204
            deleted_at["resident-0"] = time.monotonic()
            time.sleep(0.5)  # let the readers run a few more queries after the last deletion
    finally:
        done.set()
        for reader in readers:
            reader.join(timeout=60)
    assert not problems, problems[:5]

    with server.client() as client:
        health = client.get("/health").json()
        with sqlite3.connect(tmp_path / "data" / DATABASE_NAME) as database:
            (photos_in_db,) = database.execute("SELECT COUNT(*) FROM images").fetchone()
            (vectors_in_db,) = database.execute("SELECT COUNT(*) FROM embeddings").fetchone()
        assert health["gallery_size"] == health["photos"] == photos_in_db == vectors_in_db == 4 * 2 - 2 + 3
        listed = {item["individual_id"] for item in client.get("/individuals").json()["items"]}
        assert listed == {"resident-1", "resident-2", "resident-3", "visitor-1", "visitor-3", "visitor-5"}
        for query in queries:
            returned = {p["individual_id"] for p in identify(client, query, k=50).json()["predictions"]}
            assert returned == listed
