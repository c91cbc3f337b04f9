"""The embedder, the store and the search index, kept in agreement.

The store (SQLite) is the source of truth; the FAISS gallery is rebuilt from it at start and then follows every
committed change. Writes hold one lock from the database commit until the gallery has the same change, so an
enrolment and a deletion that race each other can never leave a deleted photo searchable (or a stored one missing).
Identification never takes that lock: embedding, the slow part, runs concurrently in as many requests as arrive,
and the gallery search itself is thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from reid.errors import ImageDecodeError
from reid.gallery import Gallery
from reid.identify import Answer, Identifier, Threshold, resolve_threshold
from reid.identify import Prediction as RankedPrediction
from reid.inference import Embedder
from service.errors import NotFoundError, rejected_image
from service.photos import Photo, read_photo
from service.schemas import Evidence, IdentifyResponse, Prediction
from service.settings import Settings
from service.store import IndividualMode, ModelRecord, Store, StoredImage

log = logging.getLogger(__name__)


def model_record(embedder: Embedder, checkpoint: str) -> ModelRecord:
    return ModelRecord(embedder.fingerprint, embedder.name, embedder.dim, checkpoint)


class Engine:
    """Everything a request needs: enrol, delete and identify photos against the gallery."""

    def __init__(self, settings: Settings, embedder: Embedder, store: Store, gallery: Gallery) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = store
        self.gallery = gallery
        self.identifier = Identifier(gallery)
        self._write_lock = threading.Lock()

    @classmethod
    def open(cls, settings: Settings) -> "Engine":
        """Load the model, open the store (refusing one embedded by another model) and index every stored photo."""
        embedder = Embedder.from_checkpoint(settings.checkpoint)
        store = Store(settings.data_dir)
        store.bind_model(model_record(embedder, str(settings.checkpoint.expanduser().resolve())))
        gallery = Gallery(embedder.dim, kind=settings.index)
        for batch in store.embeddings(embedder.fingerprint):
            gallery.add(batch.image_ids, batch.vectors, batch.identities)
        log.info("model %s (fingerprint %s), %d photos of %d individuals in a %s index on %s", embedder.name,
                 embedder.fingerprint, len(gallery), len(gallery.identities()), gallery.kind, gallery.device)
        return cls(settings, embedder, store, gallery)

    def threshold(self, requested: float | None) -> Threshold:
        """The request's threshold, else the checkpoint's calibrated one, else the configured default."""
        return resolve_threshold(requested, self.embedder.threshold, self.embedder.threshold_origin,
                                 self.settings.default_threshold)

    def photo(self, data: bytes, field: str, filename: str | None, view: str = "") -> Photo:
        """Decode one upload, turning a decode failure into a 4xx naming ``field`` and the file."""
        try:
            return read_photo(data, self.settings.max_pixels, view)
        except ImageDecodeError as error:
            raise rejected_image(error, field, filename) from error

    def enroll(self, individual_id: str, photos: Sequence[Photo], mode: IndividualMode) -> list[StoredImage]:
        """Embed and store photos of one individual, then make the new ones searchable; all or nothing."""
        vectors = self.embedder.embed([photo.pixels for photo in photos])
        with self._write_lock:
            stored = self.store.add_images(individual_id, photos, vectors, self.embedder.fingerprint, mode)
            new = [i for i, image in enumerate(stored) if not image.already_enrolled]
            self.gallery.add([stored[i].image_id for i in new], vectors[new], [individual_id] * len(new))
        return stored

    def delete_individual(self, individual_id: str) -> None:
        with self._write_lock:
            self.gallery.remove(self.store.delete_individual(individual_id))

    def delete_image(self, individual_id: str, image_id: int) -> None:
        with self._write_lock:
            self.store.delete_image(individual_id, image_id)
            self.gallery.remove([image_id])

    def identify(self, images: Sequence[np.ndarray], k: int | None, threshold: float | None) -> list[IdentifyResponse]:
        """Rank enrolled individuals for each image, with new_turtle placed by the threshold in force."""
        answers = self.identifier.answer(self.embedder.embed(list(images)), k or self.settings.default_k,
                                         self.threshold(threshold))
        return [self._response(answer) for answer in answers]

    def _response(self, answer: Answer) -> IdentifyResponse:
        predictions = [Prediction(individual_id=p.individual, score=p.score, evidence=self._evidence(p))
                       for p in answer.predictions]
        threshold = answer.threshold
        return IdentifyResponse(predictions=predictions, new_turtle=answer.new_turtle, threshold=threshold.value,
                                threshold_source=threshold.source, threshold_origin=threshold.origin,
                                model=self.embedder.fingerprint)

    def _evidence(self, prediction: RankedPrediction) -> Evidence | None:
        """The enrolled photo that matched best; None for new_turtle, or when it was deleted since the search."""
        if prediction.image_id is None:
            return None
        try:
            image = self.store.image(prediction.individual, prediction.image_id)
        except NotFoundError:
            return None
        return Evidence(image_id=image.image_id, view=image.view, similarity=prediction.similarity,
                        inliers=prediction.inliers, url=f"/individuals/{image.individual_id}/images/{image.image_id}")
