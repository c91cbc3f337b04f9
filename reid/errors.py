"""User-facing errors, and what each becomes for the person who made the mistake.

Every mistake a user can make (a bad dataset, a wrong path, an impossible setting, an image that cannot be decoded)
raises a subclass of :class:`ReIDError` whose message names the offending value.

- The ``reid`` command (``reid serve`` included, for what it finds before it listens: a bad setting, an unreadable
  checkpoint, a data folder in use or embedded by another model) prints every one as one ``reid: error:`` line on
  stderr and exits with code 2.
- The service (``service.errors``) answers an upload it cannot decode with 415 ``unsupported_media_type``
  (:class:`UnsupportedImageFormatError`) or 422: ``image_too_large`` (:class:`ImageTooLargeError`) or
  ``invalid_image`` (any other :class:`ImageDecodeError`). Those and the service's own refusals are
  ``service.errors.ServiceError`` subclasses, each with its status: 401, 404, 409, 415, 422, or 503 (the store's
  photos were embedded by another model); a stored photo that no longer decodes is a 404 naming the image. Any
  other error raised while answering a request, another :class:`ReIDError` included, is answered 500
  ``internal_error`` and logged with its traceback.

Anything that is not a :class:`ReIDError` is a bug and keeps its traceback.
"""


class ReIDError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class DatasetError(ReIDError):
    """A dataset folder or file is malformed (the message names the file and, where known, the row)."""


class ImageDecodeError(ReIDError):
    """Bytes or a file could not be decoded into an RGB image."""


class UnsupportedImageFormatError(ImageDecodeError):
    """The bytes are a format this project does not accept (e.g. PDF, SVG, HEIC, ICO)."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""


class ConfigError(ReIDError):
    """A setting that cannot work (an impossible batch, an unknown backbone, a bad augmentation...): the one error
    type for configuration mistakes, whether they come from a YAML file, a flag or Python. The message starts with
    the key, as the config spells it (``data.individuals_per_batch: ...``)."""


class WeightsError(ConfigError):
    """Backbone weights (``model.pretrained``) could not be found, read or matched to the model."""


class CheckpointError(ReIDError):
    """A checkpoint is missing, unreadable or lacks the metadata needed to embed images."""


class SubmissionError(ReIDError):
    """A submission or truth file does not fit the Zindi competition format (the message names the file and row)."""


class FeatureError(ReIDError):
    """Local features (keypoints and descriptors) cannot be computed from an input or read back from storage."""


def require(key: str, value: object, ok: bool, expected: str) -> None:
    """Raise :class:`ConfigError` naming ``key``, ``value`` and what was ``expected`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")
