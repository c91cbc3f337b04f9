"""Service errors and how every error becomes a JSON :class:`~service.schemas.ErrorBody`.

User mistakes are :class:`ServiceError` subclasses carrying their HTTP status; image problems come from
:mod:`reid.imageio` and are mapped here (unsupported format → 415, anything else undecodable → 422). Request
validation, unknown routes and body-size refusals get the same body shape, so a client parses one format.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from reid.errors import ImageDecodeError, ImageTooLargeError, ReIDError, UnsupportedImageFormatError
from service.schemas import ErrorBody

log = logging.getLogger(__name__)


class StoreError(ReIDError):
    """The data folder or its database cannot be created, opened or used."""


class ServiceError(ReIDError):
    """A request the service refuses; ``status`` and ``code`` say how, ``field`` names the culprit."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def body(self) -> ErrorBody:
        return ErrorBody(error=self.code, message=str(self), field=self.field)


class NotFoundError(ServiceError):
    status = 404
    code = "not_found"


class ConflictError(ServiceError):
    status = 409
    code = "conflict"


class InvalidFieldError(ServiceError):
    status = 422
    code = "invalid_field"


class UnauthorizedError(ServiceError):
    status = 401
    code = "unauthorized"


class ModelMismatchError(ServiceError):
    """The store's embeddings were made by another model than the one loaded (start-up, or a reindex since)."""

    status = 503
    code = "model_mismatch"


class StorageFullError(ServiceError):
    """The data folder's disk is full: nothing can be stored, and even a deletion needs room for its journal."""

    status = 507
    code = "insufficient_storage"


class ImageRejectedError(ServiceError):
    """An uploaded file that cannot be decoded: corrupt, truncated, empty, or not an image."""

    status = 422
    code = "invalid_image"


class ImageOverPixelLimitError(ImageRejectedError):
    code = "image_too_large"


class UnsupportedImageError(ImageRejectedError):
    status = 415
    code = "unsupported_media_type"


def rejected_image(error: ImageDecodeError, field: str) -> ImageRejectedError:
    """The service error for a decode failure of the upload in ``field``: the decoder's explanation, which names the
    field and the file (:meth:`service.engine.Engine.decode_upload` gives it that name)."""
    kind = (UnsupportedImageError if isinstance(error, UnsupportedImageFormatError)
            else ImageOverPixelLimitError if isinstance(error, ImageTooLargeError) else ImageRejectedError)
    return kind(str(error), field)


#: What a client whose request is over the body limit can do, and what the operator can change.
BODY_LIMIT_ADVICE = ("send fewer or smaller photos in one request (the rest in further requests), or start the "
                     "service with a higher --max-upload-bytes (REID_MAX_UPLOAD_BYTES)")


class BodyTooLargeError(HTTPException):
    """Raised while the body streams in; an :class:`HTTPException` so that FastAPI's body parsing lets it through."""

    def __init__(self, limit: int, received: int) -> None:
        super().__init__(413, f"request body is over the limit of {limit} bytes (received {received} so far): "
                              f"{BODY_LIMIT_ADVICE}")


def error_response(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _field_name(location: Sequence[Any]) -> str:
    """``("body", "files", 1)`` → ``files[1]``: the name a client used, without FastAPI's location prefix."""
    parts = list(location[1:] if location and location[0] in ("body", "query", "path", "header") else location)
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validation_body(error: RequestValidationError, content_type: str = "multipart/form-data",
                    path: str = "") -> ErrorBody:
    """One message listing every invalid field with the value it had; ``field`` is the first of them.

    Two mistakes of curl users get the fix spelled out: a photo sent as the raw body or as JSON (``content_type``
    is then not multipart, so every form field is "missing"), and a text value where a file belongs (``-F
    file=photo.jpg``, without curl's ``@``)."""
    problems = []
    fields = []
    for item in error.errors():
        field = _field_name(item.get("loc", ()))
        fields.append(field)
        message = str(item.get("msg", "invalid"))
        if item.get("type") == "missing":
            problems.append(f"{field}: field required")
        elif item.get("type") == "value_error":  # our own validators already name the value
            problems.append(f"{field}: {message.removeprefix('Value error, ')}")
        else:
            problems.append(f"{field}: {message} (got {_shown(item.get('input'))})")
        if "Expected UploadFile" in message:
            problems[-1] += f"; send the file itself: curl -F {field.split('[')[0]}=@photo.jpg (with the @)"
    body_fields = any(item.get("loc", ())[:1] == ("body",) for item in error.errors())
    if body_fields and not content_type.lower().startswith("multipart/form-data"):
        example = ("-F files=@a.jpg -F files=@b.jpg" if path.startswith("/identify/batch") else
                   "-F file=@photo.jpg" if path.startswith("/identify") else
                   "-F individual_id=t042 -F files=@photo.jpg")
        problems.append(f"the request was sent as {content_type or 'no content type'}: send the fields as "
                        f"multipart/form-data (curl {example})")
    return ErrorBody(error="invalid_field", message="; ".join(problems), field=fields[0] if fields else None)


def install_error_handlers(app: FastAPI) -> None:
    """Make every refusal, expected or not, a JSON ErrorBody; unexpected errors are logged with a traceback."""

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, error: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "X-API-Key"} if isinstance(error, UnauthorizedError) else None
        return error_response(error.status, error.body(), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_body(error, request.headers.get("content-type", ""), request.url.path))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        # Raised by routing (unknown path or method), body parsing (malformed multipart) and the size limit.
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(error.status_code,
                                                                                        "bad_request")
        message = str(error.detail)
        if error.status_code in (404, 405):
            message = f"{request.method} {request.url.path}: {message.lower()}"
        return error_response(error.status_code, ErrorBody(error=code, message=message),
                              dict(error.headers) if error.headers else None)

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        # one line here; the server (uvicorn) logs the traceback once, as Starlette re-raises the error after this
        # answer (log.exception here printed every traceback twice)
        log.error("unexpected error on %s %s: %s: %s", request.method, request.url.path, type(error).__name__, error)
        return error_response(500, ErrorBody(error="internal_error", message=f"internal error: {type(error).__name__}"))
