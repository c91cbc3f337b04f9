"""Identification: which enrolled individuals a photo shows, or "new_turtle"."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Response, UploadFile

from reid.metrics import THRESHOLD_RANGE
from reid.verification import inliers_counted
from service.auth import require_key_for_reads
from service.deps import EngineDep
from service.errors import InvalidFieldError, ServiceError
from service.photos import Photo
from service.routes.common import SQLITE_MAX_INTEGER, error_responses, json_answer
from service.schemas import BatchItem, BatchResponse, IdentifyResponse, IndividualId
from service.settings import MAX_K

router = APIRouter(prefix="/identify", tags=["identify"], dependencies=[Depends(require_key_for_reads)])

#: Files per batch request: enough for a camera's day, small enough that one request cannot hog the service.
MAX_BATCH_FILES = 64

K = Annotated[int | None, Form(ge=1, le=MAX_K, description=f"individuals to return, 1..{MAX_K} "
                                                             "(default: the service's default_k)")]
ThresholdField = Annotated[float | None, Form(ge=THRESHOLD_RANGE[0], le=THRESHOLD_RANGE[1], allow_inf_nan=False,
                                              description="new_turtle threshold in [-2, 2] (scores lie in [-1, 1]; "
                                                          "the runner-up's share can lift a bar past them; default: "
                                                          "the checkpoint's "
                                                          "calibrated threshold, else the service's default)")]


@router.post("", summary="Identify the individual in one photo", response_model=IdentifyResponse,
             responses=error_responses(400, 401, 413, 415, 422))
def identify(engine: EngineDep, file: Annotated[UploadFile, File(description="the photo to identify")], k: K = None,
             threshold: ThresholdField = None) -> Response:
    photo = engine.decode_upload(file.file.read(), "file", file.filename)
    return json_answer(engine.identify([photo.pixels], k, threshold)[0])


@router.post("/batch", summary="Identify several photos; a bad file gets its own error, the others their answers",
             response_model=BatchResponse, responses=error_responses(400, 401, 413, 422))
def identify_batch(engine: EngineDep,
                   files: Annotated[list[UploadFile], File(description=f"up to {MAX_BATCH_FILES} photos")],
                   k: K = None, threshold: ThresholdField = None) -> Response:
    if len(files) > MAX_BATCH_FILES:
        raise InvalidFieldError(f"files: {len(files)} files is over the batch limit of {MAX_BATCH_FILES}", "files")
    items = [BatchItem(filename=upload.filename or f"files[{i}]") for i, upload in enumerate(files)]

    def decoded() -> Iterator[tuple[int, Photo]]:  # one by one, as the engine asks for them
        for i, upload in enumerate(files):
            try:
                yield i, engine.decode_upload(upload.file.read(), f"files[{i}]", upload.filename)
            except ServiceError as error:
                items[i].error = error.body()

    for position, answer in engine.identify_photos(decoded(), k, threshold):
        items[position].result = answer
    return json_answer(BatchResponse(results=items))


@router.post("/explain", summary="Draw the query beside an enrolled photo, their verified matches joined by lines (PNG)",
             response_class=Response, responses={
                 200: {"content": {"image/png": {}},
                       "description": "both photos side by side, each local-feature match that agrees with one "
                                      "geometric transform joined by a line, the inlier count in the caption",
                       "headers": {"X-Similarity": {"description": "cosine similarity of the two embeddings",
                                                    "schema": {"type": "number"}},
                                   "X-Inliers": {"description": "verified local-feature matches",
                                                 "schema": {"type": "integer"}},
                                   "X-Fallback": {"description": "true when the matches drawn are the fallback's "
                                                                "(simulated camera tilts), found where plain matching "
                                                                "found too few", "schema": {"type": "boolean"}},
                                   "X-Inliers-Counted": {"description": "with verification on: false when the matches "
                                                                       "drawn are fewer than the inlier floor, so a "
                                                                       "score would read them as no match",
                                                         "schema": {"type": "boolean"}}}},
                 **error_responses(400, 401, 404, 413, 415, 422)})
def explain(engine: EngineDep, file: Annotated[UploadFile, File(description="the photo that was identified")],
            individual_id: Annotated[IndividualId, Form(description="the individual it was matched to")],
            image_id: Annotated[int, Form(ge=1, le=SQLITE_MAX_INTEGER, description=(
                "the enrolled photo to compare with, e.g. a prediction's evidence.image_id"))]) -> Response:
    photo = engine.decode_upload(file.file.read(), "file", file.filename)
    explanation = engine.explain(photo, file.filename or "upload", individual_id, image_id)
    counted = inliers_counted(explanation.inliers, engine.verification.fusion if engine.verification else None)
    return Response(explanation.png, media_type="image/png",
                    headers={"X-Similarity": f"{explanation.similarity:.6f}", "X-Inliers": str(explanation.inliers),
                             "X-Fallback": str(explanation.fallback).lower(),
                             **({} if counted is None else {"X-Inliers-Counted": str(counted).lower()})})
