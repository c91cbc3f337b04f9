"""Uploaded photos: decoded once through :func:`reid.imageio.decode_image_with_format`, kept as the bytes received.

The stored file is the upload exactly as received (EXIF included), named by its SHA-256 (see
:mod:`service.store`), so the same photo is kept once, a re-upload is recognised, and no user-supplied string
ever becomes part of a path.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

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
    """A decoded upload: the bytes to store, their hash and format, and the upright RGB pixels to embed."""

    data: bytes
    sha256: str
    media_type: str
    extension: str
    pixels: np.ndarray
    view: str = ""

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def read_photo(data: bytes, max_pixels: int, view: str = "", name: str | None = None) -> Photo:
    """Decode ``data`` (raising :class:`reid.errors.ImageDecodeError` subclasses, their messages beginning with
    ``name``, for anything unusable)."""
    pixels, image_format = decode_image_with_format(data, max_pixels=max_pixels, name=name)
    media_type, extension = MEDIA_TYPES.get(image_format, (Image.MIME.get(image_format, "application/octet-stream"),
                                                           "." + image_format.lower()))
    return Photo(data, hashlib.sha256(data).hexdigest(), media_type, extension, pixels, view)


def thumbnail(pixels: np.ndarray, max_side: int) -> bytes:
    """A JPEG of the upright photo no longer than ``max_side`` on its long side, for pages that list many photos
    (a 1024 px original is ~10x the bytes a 256 px preview needs); never enlarged."""
    image = Image.fromarray(pixels)
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
