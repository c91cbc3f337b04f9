"""The API in-process (FastAPI's TestClient, which runs the app's lifespan): enrol, identify, add, list, search,
fetch, preview, delete, idempotency, batch, RSM, health, the page and offline docs. Persistence, concurrency,
crashes and the HTTP-level limits are tested against real ``reid serve`` processes in the other modules."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from reid.gallery import gpu_available
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import API_KEY
from tests.service.helpers import add, enroll, identify, photo, photos, top


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, checkpoint_a: Path) -> Iterator[httpx.Client]:
    settings = Settings(checkpoint=checkpoint_a, data_dir=tmp_path_factory.mktemp("api") / "data", api_key=API_KEY)
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as in_process:
        yield in_process


def test_enrolled_photo_identifies_its_individual_first_with_score_one(client: httpx.Client,
                                                                     records: pd.DataFrame) -> None:
    enrolled = photos(records, "ind_000")[:2]
    response = enroll(client, "alpha", enrolled, views=["top", "Left"])
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["individual_id"] == "alpha"
    assert [image["view"] for image in body["images"]] == ["top", "left"]
    assert not any(image["already_enrolled"] for image in body["images"])
    assert enroll(client, "beta", photos(records, "ind_001")[:2]).status_code == 201

    answer = identify(client, enrolled[1], k=5)
    best, score = top(answer)
    assert best == "alpha" and score == pytest.approx(1.0, abs=1e-4)
    ids = [p["individual_id"] for p in answer.json()["predictions"]]
    assert len(ids) == len(set(ids)), "each individual once"
    assert answer.json()["model"] == client.get("/health").json()["model"]["fingerprint"]


def test_adding_photos_and_reading_them_back(client: httpx.Client, records: pd.DataFrame) -> None:
    first, second, third = photos(records, "ind_002")[:3]
    assert enroll(client, "gamma", [first]).status_code == 201
    added = add(client, "gamma", [second, third])
    assert added.status_code == 201, added.text
    individual = client.get("/individuals/gamma").json()
    assert individual["image_count"] == 3
    assert [image["sha256"] for image in individual["images"]][1:] == [i["sha256"] for i in added.json()["images"]]

    image = added.json()["images"][0]
    fetched = client.get(image["url"])
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/png" and fetched.content == second
    assert top(identify(client, third))[0] == "gamma"


def test_reenrolling_the_same_photo_is_idempotent(client: httpx.Client, records: pd.DataFrame) -> None:
    data = photo(records, "ind_003")
    created = enroll(client, "delta", [data, data]).json()["images"]
    assert created[0]["image_id"] == created[1]["image_id"] and created[1]["already_enrolled"]
    again = add(client, "delta", [data])
    assert again.status_code == 201
    assert again.json()["images"][0] == {**created[0], "already_enrolled": True}
    assert client.get("/individuals/delta").json()["image_count"] == 1
    assert created[0]["also_enrolled_as"] == []


def test_a_photo_filed_under_a_second_individual_is_reported(client: httpx.Client, records: pd.DataFrame) -> None:
    """Allowed (the service cannot know which filing is wrong), but a biologist must hear of it."""
    data, other = photo(records, "ind_006", 2), photo(records, "ind_006", 3)
    assert enroll(client, "filed-first", [data]).json()["images"][0]["also_enrolled_as"] == []
    filed_again = enroll(client, "filed-again", [other, data]).json()["images"]
    assert [image["also_enrolled_as"] for image in filed_again] == [[], ["filed-first"]]
    assert [image["already_enrolled"] for image in filed_again] == [False, False]
    assert add(client, "filed-first", [data]).json()["images"][0]["also_enrolled_as"] == ["filed-again"]
    for individual in ("filed-first", "filed-again"):  # the module's other tests share this server
        assert client.delete(f"/individuals/{individual}").status_code == 204


def test_existing_individual_cannot_be_created_again(client: httpx.Client, records: pd.DataFrame) -> None:
    assert enroll(client, "epsilon", [photo(records, "ind_004")]).status_code == 201
    response = enroll(client, "epsilon", [photo(records, "ind_004", 1)])
    assert response.status_code == 409
    assert response.json() == {"error": "conflict", "message": "individual 'epsilon' already exists",
                               "field": "individual_id"}
    assert client.get("/individuals/epsilon").json()["image_count"] == 1


def test_listing_is_paginated_in_id_order(client: httpx.Client, records: pd.DataFrame) -> None:
    for name in ("page-c", "page-a", "page-b"):
        assert enroll(client, name, [photo(records, "ind_005", 0)]).status_code == 201
    everyone = client.get("/individuals", params={"limit": 1000}).json()
    names = [item["individual_id"] for item in everyone["items"]]
    assert names == sorted(names) and everyone["total"] == len(names)
    start = names.index("page-a")
    page = client.get("/individuals", params={"limit": 2, "offset": start}).json()
    assert [item["individual_id"] for item in page["items"]] == ["page-a", "page-b"]
    assert (page["limit"], page["offset"], page["total"]) == (2, start, everyone["total"])
    assert client.get("/individuals", params={"offset": 10_000}).json()["items"] == []


def test_search_by_id_and_cover_photo_previews(client: httpx.Client, records: pd.DataFrame) -> None:
    uploads = photos(records, "ind_003")[1:3]
    enrolled = enroll(client, "Search_Me-1", uploads).json()
    assert enroll(client, "search_me-2", [photo(records, "ind_004", 2)]).status_code == 201
    assert enroll(client, "searchXme", [photo(records, "ind_004", 3)]).status_code == 201
    found = client.get("/individuals", params={"q": "SEARCH_ME"}).json()
    assert found["total"] == 2, "any case, and '_' is a character, not SQL's one-character wildcard"
    first = found["items"][0]
    assert first["individual_id"] == "Search_Me-1" and first["image_count"] == 2
    assert first["cover_url"] == enrolled["images"][0]["url"]
    assert client.get("/individuals", params={"q": "%"}).json()["total"] == 0

    original = client.get(first["cover_url"])
    assert original.content == uploads[0]
    preview = client.get(first["cover_url"], params={"max_side": 32})
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(preview.content)).size) == 32
    too_small = client.get(first["cover_url"], params={"max_side": 8})
    assert too_small.status_code == 422 and too_small.json()["field"] == "max_side"


def test_a_photo_damaged_on_disk_is_a_404_naming_it_everywhere(client: httpx.Client, records: pd.DataFrame) -> None:
    """A stored file corrupted since enrolment cannot be shown: its preview and the match drawing both answer 404
    with the image named, never a 500."""
    query = photo(records, "ind_005", 1)
    image = enroll(client, "damaged-on-disk", [photo(records, "ind_005", 0)]).json()["images"][0]
    engine = client.app.state.engine
    path = engine.store.path_of(engine.store.image("damaged-on-disk", image["image_id"]))
    path.write_bytes(path.read_bytes()[:100])
    preview = client.get(image["url"], params={"max_side": 64})
    drawing = client.post("/identify/explain", files={"file": ("q.png", query, "image/png")},
                          data={"individual_id": "damaged-on-disk", "image_id": str(image["image_id"])})
    for response in (preview, drawing):
        assert response.status_code == 404, response.text
        assert response.json()["field"] == "image_id" and "truncated" in response.json()["message"]


def test_deleting_a_photo_and_an_individual(client: httpx.Client, records: pd.DataFrame) -> None:
    kept, removed = photos(records, "ind_006")[:2]
    images = enroll(client, "zeta", [kept, removed]).json()["images"]
    assert client.delete(images[1]["url"]).status_code == 204
    assert client.get(images[1]["url"]).status_code == 404
    assert client.get("/individuals/zeta").json()["image_count"] == 1
    assert top(identify(client, removed))[1] < 0.9999, "the deleted photo is no longer in the index"
    assert top(identify(client, kept))[0] == "zeta"

    assert client.delete("/individuals/zeta").status_code == 204
    assert client.get("/individuals/zeta").status_code == 404
    assert client.get(images[0]["url"]).status_code == 404
    predictions = identify(client, kept, k=50).json()["predictions"]
    assert "zeta" not in [p["individual_id"] for p in predictions]
    assert client.delete("/individuals/zeta").status_code == 404


def test_threshold_places_new_turtle(client: httpx.Client, records: pd.DataFrame) -> None:
    enrolled = enroll(client, "eta", [photo(records, "ind_007")])
    assert enrolled.status_code == 201
    unknown = photo(records, "ind_007", 3)  # a photo of eta that was not enrolled: similar, never identical

    strict = identify(client, unknown, threshold=1.0, k=3).json()
    assert strict["new_turtle"] is True and strict["threshold"] == 1.0 and strict["threshold_source"] == "request"
    assert strict["predictions"][0] == {"individual_id": "new_turtle", "score": 1.0, "evidence": None}
    assert 2 <= len(strict["predictions"]) <= 3  # new_turtle, eta, and another individual when others are enrolled

    lenient = identify(client, unknown, threshold=-1.0, k=50).json()
    assert lenient["new_turtle"] is False
    scores = [p["score"] for p in lenient["predictions"]]
    assert lenient["predictions"][-1]["individual_id"] == "new_turtle" and scores[:-1] == sorted(scores[:-1])[::-1]
    eta = next(p for p in lenient["predictions"] if p["individual_id"] == "eta")
    image = enrolled.json()["images"][0]
    # the evidence is the enrolled photo that matched, fetchable for a person to compare by eye
    assert eta["evidence"]["image_id"] == image["image_id"] and eta["evidence"]["url"] == image["url"]
    assert eta["evidence"]["similarity"] == pytest.approx(eta["score"]) and eta["evidence"]["inliers"] is None
    assert eta["evidence"]["inliers_counted"] is None  # no verification ran
    assert client.get(eta["evidence"]["url"]).headers["content-type"].startswith("image/")

    default = identify(client, unknown).json()  # this checkpoint is uncalibrated and no default is configured
    assert (default["threshold"], default["threshold_source"], default["new_turtle"]) == (None, None, False)
    assert len(default["predictions"]) <= 5


def test_batch_identify_answers_each_file(client: httpx.Client, records: pd.DataFrame) -> None:
    known = photo(records, "ind_000", 2)
    assert enroll(client, "theta", [known]).status_code == 201
    response = client.post("/identify/batch", data={"k": "2"}, files=[
        ("files", ("good.png", known)), ("files", ("bad.jpg", b"not an image"))])
    assert response.status_code == 200, response.text
    good, bad = response.json()["results"]
    assert good["filename"] == "good.png" and good["error"] is None
    assert good["result"]["predictions"][0]["individual_id"] == "theta"
    assert len(good["result"]["predictions"]) == 2
    assert bad["filename"] == "bad.jpg" and bad["result"] is None
    assert bad["error"]["error"] == "invalid_image" and bad["error"]["field"] == "files[1]"


def test_rsm_heatmap(client: httpx.Client, records: pd.DataFrame) -> None:
    assert enroll(client, "iota", photos(records, "ind_001")[2:4]).status_code == 201
    response = client.get("/rsm.png", params={"individuals": "iota,alpha"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png" and response.content.startswith(b"\x89PNG")
    unknown = client.get("/rsm.png", params={"individuals": "iota,nobody"})
    assert unknown.status_code == 404 and "nobody" in unknown.json()["message"]
    bad = client.get("/rsm.png", params={"individuals": "iota,../etc"})
    assert bad.status_code == 422 and "../etc" in bad.json()["message"]


def test_health_reports_model_index_and_sizes(client: httpx.Client) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["model"]["name"].startswith("test_efficientnet") and len(health["model"]["fingerprint"]) == 16
    assert health["index"] == {"kind": "flat", "device": "gpu" if gpu_available() else "cpu"}
    assert health["gallery_size"] == health["photos"]
    assert health["writes_protected"] is True and health["reads_protected"] is False


def test_openapi_documents_the_error_responses(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    expected = {
        ("/individuals", "post"): {"201", "401", "409", "413", "415", "422"},
        ("/individuals/{individual_id}/images", "post"): {"201", "401", "404", "413", "415", "422"},
        ("/individuals/{individual_id}", "delete"): {"204", "401", "404", "422"},
        ("/identify", "post"): {"200", "413", "415", "422"},
        ("/rsm.png", "get"): {"200", "404", "422"},
    }
    for (path, method), statuses in expected.items():
        responses = paths[path][method]["responses"]
        assert statuses <= set(responses), (path, method, sorted(responses))
        assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "cdn" not in docs.text.lower() and "/swagger/swagger-ui-bundle.js" in docs.text, "works offline"
    assert client.get("/swagger/swagger-ui-bundle.js").status_code == 200


def test_the_page_and_its_files_are_served(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Drop turtle photos here" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200, asset
    assert "/" not in client.get("/openapi.json").json()["paths"], "the page is not part of the API"
