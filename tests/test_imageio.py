"""decode_image: every photo a user can upload becomes the same upright RGB array, or a clear error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from reid.errors import ConfigError, ImageDecodeError, ImageTooLargeError, UnsupportedImageFormatError
from reid.imageio import check_image_header, decode_image


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "CMYK", "P", "I;16", "LA"])
def test_any_mode_becomes_rgb(photo: Image.Image, mode: str) -> None:
    """Writable too: a read-only array reaching ``torch.from_numpy`` (training's uint8 tail, where no augmentation
    copied the photo) made every worker print PyTorch's "NumPy array is not writable" warning."""
    image = photo.convert("L").convert("I;16") if mode == "I;16" else photo.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG" if mode != "I;16" else "TIFF"
    array = decode_image(_encode(image, fmt))
    assert array.shape == (30, 40, 3) and array.dtype == np.uint8 and array.flags.writeable


def test_sixteen_bit_keeps_its_contrast() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    array = decode_image(_encode(Image.fromarray(ramp), "PNG"))
    assert array[..., 0].min() == 0 and array[..., 0].max() == 255  # not clipped to white


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_pixels_are_pillows_whichever_decoder_runs(photo: Image.Image, mode: str) -> None:
    """RGB and grey JPEGs are decoded by OpenCV (faster): training, evaluation and the service must still see
    exactly the pixels Pillow gives, or embeddings of stored and new photos would drift apart."""
    data = _encode(photo.convert(mode), "JPEG", quality=90)
    assert np.array_equal(decode_image(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_exif_rotation_is_applied(photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = _encode(photo, "JPEG", exif=exif)
    array = decode_image(data)
    assert array.shape == (40, 30, 3)
    assert np.array_equal(array, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))))


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", ImageDecodeError, "empty"),
        (b"just some text, named .jpg", ImageDecodeError, "not a recognisable image"),
        (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", UnsupportedImageFormatError, "PDF is not supported"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', UnsupportedImageFormatError,
         "SVG is not supported"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", UnsupportedImageFormatError, "HEIC is not supported"),
    ],
)
def test_junk_is_refused_with_a_reason(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        decode_image(data)


def test_truncated_and_unsupported_and_too_large(photo: Image.Image) -> None:
    jpeg = _encode(photo, "JPEG")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(jpeg[: len(jpeg) // 2])
    with pytest.raises(UnsupportedImageFormatError, match="ICO is not supported"):
        decode_image(_encode(photo, "ICO"))
    with pytest.raises(ImageTooLargeError, match="1200 pixels, over the limit of 1000"):
        decode_image(jpeg, max_pixels=1000)


def test_decompression_bomb_header_is_refused_before_decoding() -> None:
    big = Image.new("L", (20000, 20000))  # 400 Mpx of zeros: a few hundred KB as PNG
    with pytest.raises(ImageTooLargeError):
        decode_image(_encode(big, "PNG", compress_level=1))


def test_the_header_check_refuses_an_image_over_the_pixel_limit(tmp_path) -> None:
    """Before any training: a photo too large to decode is found from its header, with its size."""
    from PIL import Image

    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200)).save(path)
    check_image_header(path, max_pixels=60_000)
    with pytest.raises(ImageTooLargeError, match=r"wide.png: image is 300x200 = 60000 pixels, over the limit of 59999"):
        check_image_header(path, max_pixels=59_999)


def test_the_pixel_limit_of_every_command_is_the_services_variable(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """REID_MAX_PIXELS, which the service reads for --max-pixels, raises the limit of datasets and queries too."""
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200)).save(path)
    monkeypatch.setenv("REID_MAX_PIXELS", "59_999")
    with pytest.raises(ImageTooLargeError, match=r"wide.png: image is 300x200 = 60000 pixels, over the limit of 59999$"):
        check_image_header(path)
    with pytest.raises(ImageTooLargeError, match="over the limit of 59999"):
        decode_image(path)
    monkeypatch.setenv("REID_MAX_PIXELS", "60000")
    assert decode_image(path).shape == (200, 300, 3)
    monkeypatch.setenv("REID_MAX_PIXELS", "60000.0")  # what the service's settings accept, read alike
    assert decode_image(path).shape == (200, 300, 3)
    for wrong in ("many", "0", "-5", "1.5e6"):
        monkeypatch.setenv("REID_MAX_PIXELS", wrong)
        with pytest.raises(ConfigError, match=rf"REID_MAX_PIXELS='{wrong}' is not a positive whole number"):
            decode_image(path)


@pytest.mark.parametrize("size", [(1, 1), (20_000, 1), (15, 400)])
def test_a_photo_too_small_to_show_anyone_is_refused_from_its_header(tmp_path, size: tuple[int, int]) -> None:
    """A 1 x 1 tracking pixel or a thin strip would be stretched to the model's input and answered with confidence."""
    path = tmp_path / "tiny.png"
    Image.new("RGB", size).save(path)
    width, height = size
    message = rf"tiny.png: image is {width}x{height} pixels, too small to show an individual: .* at least 16 pixels a side"
    with pytest.raises(ImageDecodeError, match=message):
        check_image_header(path)
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(path)
    Image.new("RGB", (16, 16)).save(path)
    assert decode_image(path).shape == (16, 16, 3)


def test_a_limit_above_pillows_own_is_the_one_applied(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow warns above its fixed limit (89.5 MP) and refuses twice that: a REID_MAX_PIXELS above it must still
    decide, in the header pass and the decoder alike, and Pillow's limit is left as it was."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # Pillow's limit scaled down: 300 x 200 is 6x over it
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200)).save(path)
    check_image_header(path, max_pixels=60_000)
    assert decode_image(path, max_pixels=60_000).shape == (200, 300, 3)
    assert decode_image(path.read_bytes(), max_pixels=60_000).shape == (200, 300, 3)
    with pytest.raises(ImageTooLargeError, match="60000 pixels, over the limit of 59999"):
        check_image_header(path, max_pixels=59_999)
    assert Image.MAX_IMAGE_PIXELS == 10_000


def test_photos_stored_before_the_smallest_side_existed_stay_readable(tmp_path) -> None:
    path = tmp_path / "thumb.png"
    Image.new("RGB", (12, 9)).save(path)
    assert decode_image(path, min_side=1).shape == (9, 12, 3)


def test_the_service_serves_every_format_it_decodes_under_its_media_type() -> None:
    from reid.imageio import SUPPORTED_FORMATS
    from service.photos import MEDIA_TYPES

    assert set(MEDIA_TYPES) == SUPPORTED_FORMATS


def test_a_tiff_in_a_pixel_format_pillow_lacks_is_named_as_such(tmp_path: Path) -> None:
    """A 32-bit float colour TIFF (what scientific software writes) was called "corrupt, or not an image file"."""
    import cv2

    ok, data = cv2.imencode(".tiff", np.random.default_rng(0).random((20, 30, 3)).astype(np.float32))
    assert ok
    message = (r"a TIFF that cannot be read: corrupt, or a pixel format not supported \(e.g. 32-bit floating-point "
               r"colour\); save it as an 8- or 16-bit")
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data.tobytes())
    path = tmp_path / "float.tif"  # a dataset's header pass says the same
    path.write_bytes(data.tobytes())
    with pytest.raises(ImageDecodeError, match=message):
        check_image_header(path)
