"""Request helpers and photo variants (Pillow-made) shared by the service tests."""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from PIL import Image


#: Numbers for :func:`numbered` copies made by :func:`photo`/:func:`photos` (tests pass small numbers of their own).
_copies = itertools.count(10_000)


def photo(records: pd.DataFrame, identity: str, index: int = 0) -> bytes:
    """A copy of one synthetic photo of ``identity`` that no other call returns (see :func:`photos`)."""
    return numbered(Path(records[records["identity"] == identity]["path"].iloc[index]).read_bytes(), next(_copies))


def photos(records: pd.DataFrame, identity: str) -> list[bytes]:
    """Copies of every synthetic photo of ``identity``, each distinct from every other call's.

    Tests sharing one server would otherwise enrol the same photo under two names, and an identify of it would
    have two answers with the same score.
    """
    paths = records[records["identity"] == identity]["path"]
    return [numbered(Path(path).read_bytes(), next(_copies)) for path in paths]


def enroll(client: httpx.Client, individual_id: str, uploads: Sequence[bytes], views: Sequence[str] = (),
           filename: str = "photo.png") -> httpx.Response:
    return client.post("/individuals", data={"individual_id": individual_id, "view": list(views)},
                       files=[("files", (filename, data)) for data in uploads])


def add(client: httpx.Client, individual_id: str, uploads: Sequence[bytes],
        filename: str = "photo.png") -> httpx.Response:
    return client.post(f"/individuals/{individual_id}/images", files=[("files", (filename, data)) for data in uploads])


def identify(client: httpx.Client, data: bytes, filename: str = "query.png", **fields: object) -> httpx.Response:
    return client.post("/identify", files={"file": (filename, data)}, data={k: str(v) for k, v in fields.items()})


def top(response: httpx.Response) -> tuple[str, float]:
    """The first prediction of an identify answer, checking the status first."""
    assert response.status_code == 200, response.text
    best = response.json()["predictions"][0]
    return best["individual_id"], best["score"]


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def exif_rotated(data: bytes) -> bytes:
    """The same photo stored sideways (pixels turned 90° anticlockwise) with EXIF orientation 6 saying "turn it
    back clockwise"; lossless PNG, so a decoder that honours EXIF gets exactly the original pixels."""
    upright = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))), "PNG", exif=exif)


def variants(data: bytes) -> dict[str, bytes]:
    """Modes a camera or an editor produces, which the service must accept (greyscale, RGBA, 16-bit, CMYK)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
    return {
        "greyscale": encode(image.convert("L"), "PNG"),
        "rgba": encode(image.convert("RGBA"), "PNG"),
        "16-bit": encode(Image.fromarray(grey), "PNG"),
        "cmyk": encode(image.convert("CMYK"), "JPEG", quality=95),
    }


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels and holds almost no data: a decompression bomb's
    calling card, refused before any pixel is decoded."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def large_blank_png(width: int, height: int) -> bytes:
    """A real, valid PNG of many pixels that compresses to a few kilobytes."""
    return encode(Image.new("RGB", (width, height)), "PNG", optimize=True)


def numbered(data: bytes, number: int) -> bytes:
    """A copy of a photo with one corner pixel encoding ``number``: a distinct file (and SHA-256) per number."""
    pixels = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    pixels[0, 0] = (number % 256, number // 256 % 256, 77)
    return encode(Image.fromarray(pixels), "PNG")
