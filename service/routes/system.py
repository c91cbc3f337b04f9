"""The service's state: health (model, index, sizes) and the RSM heatmap of enrolled photos."""

from __future__ import annotations

import io
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Response

from reid.rsm import compute_rsm, plot_rsm
from service.auth import require_key_for_reads
from service.deps import EngineDep
from service.engine import Engine
from service.errors import InvalidFieldError, NotFoundError
from service.identifiers import check_individual_id
from service.routes.common import error_responses
from service.schemas import Health, IndexInfo, ModelInfo

router = APIRouter(tags=["service"], dependencies=[Depends(require_key_for_reads)])

#: An RSM of more individuals than this is unreadable; ask for a selection instead.
MAX_RSM_INDIVIDUALS = 50
#: Photos per individual in the RSM (a random, seeded choice when there are more).
RSM_PHOTOS_PER_INDIVIDUAL = 20


@router.get("/health", summary="Model, index, gallery size, verification and threshold in force",
            responses=error_responses(401))
def health(engine: EngineDep) -> Health:
    individuals, photos = engine.store.counts()
    threshold = engine.threshold(None)
    settings = engine.settings
    return Health(status="ok",
                  model=ModelInfo(name=engine.embedder.name, fingerprint=engine.embedder.fingerprint,
                                  dim=engine.embedder.dim, backend=engine.embedder.backend),
                  index=IndexInfo(kind=engine.gallery.kind, device=engine.gallery.device),
                  gallery_size=len(engine.gallery), photos=photos, individuals=individuals,
                  verification=engine.verifying, threshold=threshold.value,
                  runner_up_weight=threshold.runner_up_weight, threshold_source=threshold.source,
                  threshold_origin=threshold.origin, writes_protected=settings.api_key is not None,
                  reads_protected=settings.api_key is not None and settings.protect_reads,
                  max_upload_bytes=settings.max_upload_bytes)


def _selected_individuals(engine: Engine, individuals: str | None) -> list[str]:
    if individuals is None:
        total, records = engine.store.individuals(MAX_RSM_INDIVIDUALS + 1, 0)
        if total == 0:
            raise NotFoundError("individuals: the gallery is empty; enrol individuals first", "individuals")
        if total > MAX_RSM_INDIVIDUALS:
            raise InvalidFieldError(f"individuals: the gallery holds {total} individuals, over the "
                                    f"{MAX_RSM_INDIVIDUALS} an RSM can show; name some with ?individuals=a,b,c",
                                    "individuals")
        return [record.individual_id for record in records]
    names = list(dict.fromkeys(name.strip() for name in individuals.split(",") if name.strip()))
    if not names or len(names) > MAX_RSM_INDIVIDUALS:
        raise InvalidFieldError(f"individuals: name 1 to {MAX_RSM_INDIVIDUALS} individuals (got {len(names)})",
                                "individuals")
    for name in names:
        try:
            check_individual_id(name)
        except ValueError as error:
            raise InvalidFieldError(f"individuals: {error}", "individuals") from error
    missing = engine.store.missing_individuals(names)
    if missing:
        raise NotFoundError(f"individuals: unknown individual(s) {missing}", "individuals")
    return names


@router.get("/rsm.png", summary="Representational similarity matrix of enrolled photos (PNG)",
            response_class=Response, responses={200: {"content": {"image/png": {}}, "description": "the heatmap"},
                                                **error_responses(401, 404, 422)})
def rsm_png(engine: EngineDep, individuals: Annotated[str | None, Query(max_length=10_000, description=(
                "comma-separated individual ids (default: all, when there are at most "
                f"{MAX_RSM_INDIVIDUALS})"))] = None) -> Response:
    names = _selected_individuals(engine, individuals)
    batches = list(engine.store.embeddings(engine.embedder.fingerprint, names))
    if not batches:
        raise NotFoundError(f"individuals: no enrolled photos for {names}", "individuals")
    rsm = compute_rsm(np.concatenate([b.vectors for b in batches]), [i for b in batches for i in b.identities],
                      [v for b in batches for v in b.views], per_individual=RSM_PHOTOS_PER_INDIVIDUAL, by_view=True)
    buffer = io.BytesIO()
    plot_rsm(rsm, title=f"RSM of {len(rsm.identities)} photos", by_view=True).savefig(buffer, format="png", dpi=100)
    return Response(buffer.getvalue(), media_type="image/png")
