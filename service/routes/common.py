"""What every router shares: upload decoding, OpenAPI error documentation and pre-serialised JSON answers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import Response, UploadFile
from pydantic import BaseModel

from service.engine import Engine
from service.photos import Photo
from service.schemas import ErrorBody

#: SQLite integers are 64-bit: a larger image id or offset is refused as a field error, not met with an overflow.
SQLITE_MAX_INTEGER = 2**63 - 1

_DESCRIPTIONS = {
    400: "Malformed request (e.g. a multipart body that cannot be parsed)",
    401: "Missing or wrong X-API-Key",
    404: "Unknown individual or image",
    409: "The individual already exists",
    413: "Request body over the size limit",
    415: "Uploaded file is an unsupported format (e.g. PDF, SVG)",
    422: "Invalid field (named in the body), or an image that is corrupt, truncated, empty or over the pixel limit",
    503: "The store was re-indexed with another model since the service started",
    507: "The data folder's disk is full: the request changed nothing (free space on it)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the given error statuses, all with the ErrorBody schema."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}


def json_answer(model: BaseModel) -> Response:
    """``model`` as a JSON response, serialised once by pydantic.

    A plain ``def`` route that returns the model itself has FastAPI validate it against the response model again,
    in its thread pool: a second hop between threads a request (~0.15 ms, more when the cores are busy) to check a
    model this service has just built. Routes answering this way name their model in ``response_model``, so OpenAPI
    documents the same schema.
    """
    return Response(model.model_dump_json(), media_type="application/json")


def read_uploads(engine: Engine, files: Sequence[UploadFile], field: str,
                 views: Sequence[str] | None = None) -> Iterator[Photo]:
    """Decode the uploads of a multipart field (``files[0]``, ``files[1]``...) one by one as they are drawn (see
    :meth:`service.engine.Engine.enroll`), failing on the first bad one."""
    views = list(views) if views else [""] * len(files)
    return (engine.decode_upload(upload.file.read(), f"{field}[{i}]", upload.filename, view)
            for i, (upload, view) in enumerate(zip(files, views)))
