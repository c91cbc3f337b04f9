"""Uploaded photos: decoded once through :func:`reid.imageio.decode_image_with_format`, kept as the bytes received.

The stored file is the upload exactly as received (EXIF included), named by its SHA-256 (see
:mod:`service.store`), so the same photo is kept once, a re-upload is recognised, and no user-supplied string
ever becomes part of a path.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
from PIL import Image

from reid.imageio import decode_image_with_format

#: Pillow format → (media type served back, file extension). MPO is a multi-picture JPEG: browsers show it as JPEG.
MEDIA_TYPES = {
    "JPEG": ("image/jpeg", ".jpg"),
    "MPO": ("image/jpeg", ".jpg"),
    "PNG": ("image/png", ".png"),
    "BMP": ("image/bmp", ".bmp"),
    "TIFF": ("image/tiff", ".tiff"),
    "WEBP": ("image/webp", ".webp"),
    "GIF": ("image/gif", ".gif"),
    "PPM": ("image/x-portable-anymap", ".ppm"),
}


@dataclass(frozen=True)
class Photo:
    """A decoded upload: the bytes to store, their hash and format, and the upright RGB pixels to embed (``None``
    once embedded: see :func:`within_pixel_budget`)."""

    data: bytes
    sha256: str
    media_type: str
    extension: str
    pixels: np.ndarray | None
    width: int
    height: int
    view: str = ""

    def without_pixels(self) -> Photo:
        """This photo once its pixels have been embedded, holding only what the store keeps."""
        return replace(self, pixels=None)


T = TypeVar("T")


def within_pixel_budget(items: Iterable[T], pixels: Callable[[T], int], budget: int,
                        max_items: int | None = None) -> Iterator[list[T]]:
    """``items`` in runs of at most ``budget`` pixels (a larger photo alone) and ``max_items``, drawn as they are
    consumed: photos decoded one by one from such an iterable are embedded a run at a time, and a run is emptied when
    the consumer asks for the next, so a consumer that keeps no other reference to the pixels holds one run and the
    photo that closed it. Decoding a whole request first held every photo at full size at once: one 1 MB request of
    sixteen 62-megapixel PNGs (3 GB of RGB) took the server's memory down."""
    run: list[T] = []
    total = 0
    for item in items:
        size = pixels(item)
        if run and (total + size > budget or (max_items is not None and len(run) == max_items)):
            yield run
            run.clear()  # the consumer is done with these photos: their pixels go before the next are decoded
            total = 0
        run.append(item)
        total += size
    if run:
        yield run


def read_photo(data: bytes, max_pixels: int, view: str = "", name: str | None = None) -> Photo:
    """Decode ``data`` (raising :class:`reid.errors.ImageDecodeError` subclasses, their messages beginning with
    ``name``, for anything unusable)."""
    pixels, image_format = decode_image_with_format(data, max_pixels=max_pixels, name=name)
    media_type, extension = MEDIA_TYPES[image_format]  # decoding refuses every format it has no entry for
    return Photo(data, hashlib.sha256(data).hexdigest(), media_type, extension, pixels, int(pixels.shape[1]),
                 int(pixels.shape[0]), view)


def thumbnail(pixels: np.ndarray, max_side: int) -> bytes:
    """A JPEG of the upright photo no longer than ``max_side`` on its long side, for pages that list many photos
    (a 1024 px original is ~10x the bytes a 256 px preview needs); never enlarged."""
    image = Image.fromarray(pixels)
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
