"""Enrolled individuals and their photos: enrol, add, list, show, fetch a photo, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Query, Response, UploadFile
from fastapi.responses import FileResponse
from pydantic import StringConstraints

from reid.data.records import normalise_view
from service.auth import require_key_for_reads, require_key_for_writes
from service.deps import EngineDep
from service.engine import Engine
from service.errors import InvalidFieldError
from service.routes.common import SQLITE_MAX_INTEGER, error_responses, read_uploads
from service.photos import thumbnail
from service.schemas import (
    EnrolledImage,
    EnrollResponse,
    ImageInfo,
    Individual,
    IndividualId,
    IndividualPage,
    IndividualSummary,
    image_url,
)
from service.store import IndividualMode, IndividualRecord, StoredImage

router = APIRouter(prefix="/individuals", tags=["individuals"])

Files = Annotated[list[UploadFile], File(description="one or more photos of the individual")]
Views = Annotated[list[Annotated[str, StringConstraints(max_length=64)]] | None,
                  Form(description="optional view of each photo (e.g. top, left, right): none, or one per file")]
IdInPath = Annotated[IndividualId, Path(description="the individual's id")]
ImageIdInPath = Annotated[int, Path(ge=1, le=SQLITE_MAX_INTEGER, description="the photo's id")]
Writer = Depends(require_key_for_writes)
Reader = Depends(require_key_for_reads)


def _cover_url(record: IndividualRecord) -> str | None:
    return None if record.cover_image_id is None else image_url(record.individual_id, record.cover_image_id)


def _image_info(image: StoredImage) -> dict[str, object]:
    return {
        "image_id": image.image_id, "individual_id": image.individual_id, "sha256": image.sha256, "view": image.view,
        "media_type": image.media_type, "width": image.width, "height": image.height, "created": image.created,
        "url": image_url(image.individual_id, image.image_id),
    }


def _enroll(engine: Engine, individual_id: str, files: list[UploadFile], views: list[str] | None,
            mode: IndividualMode) -> EnrollResponse:
    if views and len(views) != len(files):
        raise InvalidFieldError(f"view: give no view or one per file (got {len(views)} views for {len(files)} files)",
                                "view")
    photos = read_uploads(engine, files, "files", [normalise_view(v) for v in views] if views else None)
    stored = engine.enroll(individual_id, photos, mode)
    return EnrollResponse(individual_id=individual_id, images=[
        EnrolledImage(**_image_info(image), already_enrolled=image.already_enrolled,
                      also_enrolled_as=engine.store.other_owners(individual_id, image.sha256)) for image in stored])


@router.post("", status_code=201, dependencies=[Writer], summary="Enrol a new individual with its photos",
             responses=error_responses(400, 401, 409, 413, 415, 422, 503, 507))
def create_individual(engine: EngineDep,
                      individual_id: Annotated[IndividualId, Form(description="id of the new individual")],
                      files: Files, view: Views = None) -> EnrollResponse:
    return _enroll(engine, individual_id, files, view, "new")


@router.post("/{individual_id}/images", status_code=201, dependencies=[Writer],
             summary="Add photos to an individual (re-adding a photo already enrolled changes nothing)",
             responses=error_responses(400, 401, 404, 413, 415, 422, 503, 507))
def add_images(engine: EngineDep, individual_id: IdInPath, files: Files, view: Views = None) -> EnrollResponse:
    return _enroll(engine, individual_id, files, view, "existing")


@router.get("", dependencies=[Reader], summary="List individuals, a page at a time, in id order",
            responses=error_responses(401, 422))
def list_individuals(engine: EngineDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                     offset: Annotated[int, Query(ge=0, le=SQLITE_MAX_INTEGER)] = 0,
                     q: Annotated[str, Query(max_length=128, description="only ids containing this (any case)")] = "",
                     ) -> IndividualPage:
    total, records = engine.store.individuals(limit, offset, q)
    return IndividualPage(total=total, limit=limit, offset=offset, items=[
        IndividualSummary(individual_id=r.individual_id, created=r.created, image_count=r.image_count,
                          cover_url=_cover_url(r))
        for r in records])


@router.get("/{individual_id}", dependencies=[Reader], summary="An individual and its photos",
            responses=error_responses(401, 404, 422))
def get_individual(engine: EngineDep, individual_id: IdInPath) -> Individual:
    record, images = engine.store.individual(individual_id)
    return Individual(individual_id=record.individual_id, created=record.created, image_count=record.image_count,
                      cover_url=_cover_url(record),
                      images=[ImageInfo(**_image_info(image)) for image in images])


@router.delete("/{individual_id}", status_code=204, dependencies=[Writer],
               summary="Delete an individual and all its photos", responses=error_responses(401, 404, 422, 507))
def delete_individual(engine: EngineDep, individual_id: IdInPath) -> Response:
    engine.delete_individual(individual_id)
    return Response(status_code=204)


@router.get("/{individual_id}/images/{image_id}", dependencies=[Reader], response_class=FileResponse,
            summary="The photo as uploaded, or a small JPEG preview of it (max_side)", responses={
                200: {"content": {"image/*": {}}, "description": "the photo bytes with their media type, or with "
                                                                "max_side a JPEG preview, upright"},
                **error_responses(401, 404, 422)})
def get_image(engine: EngineDep, individual_id: IdInPath, image_id: ImageIdInPath,
              max_side: Annotated[int | None, Query(ge=16, le=2048, description=(
                  "return a JPEG preview at most this many pixels on its long side instead of the original"))] = None,
              ) -> Response:
    image = engine.store.image(individual_id, image_id)
    if max_side is None:
        return FileResponse(engine.stored_file(image), media_type=image.media_type)
    return Response(thumbnail(engine.stored_pixels(image), max_side), media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=3600"})


@router.delete("/{individual_id}/images/{image_id}", status_code=204, dependencies=[Writer],
               summary="Delete one photo of an individual", responses=error_responses(401, 404, 422, 507))
def delete_image(engine: EngineDep, individual_id: IdInPath, image_id: ImageIdInPath) -> Response:
    engine.delete_image(individual_id, image_id)
    return Response(status_code=204)
