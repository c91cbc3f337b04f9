"""API key: writes need it when one is set (401 otherwise), reads stay open unless --protect-reads."""

from __future__ import annotations

from pathlib import Path

import httpx
import pandas as pd
import pytest

from tests.service.conftest import API_KEY, Server, StartServer
from tests.service.helpers import add, enroll, identify, photo


def _writes(client: httpx.Client, records: pd.DataFrame) -> list[httpx.Response]:
    data = photo(records, "ind_004")
    return [enroll(client, "intruder", [data]), add(client, "owner", [data]),
            client.delete("/individuals/owner/images/1"), client.delete("/individuals/owner")]


@pytest.mark.parametrize("key", [None, "wrong-key", API_KEY + "x", ""])
def test_writes_need_the_right_key(server: Server, records: pd.DataFrame, key: str | None) -> None:
    with server.client() as owner:
        if owner.get("/individuals/owner").status_code == 404:
            assert enroll(owner, "owner", [photo(records, "ind_000")]).status_code == 201
    with server.client(api_key=None) as client:
        headers = {} if key is None else {"X-API-Key": key}
        client.headers.update(headers)
        for response in _writes(client, records):
            assert response.status_code == 401, response.text
            body = response.json()
            assert body["error"] == "unauthorized" and body["field"] == "X-API-Key"
            assert ("needs the API key" if not key else "is wrong") in body["message"]
            assert API_KEY not in response.text
        assert client.get("/individuals/intruder").status_code == 404
        assert client.get("/individuals/owner").json()["image_count"] == 1


def test_reads_are_open_without_a_key(server: Server, records: pd.DataFrame) -> None:
    with server.client() as owner:
        image = enroll(owner, "public", [photo(records, "ind_001")]).json()["images"][0]
    with server.client(api_key=None) as client:
        for response in (client.get("/health"), client.get("/individuals"), client.get("/individuals/public"),
                         client.get(image["url"]), identify(client, photo(records, "ind_001")),
                         client.get("/rsm.png", params={"individuals": "public"})):
            assert response.status_code == 200, response.text


def test_protect_reads_closes_reads(start_server: StartServer, tmp_path: Path, checkpoint_a: Path,
                                    records: pd.DataFrame) -> None:
    server = start_server(checkpoint_a, tmp_path / "data", "--protect-reads", environment={"REID_API_KEY": API_KEY})
    assert "no API key set" not in server.log()
    with server.client() as owner:
        image = enroll(owner, "private", [photo(records, "ind_002")]).json()["images"][0]
        assert owner.get("/health").json()["reads_protected"] is True
        assert identify(owner, photo(records, "ind_002")).status_code == 200
    with server.client(api_key="wrong") as client:
        for response in (client.get("/health"), client.get("/individuals"), client.get("/individuals/private"),
                         client.get(image["url"]), identify(client, photo(records, "ind_002")),
                         client.get("/rsm.png"), client.post("/identify/batch")):
            assert response.status_code == 401, response.text
            assert response.json()["error"] == "unauthorized"
