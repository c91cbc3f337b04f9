"""Bad input of every kind gets a 4xx JSON body naming the problem; the server stays up and loses nothing.

Awkward but valid photos (greyscale, RGBA, 16-bit, CMYK, EXIF-rotated) are accepted and embedded upright.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pandas as pd
import pytest
from PIL import Image

from tests.service.conftest import MAX_PIXELS, MAX_UPLOAD_BYTES, Server
from tests.service.helpers import (
    add,
    encode,
    enroll,
    exif_rotated,
    identify,
    large_blank_png,
    photo,
    photos,
    png_header_only,
    top,
    variants,
)

SENTINEL = "sentinel"


@pytest.fixture(scope="module", autouse=True)
def sentinel(server: Server, records: pd.DataFrame) -> list[bytes]:
    """An individual enrolled before any bad request (photos no other test uses), checked intact after every test."""
    uploads = photos(records, "ind_000")[:2]
    with server.client() as client:
        assert enroll(client, SENTINEL, uploads).status_code == 201
    return uploads


@pytest.fixture(autouse=True)
def nothing_lost(server: Server, sentinel: list[bytes]) -> Iterator[None]:
    yield
    assert server.alive(), server.log()
    assert "Traceback" not in server.log() and " 500 " not in server.log(), server.log()
    with server.client() as client:
        individual = client.get(f"/individuals/{SENTINEL}").json()
        assert individual["image_count"] == 2
        assert client.get(individual["images"][0]["url"]).content == sentinel[0]
        assert top(identify(client, sentinel[1])) == (SENTINEL, pytest.approx(1.0, abs=1e-4))
        health = client.get("/health").json()
        assert health["gallery_size"] == health["photos"]


def _tiny(image_format: str) -> bytes:
    return encode(Image.new("RGB", (16, 16), (200, 120, 40)), image_format)


def _truncated_jpeg() -> bytes:
    data = encode(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")
    return data[: len(data) // 2]


UNDECODABLE = [
    pytest.param(b"", 422, "invalid_image", "empty", id="empty-file"),
    pytest.param(b"hello, I am a text file", 422, "invalid_image", "not a recognisable image", id="text-named-jpg"),
    pytest.param(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, 422, "invalid_image", "", id="corrupt-png"),
    pytest.param(_truncated_jpeg(), 422, "invalid_image", "truncated", id="truncated-jpeg"),
    pytest.param(_tiny("ICO"), 415, "unsupported_media_type", "ICO", id="ico"),
    pytest.param(_tiny("EPS"), 415, "unsupported_media_type", "EPS", id="eps"),
    # past Pillow's own hard stop (2 x 89.5 MP): refused by the service's limit all the same, with the size
    pytest.param(png_header_only(100_000, 100_000), 422, "image_too_large", "100000x100000 = 10000000000 pixels",
                 id="png-bomb-header"),
    pytest.param(png_header_only(5000, 5000), 422, "image_too_large", "5000x5000", id="png-header-over-pixel-limit"),
    pytest.param(large_blank_png(2000, 1000), 422, "image_too_large", f"over the limit of {MAX_PIXELS}",
                 id="compressible-png-over-pixel-limit"),
]


@pytest.mark.parametrize(("data", "status", "code", "message"), UNDECODABLE)
def test_undecodable_upload_is_refused_on_enrol_add_and_identify(client: httpx.Client, data: bytes, status: int,
                                                                 code: str, message: str) -> None:
    good = photos_of_nobody()
    for response, field in [
        (enroll(client, "never-created", [good, data], filename="upload.jpg"), "files[1]"),
        (add(client, SENTINEL, [data], filename="upload.jpg"), "files[0]"),
        (identify(client, data, filename="upload.jpg"), "file"),
    ]:
        assert response.status_code == status, response.text
        body = response.json()
        assert body["error"] == code and body["field"] == field
        assert message in body["message"] and "upload.jpg" in body["message"]
    assert client.get("/individuals/never-created").status_code == 404, "a bad file rejects the whole enrolment"


def photos_of_nobody() -> bytes:
    return encode(Image.effect_noise((48, 48), 50).convert("RGB"), "PNG")


@pytest.mark.parametrize("data", [
    b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"></svg>',
], ids=["pdf", "svg"])
def test_documents_that_are_not_photos_are_refused(client: httpx.Client, data: bytes) -> None:
    # Pillow cannot open PDF or SVG at all; reid.imageio recognises them by signature and calls them unsupported.
    response = identify(client, data, filename="document.jpg")
    assert response.status_code == 415
    assert response.json()["field"] == "file" and "document.jpg" in response.json()["message"]


def test_body_over_the_size_limit_is_refused(client: httpx.Client, server: Server) -> None:
    big = b"\0" * (MAX_UPLOAD_BYTES + 1)
    declared = identify(client, big)
    assert declared.status_code == 413
    assert declared.json()["error"] == "body_too_large" and str(MAX_UPLOAD_BYTES) in declared.json()["message"]
    assert "--max-upload-bytes (REID_MAX_UPLOAD_BYTES)" in declared.json()["message"], "says what can be done"
    assert client.get("/health").json()["max_upload_bytes"] == MAX_UPLOAD_BYTES

    # Without a Content-Length (chunked upload) the bytes are counted as they arrive.
    boundary = "limit-test"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(8):
            yield b"\0" * (MAX_UPLOAD_BYTES // 4)
        yield f"\r\n--{boundary}--\r\n".encode()

    streamed = client.post("/identify", content=chunks(),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert streamed.status_code == 413
    assert streamed.json()["error"] == "body_too_large"


@pytest.mark.parametrize("variant", ["greyscale", "rgba", "16-bit", "cmyk"])
def test_awkward_but_valid_photos_are_accepted(client: httpx.Client, records: pd.DataFrame, variant: str) -> None:
    data = variants(photo(records, "ind_001", 0))[variant]
    response = enroll(client, f"mode-{variant}", [data])
    assert response.status_code == 201, response.text
    assert response.json()["images"][0]["width"] == 64
    assert top(identify(client, data))[0] == f"mode-{variant}"


def test_exif_rotated_photo_is_turned_upright(client: httpx.Client, records: pd.DataFrame) -> None:
    upright = photo(records, "ind_002", 1)
    assert enroll(client, "upright", [upright]).status_code == 201
    best, score = top(identify(client, exif_rotated(upright)))
    assert best == "upright" and score == pytest.approx(1.0, abs=1e-4)


BAD_IDS = ["../etc", "a/b", "..", ".", "x" * 129, "new_turtle", "has space", "naïve", "a\\b", "%2e%2e"]


@pytest.mark.parametrize("individual_id", BAD_IDS)
def test_invalid_individual_id_in_a_form_field(client: httpx.Client, records: pd.DataFrame,
                                               individual_id: str) -> None:
    response = enroll(client, individual_id, [photo(records, "ind_003")])
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == "individual_id"
    assert repr(individual_id[:40])[:-1] in body["message"], "the message quotes the id as given"


@pytest.mark.parametrize("path", ["/individuals/%2E%2E", "/individuals/%2E", "/individuals/" + "x" * 129,
                                  "/individuals/new_turtle"])
def test_invalid_individual_id_in_the_path(client: httpx.Client, path: str) -> None:
    for response in (client.get(path), client.delete(path), client.get(path + "/images/1")):
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "individual_id"


@pytest.mark.parametrize("path", ["/individuals/..%2Fetc%2Fpasswd", "/individuals/a%2Fb/images",
                                  "/individuals/%2E%2E/%2E%2E/images/1"])
def test_path_traversal_in_the_url_reaches_no_file(client: httpx.Client, records: pd.DataFrame, path: str) -> None:
    for response in (client.get(path), client.post(path, files={"files": ("x.png", photo(records, "ind_003"))})):
        assert 400 <= response.status_code < 500 and response.headers["content-type"] == "application/json"
        assert response.json()["error"] in ("not_found", "invalid_field", "method_not_allowed")


def test_unknown_ids_are_404(client: httpx.Client, records: pd.DataFrame) -> None:
    sentinel_image = client.get(f"/individuals/{SENTINEL}").json()["images"][0]["image_id"]
    cases = [
        (client.get("/individuals/nobody"), "individual_id"),
        (client.delete("/individuals/nobody"), "individual_id"),
        (add(client, "nobody", [photo(records, "ind_003")]), "individual_id"),
        (client.get(f"/individuals/nobody/images/{sentinel_image}"), "individual_id"),
        (client.get(f"/individuals/{SENTINEL}/images/999999"), "image_id"),
        (client.delete(f"/individuals/{SENTINEL}/images/999999"), "image_id"),
    ]
    assert enroll(client, "other", [photo(records, "ind_003")]).status_code == 201
    cases.append((client.delete(f"/individuals/other/images/{sentinel_image}"), "image_id"))
    for response, field in cases:
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "not_found" and response.json()["field"] == field
    assert "nobody" in cases[0][0].json()["message"] and "999999" in cases[4][0].json()["message"]


@pytest.mark.parametrize(("fields", "field"), [
    ({"k": 0}, "k"), ({"k": 51}, "k"), ({"k": -3}, "k"), ({"k": "five"}, "k"),
    ({"threshold": 2.5}, "threshold"), ({"threshold": -2.01}, "threshold"), ({"threshold": "nan"}, "threshold"),
    ({"threshold": "inf"}, "threshold"), ({"threshold": "high"}, "threshold"),
])
def test_out_of_range_parameters(client: httpx.Client, records: pd.DataFrame, fields: dict[str, object],
                                 field: str) -> None:
    for response in (identify(client, photo(records, "ind_000"), **fields),
                     client.post("/identify/batch", data={k: str(v) for k, v in fields.items()},
                                 files=[("files", ("q.png", photo(records, "ind_000")))])):
        assert response.status_code == 422, response.text
        assert response.json()["field"] == field and str(list(fields.values())[0]) in response.json()["message"]


def test_missing_and_malformed_fields(client: httpx.Client, records: pd.DataFrame) -> None:
    image = photo(records, "ind_003")
    cases = [
        (client.post("/individuals", data={"individual_id": "no-files"}), "files"),
        (client.post("/individuals", files={"files": ("a.png", image)}), "individual_id"),
        (client.post("/identify", data={"k": "3"}), "file"),
        (client.post("/identify", json={"file": "x"}), "file"),
        (enroll(client, "two-views", [image], views=["top", "left"]), "view"),
        (client.get("/individuals", params={"limit": 0}), "limit"),
        (client.get("/individuals", params={"limit": 1001}), "limit"),
        (client.get("/individuals", params={"offset": -1}), "offset"),
        (client.get(f"/individuals/{SENTINEL}/images/abc"), "image_id"),
        (client.get(f"/individuals/{SENTINEL}/images/{2**64}"), "image_id"),
        (client.get("/individuals", params={"offset": 2**64}), "offset"),
        (enroll(client, "long-view", [image], views=["v" * 65]), "view[0]"),
    ]
    for response, field in cases:
        assert response.status_code == 422, response.text
        assert response.json()["field"] == field and field in response.json()["message"]
    raw = client.post("/identify", content=image, headers={"Content-Type": "image/png"})
    assert raw.status_code == 422 and raw.json()["message"].endswith(
        "sent as image/png: send the fields as multipart/form-data (curl -F file=@photo.jpg)")
    assert "multipart/form-data (curl -F" in client.post("/identify", json={"file": "x"}).json()["message"]
    text = client.post("/identify", data={"file": "photo.jpg"})  # curl -F file=photo.jpg, without the @
    assert text.status_code == 422 and "curl -F file=@photo.jpg (with the @)" in text.json()["message"]
    batch = client.post("/identify/batch", data={"k": "1"})  # a form without its files: the hint names the field
    assert batch.status_code == 422 and batch.json()["message"].endswith("(curl -F files=@a.jpg -F files=@b.jpg)")
    multipart = client.post("/identify", data={"k": "3"}, files={"photo": ("a.png", image)})  # a misnamed field
    assert multipart.json()["message"] == "file: field required", "a multipart request needs no hint about it"
    garbled = client.post("/identify", content=b"--x\r\nnonsense",
                          headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert 400 <= garbled.status_code < 500 and "message" in garbled.json()
    assert client.get("/individuals/two-views").status_code == 404
