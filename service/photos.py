"""Uploaded photos: decode once through :func:`reid.imageio.decode_image`, and store the bytes durably.

The stored file is the upload exactly as received (EXIF included), named by its SHA-256, so the same photo is
kept once, a re-upload is recognised, and no user-supplied string ever becomes part of a path.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from reid.imageio import decode_image

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


def read_photo(data: bytes, max_pixels: int, view: str = "") -> Photo:
    """Decode ``data`` (raising :class:`reid.errors.ImageDecodeError` subclasses for anything unusable)."""
    pixels = decode_image(data, max_pixels=max_pixels)
    with Image.open(io.BytesIO(data)) as image:  # header only: decode_image has accepted the format already
        image_format = str(image.format)
    media_type, extension = MEDIA_TYPES.get(image_format, (Image.MIME.get(image_format, "application/octet-stream"),
                                                           "." + image_format.lower()))
    return Photo(data, hashlib.sha256(data).hexdigest(), media_type, extension, pixels, view)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either no file or the whole file, never a partial one.

    The bytes go to a temporary file in the same folder, are fsynced, then renamed over ``path``; the folder is
    fsynced too so the rename itself survives a power cut.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".upload-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
