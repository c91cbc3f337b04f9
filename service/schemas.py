"""Pydantic models of every request field type, response body and error body the API has.

They are what OpenAPI (/docs) shows, so each field says what it means.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

from reid.identify import ThresholdSource
from service.identifiers import check_individual_id

#: An individual id in a path or form field (rejected with a 422 naming the value).
IndividualId = Annotated[str, AfterValidator(check_individual_id)]


def image_url(individual_id: str, image_id: int) -> str:
    """Where a client fetches an enrolled photo (``GET``) or deletes it (``DELETE``): every ``url`` field."""
    return f"/individuals/{individual_id}/images/{image_id}"


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: a stable machine-readable code, a message naming the wrong value, and the field."""

    error: str = Field(description="machine-readable code, e.g. invalid_field, not_found, unsupported_media_type")
    message: str = Field(description="what is wrong, naming the offending value")
    field: str | None = Field(None, description="the request field at fault, e.g. 'k', 'files[1]', 'individual_id'")


class ImageInfo(BaseModel):
    image_id: int
    individual_id: str
    sha256: str = Field(description="SHA-256 of the uploaded bytes: the same photo is stored once per individual")
    view: str = Field(description="view label given at enrolment ('' when unknown)")
    media_type: str
    width: int
    height: int
    created: datetime
    url: str = Field(description="where to fetch the photo")


class EnrolledImage(ImageInfo):
    already_enrolled: bool = Field(description="true when this exact photo was already enrolled for the individual")
    also_enrolled_as: list[str] = Field(description="other individuals this exact photo is enrolled for, in id order "
                                                    "(one photo under two individuals is usually a filing mistake)")


class EnrollResponse(BaseModel):
    individual_id: str
    images: list[EnrolledImage]


class IndividualSummary(BaseModel):
    individual_id: str
    created: datetime
    image_count: int
    cover_url: str | None = Field(description="the individual's first photo (null: it has none left)")


class Individual(IndividualSummary):
    images: list[ImageInfo]


class IndividualPage(BaseModel):
    total: int = Field(description="number of individuals in the gallery")
    limit: int
    offset: int
    items: list[IndividualSummary]


class Evidence(BaseModel):
    """The enrolled photo that matched a query best: what a person looks at to confirm the match."""

    image_id: int
    view: str = Field(description="view label given at enrolment ('' when unknown)")
    similarity: float = Field(description="cosine similarity between the query's embedding and this photo's")
    inliers: int | None = Field(None, description="local-feature matches that passed the geometric check "
                                                  "(null: verification did not run, or did not reach this photo)")
    inliers_counted: bool | None = Field(None, description="whether the score counted those matches: false when "
                                                           "they are fewer than the checkpoint's inlier floor (8 "
                                                           "by default, about what photos of different individuals "
                                                           "reach by chance), so the score rests on the photos' "
                                                           "overall similarity alone; true is not a confirmation, "
                                                           "and a checkpoint calibrated before the floor counts "
                                                           "every count (null when inliers is null)")
    url: str = Field(description="where to fetch the photo")


class Prediction(BaseModel):
    individual_id: str = Field(description="an enrolled individual, or 'new_turtle'")
    score: float = Field(description="score of the individual's best-matching photo, the one the threshold compares: "
                                     "cosine similarity, or with verification on the fused probability that the "
                                     "photos show the same individual (for new_turtle: its bar in this answer, the "
                                     "threshold plus runner_up_weight x the second individual's score)")
    evidence: Evidence | None = Field(None, description="the enrolled photo that matched best (null for new_turtle)")


class IdentifyResponse(BaseModel):
    predictions: list[Prediction] = Field(description="individuals ranked by best-matching photo, each once, with "
                                                      "new_turtle in its Zindi place when a threshold applies")
    new_turtle: bool = Field(description="true when new_turtle ranks first: no enrolled photo reaches new_turtle's "
                                         "bar (the threshold, raised by runner_up_weight x the runner-up's score)")
    threshold: float | None = Field(description="the new_turtle threshold used (null: none, never new_turtle)")
    runner_up_weight: float = Field(0.0, description="share of the second individual's score added to the threshold: "
                                                     "a photo that resembles several individuals alike is more "
                                                     "likely a new turtle (stored in the checkpoint; 0: plain threshold)")
    threshold_source: ThresholdSource | None = Field(description="where the threshold came from")
    threshold_origin: str | None = Field(None, description="how a checkpoint's threshold was fitted")
    model: str = Field(description="fingerprint of the model that embedded the query")


class BatchItem(BaseModel):
    filename: str
    result: IdentifyResponse | None = Field(None, description="the answer, when the file could be identified")
    error: ErrorBody | None = Field(None, description="why this file could not be identified")


class BatchResponse(BaseModel):
    results: list[BatchItem] = Field(description="one entry per uploaded file, in upload order")


class ModelInfo(BaseModel):
    name: str
    fingerprint: str
    dim: int
    backend: str = Field(description="how the encoder runs: torch or onnx")


class IndexInfo(BaseModel):
    kind: str = Field(description="flat, hnsw or ivf")
    device: Literal["gpu", "cpu"]


class Health(BaseModel):
    status: Literal["ok"]
    model: ModelInfo
    index: IndexInfo
    gallery_size: int = Field(description="photos in the search index")
    photos: int = Field(description="photos in the database (equals gallery_size)")
    individuals: int
    verification: bool = Field(description="identify verifies its most similar photos with local features, and "
                                           "scores and the threshold are fused probabilities")
    threshold: float | None
    runner_up_weight: float = Field(0.0, description="share of the second individual's score added to the threshold "
                                                     "in each answer (0: plain threshold)")
    threshold_source: ThresholdSource | None
    threshold_origin: str | None = Field(None, description="how a checkpoint's threshold was fitted")
    writes_protected: bool
    reads_protected: bool
    max_upload_bytes: int = Field(description="largest request body the service accepts (413 above): a client sends "
                                              "more photos than fit in several requests")
