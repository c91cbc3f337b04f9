"""The one function that turns bytes or a file into an RGB image.

Training, evaluation, batch prediction and the service all decode through :func:`decode_image`, so a photo
that is EXIF-rotated, greyscale, 16-bit, CMYK or has an alpha channel becomes the same RGB array everywhere.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path
from typing import Annotated, BinaryIO

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field, TypeAdapter, ValidationError

from reid.errors import ConfigError, ImageDecodeError, ImageTooLargeError, UnsupportedImageFormatError

#: Formats a camera or phone produces (an animated GIF or multi-page TIFF is read as its first frame). Anything
#: else Pillow can open (EPS, ICO, PSD...) is refused, so a mislabelled upload is reported, not silently embedded.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "MPO", "GIF"})

#: Formats Pillow cannot open at all, recognised by their first bytes so that the user is told "unsupported
#: format" (HTTP 415) rather than "corrupt file": (offset, signature, name).
_FOREIGN_SIGNATURES = (
    (0, b"%PDF", "PDF"),
    (0, b"<svg", "SVG"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
)

#: Default pixel limit: 64 megapixels is more than any camera trap or phone gives, and far below the size at
#: which a decompression bomb exhausts memory.
DEFAULT_MAX_PIXELS = 64_000_000

#: The variable that raises (or lowers) that limit: the service reads it for ``--max-pixels``, and every command of
#: ``reid`` that reads photos (datasets, queries, ``reid enroll``) reads it too, so one setting serves both.
MAX_PIXELS_ENV = "REID_MAX_PIXELS"

#: The shortest side a photo may have. A photo a few pixels across (a 1 x 1 tracking pixel, an icon, a thumbnail
#: strip) shows no one, yet would be stretched to the model's input size and answered with confidence.
MIN_SIDE = 16


#: How the variable is read: by pydantic, as the service's settings read it, so one value means the same to both.
_PIXEL_COUNT = TypeAdapter(Annotated[int, Field(ge=1)])

#: Held while Pillow's own pixel limit is lifted for one open (see :func:`_open`).
_PILLOW_LIMIT_LOCK = threading.Lock()


def configured_max_pixels() -> int:
    """The pixel limit in force: ``$REID_MAX_PIXELS`` when set, else :data:`DEFAULT_MAX_PIXELS`.

    Raises:
        ConfigError: the variable is not a positive whole number.
    """
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        return _PIXEL_COUNT.validate_python(value)
    except ValidationError:
        raise ConfigError(f"{MAX_PIXELS_ENV}={value!r} is not a positive whole number of pixels "
                          f"(the default is {DEFAULT_MAX_PIXELS})") from None


def _foreign_format(data: bytes) -> str | None:
    """Name a known non-Pillow format from its signature (SVG may start with an XML declaration)."""
    head = data[:512].lstrip()
    for offset, signature, name in _FOREIGN_SIGNATURES:
        if head[offset:offset + len(signature)] == signature:
            return name
    if head.startswith(b"<?xml") and b"<svg" in head:
        return "SVG"
    return None


#: TIFF and BigTIFF signatures, little- and big-endian
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _unrecognised(name: str, head: bytes) -> str:
    """Why Pillow could not identify a file that starts with ``head``: a TIFF header it could not read past is a
    sample format it lacks (or damage), not "not an image"."""
    if head[:4] in _TIFF_SIGNATURES:
        return (f"{name}: a TIFF that cannot be read: corrupt, or a pixel format not supported (e.g. 32-bit "
                "floating-point colour); save it as an 8- or 16-bit TIFF, PNG or JPEG")
    return f"{name}: not a recognisable image (corrupt, or not an image file)"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, scaling 16/32-bit data instead of clipping it."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels have no defined colour; composite over mid grey so they carry no signal.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy even an RGB image


def _decode_jpeg(data: bytes) -> np.ndarray | None:
    """Decode an RGB or greyscale JPEG with OpenCV: the same pixels as Pillow (both use libjpeg-turbo with the same
    settings), EXIF orientation applied, in about half the time for a camera-size photo (bench/identify_overhead.py).
    ``None`` when OpenCV cannot, so Pillow gets to report what is wrong. A JPEG that does not end with its
    end-of-image marker is left to Pillow too: OpenCV would fill a truncated photo's missing rows with grey.
    """
    if not data.endswith(b"\xff\xd9"):
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    return image if image is not None and image.ndim == 3 else None


def decode_image(source: bytes | str | Path, max_pixels: int | None = None, min_side: int = MIN_SIDE) -> np.ndarray:
    """Decode ``source`` (raw bytes or a file path) into an ``H x W x 3`` uint8 RGB array.

    EXIF orientation is applied, so a phone photo taken sideways is embedded upright. ``max_pixels`` defaults to
    :func:`configured_max_pixels`. Errors as :func:`decode_image_with_format`.
    """
    return decode_image_with_format(source, max_pixels, min_side)[0]


def limit_hint(error: BaseException) -> str:
    """What to add to a refusal for the person who can raise the pixel limit (the CLI's user, not an API client)."""
    return f" ({MAX_PIXELS_ENV} raises the limit)" if isinstance(error, ImageTooLargeError) else ""


def _open(source: Path | BinaryIO, name: str, max_pixels: int | None, min_side: int) -> Image.Image:
    """``Image.open``, then :func:`_check_opened`: reid's limit decides, not Pillow's fixed one. ``max_pixels``
    defaults to :func:`configured_max_pixels`.

    Pillow warns above 89.5 MP and refuses twice that, whatever ``max_pixels`` says, so ``REID_MAX_PIXELS`` above
    it would be silently capped (or the header pass would let through what the decoder then refuses). Its warning
    is ignored here; a photo past its hard stop is opened again, header only, with its limit lifted under a lock
    (it is a process-wide setting), and is then judged by ``max_pixels`` like any other.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except Image.DecompressionBombError:
            if not isinstance(source, Path):
                source.seek(0)
            with _PILLOW_LIMIT_LOCK:
                pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    image = Image.open(source)
                finally:
                    Image.MAX_IMAGE_PIXELS = pillow_limit
    _check_opened(image, name, configured_max_pixels() if max_pixels is None else max_pixels, min_side)
    return image


def _check_opened(image: Image.Image, name: str, max_pixels: int, min_side: int) -> None:
    """What a header tells without decoding a pixel: a supported format, at least ``min_side`` pixels a side, at
    most ``max_pixels`` pixels. The one check of both the decoder and the dataset readers' up-front pass, so both
    refuse the same files alike."""
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedImageFormatError(f"{name}: image format {image.format} is not supported; "
                                          f"use one of {', '.join(sorted(SUPPORTED_FORMATS))}")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{name}: image is {width}x{height} = {width * height} pixels, over the limit of "
                                 f"{max_pixels}")
    if min(width, height) < min_side:
        raise ImageDecodeError(f"{name}: image is {width}x{height} pixels, too small to show an individual: a photo "
                               f"needs at least {min_side} pixels a side")


def decode_image_with_format(source: bytes | str | Path, max_pixels: int | None = None, min_side: int = MIN_SIDE,
                             name: str | None = None) -> tuple[np.ndarray, str]:
    """:func:`decode_image`, and Pillow's name of the format (``JPEG``, ``PNG``...), read from the same header
    (the service stores an upload under its format: a second parse would cost each request ~0.3 ms). Errors begin
    with ``name``: by default the path, or "uploaded bytes" (the service names the form field and file instead).

    Raises:
        UnsupportedImageFormatError: the bytes are a format outside :data:`SUPPORTED_FORMATS`.
        ImageTooLargeError: the image has more than ``max_pixels`` pixels.
        ImageDecodeError: the bytes are empty, truncated, corrupt, not an image at all, or under ``min_side``
            pixels a side (1 for photos stored before that check: they stay readable).
        ConfigError: ``max_pixels`` is not given and ``$REID_MAX_PIXELS`` is not a number.
    """
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else "uploaded bytes"
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as error:
            raise ImageDecodeError(f"cannot read image file {name}: {error.strerror or error}") from error
    else:
        data = source
    if not data:
        raise ImageDecodeError(f"{name}: the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(io.BytesIO(data), name, max_pixels, min_side)
            if image.format == "JPEG" and image.mode in ("RGB", "L"):  # CMYK and others keep Pillow's conversion
                decoded = _decode_jpeg(data)
                if decoded is not None:
                    return decoded, image.format
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # a camera photo is tens of MB: no copy when upright
            # np.asarray would be a read-only view of Pillow's buffer; callers get an array they may write to
            # (torch.from_numpy warns about a read-only one). One copy, small beside decoding a PNG.
            return np.array(_to_rgb(image)), str(image.format)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(f"{name}: {error}") from error
    except UnidentifiedImageError as error:
        foreign = _foreign_format(data)
        if foreign is not None:
            raise UnsupportedImageFormatError(
                f"{name}: image format {foreign} is not supported; use one of {', '.join(sorted(SUPPORTED_FORMATS))}"
            ) from error
        raise ImageDecodeError(_unrecognised(name, data[:4])) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(f"{name}: the image is corrupt or truncated ({error})") from error


def rgb_array_of(image: Image.Image) -> np.ndarray:
    """An already opened PIL image as :func:`decode_image` returns a file: upright by its EXIF orientation, 16- and
    32-bit data scaled, transparency over mid grey, ``H x W x 3`` uint8 (for images handed over in memory)."""
    return np.array(_to_rgb(ImageOps.exif_transpose(image)))


def check_image_header(path: str | Path, max_pixels: int | None = None) -> None:
    """Cheaply check that ``path`` opens as a supported image of at most ``max_pixels`` (header only, no pixel decode;
    ``max_pixels`` defaults to :func:`configured_max_pixels`).

    Dataset readers call this on every row so that a broken or oversized file is reported with its row up front
    instead of crashing a training run hours later. (A file cut short after its header still passes: only a full
    decode finds it, and it is reported with its path when it is read.)
    """
    try:
        with _open(Path(path), str(path), max_pixels, MIN_SIDE):
            pass
    except UnidentifiedImageError as error:
        try:
            with open(path, "rb") as file:
                head = file.read(4)
        except OSError:
            head = b""
        raise ImageDecodeError(_unrecognised(str(path), head)) from error
    except OSError as error:
        raise ImageDecodeError(f"{path}: cannot be read as an image ({error})") from error
