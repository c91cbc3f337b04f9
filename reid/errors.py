"""User-facing errors.

Every mistake a user can make (a bad dataset, a wrong path, an impossible setting, an image that cannot be decoded)
raises a subclass of :class:`ReIDError` whose message names the offending value. The CLI turns every one into one
``reid: error:`` line on stderr and exit code 2. The service answers uploads it cannot decode with 415
(:class:`UnsupportedImageFormatError`) or 422 (any other :class:`ImageDecodeError`, pixel limit included); its own
refusals are ``service.errors.ServiceError`` subclasses, each with its HTTP status. Anything else is a bug and keeps
its traceback (a 500 with a JSON body in the service).
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
