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
from dataclasses import dataclass

import numpy as np

from reid.errors import ImageDecodeError
from reid.gallery import Gallery
from reid.inference import Embedder
from reid.metrics import NEW_TURTLE, Ranking, insert_new_turtle
from service.errors import rejected_image
from service.photos import Photo, read_photo
from service.schemas import IdentifyResponse, Prediction, ThresholdSource
from service.settings import Settings
from service.store import IndividualMode, ModelRecord, Store, StoredImage

log = logging.getLogger(__name__)


def model_record(embedder: Embedder, checkpoint: str) -> ModelRecord:
    return ModelRecord(embedder.fingerprint, embedder.name, embedder.dim, checkpoint)


@dataclass(frozen=True)
class Threshold:
    """The new_turtle threshold in force and where it came from (None: no threshold, never new_turtle)."""

    value: float | None
    source: ThresholdSource | None


class Engine:
    """Everything a request needs: enrol, delete and identify photos against the gallery."""

    def __init__(self, settings: Settings, embedder: Embedder, store: Store, gallery: Gallery) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = store
        self.gallery = gallery
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
        if requested is not None:
            return Threshold(requested, "request")
        if self.embedder.threshold is not None:
            return Threshold(self.embedder.threshold, "checkpoint")
        if self.settings.default_threshold is not None:
            return Threshold(self.settings.default_threshold, "settings")
        return Threshold(None, None)

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
        k = k or self.settings.default_k
        used = self.threshold(threshold)
        rankings = self.gallery.search(self.embedder.embed(list(images)), k)
        return [self._answer(ranking, used, k) for ranking in rankings]

    def _answer(self, ranking: Ranking, threshold: Threshold, k: int) -> IdentifyResponse:
        scores = dict(ranking)
        labels = insert_new_turtle(ranking, threshold.value, k)
        predictions = [Prediction(individual_id=label,
                                  score=threshold.value if label == NEW_TURTLE else scores[label])
                       for label in labels]
        return IdentifyResponse(predictions=predictions, new_turtle=bool(labels) and labels[0] == NEW_TURTLE,
                                threshold=threshold.value, threshold_source=threshold.source,
                                model=self.embedder.fingerprint)
