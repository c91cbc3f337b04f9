"""The embedder, the store and the search index, kept in agreement.

The store (SQLite) is the source of truth; the FAISS gallery is rebuilt from it at start and then follows every
committed change. Writes hold one lock from the database commit until the gallery has the same change, so an
enrolment and a deletion that race each other can never leave a deleted photo searchable (or a stored one missing).
Identification never takes that lock: embedding and local-feature matching run concurrently in as many requests
as arrive, and a deletion never waits for them (only the gallery's own lock, held for each search, about a
millisecond, orders searches and gallery changes).

With verification on, every searchable photo's local features are in memory (read from the store at start, added
at enrolment before the photo becomes searchable). A query that a deletion overtakes (one of its candidate photos
deleted between its search and the end of its matching) matches that photo as nothing and leaves it out of its
answer, as if it had been searched a moment later; only a deletion in the instant between ranking and reply can
still be named, then without evidence. Holding deletions back for verifications instead would hold every query that
arrives meanwhile back too, for as long as the slowest verification in flight (a fallback's first extractions take
seconds).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from reid.errors import FeatureError, ImageDecodeError, ReIDError
from reid.explain import Explanation, explain_match
from reid.gallery import Gallery, train_for_batches
from reid.identify import Answer, Identifier, Threshold, threshold_in_force, verification_in_force
from reid.identify import Prediction as RankedPrediction
from reid.inference import Embedder
from reid.local_features import Extraction, LocalFeatures
from reid.verification import FallbackFeatures, Fusion, LocalVerifier, Verification, fusion_note, inliers_counted
from service.errors import NotFoundError, rejected_image
from service.folder_lock import FolderLock
from service.photos import Photo, read_photo, within_pixel_budget
from service.schemas import Evidence, IdentifyResponse, Prediction, image_url
from service.settings import Settings
from service.store import IndividualMode, ModelRecord, Store, StoredImage

log = logging.getLogger(__name__)

#: Photos whose missing local features are extracted and committed together at start-up (a restart resumes there).
_FEATURE_BATCH = 32

#: What a photo deleted while a query was verifying it matches: nothing (its size no longer matters).
_DELETED = LocalFeatures.empty((1, 1))


def model_record(embedder: Embedder, checkpoint: str) -> ModelRecord:
    return ModelRecord(embedder.fingerprint, embedder.name, embedder.dim, checkpoint)


def _cached_features(store: Store, image_ids: list[int], extraction: Extraction) -> dict[int, LocalFeatures]:
    """Local features of every gallery photo (``image_ids``), read from the store; photos lacking them (enrolled
    while verification was off, in a store older than the features table, extracted at another size or by another
    method, or unreadable) get them extracted now and stored, committed batch by batch."""
    features: dict[int, LocalFeatures] = {}
    for batch in store.local_features(extraction):
        for image_id, blob in batch:
            try:
                features[image_id] = LocalFeatures.from_bytes(blob)
            except FeatureError as error:
                log.warning("local features of image %d will be extracted again: %s", image_id, error)
    missing = [image_id for image_id in image_ids if image_id not in features]
    if not missing:
        return features
    log.info("extracting the local features of %d photos stored without them (%s; ~0.4 s a photo on a CPU)",
             len(missing), extraction.describe())
    started = time.monotonic()
    for start in range(0, len(missing), _FEATURE_BATCH):
        images, extracted = [], []
        for image in store.images(missing[start:start + _FEATURE_BATCH]).values():
            try:
                pixels = store.pixels(image)
            except ReIDError as error:
                # one lost file (a restore that missed it) must not keep down the service it could be deleted through
                log.warning("image %d of individual %r is served without local features, so it matches nothing "
                            "locally, until its file is restored or it is deleted (DELETE /individuals/%s/images/%d):"
                            " %s", image.image_id, image.individual_id, image.individual_id, image.image_id,
                            error.__cause__ or error)
                features[image.image_id] = _DELETED
                continue
            images.append(image)
            extracted.append(extraction.extract(pixels))
        store.put_local_features(extraction, [image.image_id for image in images], extracted)
        features.update((image.image_id, item) for image, item in zip(images, extracted))
        log.info("local features: %d/%d photos done (%.0f s)", min(start + _FEATURE_BATCH, len(missing)), len(missing),
                 time.monotonic() - started)
    return features


class Engine:
    """Everything a request needs: enrol, delete, identify and explain photos against the gallery."""

    def __init__(self, settings: Settings, embedder: Embedder, store: Store, gallery: Gallery,
                 verification: Verification | None = None, features: dict[int, LocalFeatures] | None = None,
                 folder_lock: FolderLock | None = None) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = store
        self.gallery = gallery
        #: the fusion and threshold identify verifies with; None when verification is off
        self.verification = verification
        self._features: dict[int, LocalFeatures] = features if features is not None else {}
        self._write_lock = threading.Lock()
        self._folder_lock = folder_lock

    @classmethod
    def open(cls, settings: Settings) -> Engine:
        """Load the model, claim the data folder (refusing one another process serves or writes to), open the store
        (refusing one embedded by another model), sweep what a crash left in it, index every stored photo and, with
        verification on, load (or extract once) every photo's local features.

        A checkpoint that cannot serve is refused before the data folder is touched."""
        embedder = Embedder.from_checkpoint(settings.checkpoint, backend=settings.backend)
        verification = verification_in_force(settings.verify, embedder, settings.checkpoint)
        folder_lock = FolderLock(settings.data_dir, "reid serve", f"http://{settings.host}:{settings.port}")
        try:
            return cls._open(settings, embedder, verification, folder_lock)
        except BaseException:
            folder_lock.release()
            raise

    @classmethod
    def _open(cls, settings: Settings, embedder: Embedder, verification: Verification | None,
              folder_lock: FolderLock) -> Engine:
        store = Store(settings.data_dir)
        store.bind_model(model_record(embedder, str(settings.checkpoint.expanduser().resolve())))
        store.sweep()
        gallery = Gallery(embedder.dim, kind=settings.index)
        train_for_batches(gallery, store.counts()[1],
                          (batch.vectors for batch in store.embeddings(embedder.fingerprint)))
        image_ids: list[int] = []
        for batch in store.embeddings(embedder.fingerprint):
            gallery.add(batch.image_ids, batch.vectors, batch.identities)
            image_ids += batch.image_ids
        log.info("model %s (fingerprint %s), %d photos of %d individuals in a %s index on %s", embedder.name,
                 embedder.fingerprint, len(gallery), len(gallery.identities()), gallery.kind, gallery.device)
        features: dict[int, LocalFeatures] = {}
        if verification is None:
            log.info("verification off: answers rank by embedding similarity alone%s",
                     " (the checkpoint has verification; --verify or REID_VERIFY=true turns it on)"
                     if embedder.verification is not None else "")
        else:
            features = _cached_features(store, image_ids, verification.fusion.extraction)
            log.info("verification on: the %d most similar photos of each query are checked with local features "
                     "(%d photos' features in memory)%s", verification.fusion.candidates, len(features),
                     fusion_note(verification.fusion))
        return cls(settings, embedder, store, gallery, verification, features, folder_lock)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Give the data folder up, for another server or an offline enrolment."""
        if self._folder_lock is not None:
            self._folder_lock.release()

    @property
    def verifying(self) -> bool:
        return self.verification is not None

    def threshold(self, requested: float | None) -> Threshold:
        """The request's threshold, else the checkpoint's calibrated one (its verification threshold when verifying:
        fused scores are probabilities), else the configured default."""
        return threshold_in_force(requested, self.embedder, self.verification, self.settings.default_threshold)

    def decode_upload(self, data: bytes, field: str, filename: str | None, view: str = "") -> Photo:
        """Decode one upload, turning a decode failure into a 4xx naming ``field`` and the file."""
        try:
            return read_photo(data, self.settings.max_pixels, view, name=f"{field} ({filename or 'unnamed file'})")
        except ImageDecodeError as error:
            raise rejected_image(error, field) from error

    def _local_features(self, images: Sequence[np.ndarray]) -> list[LocalFeatures]:
        return [self.verification.fusion.extraction.extract(image) for image in images]

    def enroll(self, individual_id: str, photos: Iterable[Photo], mode: IndividualMode) -> list[StoredImage]:
        """Embed (and with verification on, extract local features of) photos of one individual, store them, then
        make the new ones searchable; all or nothing. ``photos`` may be decoded as they are drawn: they are embedded
        :func:`within_pixel_budget` of ``max_pixels``, so a request holds about that many decoded pixels (and one
        photo more) at a time, however many photos it sends."""
        kept: list[Photo] = []
        chunks: list[np.ndarray] = []
        features: list[LocalFeatures] | None = [] if self.verifying else None
        for run in within_pixel_budget(photos, lambda photo: photo.width * photo.height, self.settings.max_pixels):
            pixels = [photo.pixels for photo in run]
            chunks.append(self.embedder.embed(pixels))
            if features is not None:
                features += self._local_features(pixels)
            kept += [photo.without_pixels() for photo in run]
            del pixels  # with the run, emptied when the next is drawn: one run's pixels alive at a time
        vectors = np.concatenate(chunks) if chunks else np.zeros((0, self.embedder.dim), np.float32)
        extraction = self.verification.fusion.extraction if self.verifying else None
        with self._write_lock:
            stored = self.store.add_images(individual_id, kept, vectors, self.embedder.fingerprint, mode, features,
                                           extraction)
            new = [i for i, image in enumerate(stored) if not image.already_enrolled]
            if features is not None:  # before the gallery: a searchable photo always has its features
                self._features.update((stored[i].image_id, features[i]) for i in new)
            self.gallery.add([stored[i].image_id for i in new], vectors[new], [individual_id] * len(new))
        return stored

    def _forget(self, image_ids: Sequence[int]) -> None:
        """Take deleted photos out of the gallery, then out of the feature cache (see :meth:`_gallery_features`)."""
        self.gallery.remove(image_ids)
        for image_id in image_ids:
            self._features.pop(image_id, None)

    def delete_individual(self, individual_id: str) -> None:
        with self._write_lock:
            self._forget(self.store.delete_individual(individual_id))

    def delete_image(self, individual_id: str, image_id: int) -> None:
        with self._write_lock:
            self.store.delete_image(individual_id, image_id)
            self._forget([image_id])

    def identify_photos(self, photos: Iterable[tuple[int, Photo]], k: int | None,
                        threshold: float | None) -> Iterator[tuple[int, IdentifyResponse]]:
        """:meth:`identify` for photos decoded as they are drawn, each with its position in the request, answered a
        run :func:`within_pixel_budget` of ``max_pixels`` at a time (see :meth:`enroll`)."""
        for run in within_pixel_budget(photos, lambda item: item[1].width * item[1].height, self.settings.max_pixels):
            answers = self.identify([photo.pixels for _, photo in run], k, threshold)
            yield from ((position, answer) for (position, _), answer in zip(run, answers))

    def identify(self, images: Sequence[np.ndarray], k: int | None, threshold: float | None) -> list[IdentifyResponse]:
        """Rank enrolled individuals for each image, with new_turtle placed by the threshold in force; with
        verification on, the most similar photos are re-scored by their local-feature matches (the query's
        features are extracted once, the gallery's were extracted at enrolment)."""
        vectors = self.embedder.embed(list(images))
        verifier = None
        if self.verification is not None:
            fusion = self.verification.fusion
            fallback = None
            if fusion.fallback is not None:
                query_features = functools.cache(lambda q: fusion.fallback.extraction.extract(images[q]))
                fallback = FallbackFeatures(self._fallback_features, query_features)
            verifier = LocalVerifier(fusion, self._gallery_features, self._local_features(images), fallback=fallback)
        answers = Identifier(self.gallery, verifier).answer(vectors, k or self.settings.default_k,
                                                            self.threshold(threshold))
        return [self._response(answer) for answer in answers]

    def _gallery_features(self, image_id: int) -> LocalFeatures:
        """A gallery photo's local features; nothing to match when it was deleted after the query found it."""
        features = self._features.get(image_id)
        return _DELETED if features is None else features

    def _fallback_features(self, image_id: int) -> LocalFeatures:
        """A gallery photo's features for verification's fallback: read from the store, else extracted the first time
        a query needs them (~1.5 s a photo on a CPU) and stored. Enrolment stays as fast as without the fallback, and
        these features (~1 MB a photo) are never all held in memory. A photo whose file can no longer be read, or
        that was deleted after the query found it, matches nothing, so the query is still answered."""
        extraction = self.verification.fusion.fallback.extraction
        blob = self.store.local_features_of(extraction, image_id)
        if blob is not None:
            try:
                return LocalFeatures.from_bytes(blob)
            except FeatureError as error:
                log.warning("fallback features of image %d will be extracted again: %s", image_id, error)
        image = self.store.images([image_id]).get(image_id)
        if image is None:
            return _DELETED
        try:
            features = extraction.extract(self.store.pixels(image))
        except ReIDError as error:
            log.warning("image %d cannot be matched by the fallback: %s", image_id, error)
            return LocalFeatures.empty((image.width, image.height))
        self.store.put_local_features(extraction, [image_id], [features])
        return features

    def explain(self, query: Photo, query_name: str, individual_id: str, image_id: int) -> Explanation:
        """The query drawn beside an enrolled photo with their verified local-feature matches.

        Raises:
            NotFoundError: no such individual, or it has no such image (``field`` says which), or its file is gone
                or damaged.
        """
        image = self.store.image(individual_id, image_id)
        label = f"{individual_id} image {image_id}" + (f" ({image.view})" if image.view else "")
        fallback = self.verification.fusion.fallback if self.verification else None
        return explain_match(self.embedder, query.pixels, self.stored_pixels(image), (f"query: {query_name}", label),
                             self._features.get(image_id),
                             None if fallback is None else lambda: self._fallback_features(image_id))

    def stored_file(self, image: StoredImage) -> Path:
        """The file of an enrolled photo. Raises NotFoundError when it is gone from the data folder."""
        path = self.store.path_of(image)
        if not path.is_file():
            raise NotFoundError(f"the file of image {image.image_id} is missing from the data folder", "image_id")
        return path

    def stored_pixels(self, image: StoredImage) -> np.ndarray:
        """An enrolled photo's pixels. Raises NotFoundError when its file is gone, or was damaged on disk since it
        was enrolled (a 404 naming the image, not a 500: the photo the client asked for cannot be shown)."""
        self.stored_file(image)
        try:
            return self.store.pixels(image)
        except ReIDError as error:
            raise NotFoundError(str(error), "image_id") from error

    def _response(self, answer: Answer) -> IdentifyResponse:
        shown = self.store.images([p.image_id for p in answer.predictions if p.image_id is not None])
        fusion = None if self.verification is None else self.verification.fusion
        predictions = [Prediction(individual_id=p.individual, score=p.score, evidence=self._evidence(p, shown, fusion))
                       for p in answer.predictions]
        threshold = answer.threshold
        return IdentifyResponse(predictions=predictions, new_turtle=answer.new_turtle, threshold=threshold.value,
                                runner_up_weight=threshold.runner_up_weight,
                                threshold_source=threshold.source, threshold_origin=threshold.origin,
                                model=self.embedder.fingerprint)

    @staticmethod
    def _evidence(prediction: RankedPrediction, shown: dict[int, StoredImage], fusion: Fusion | None
                  ) -> Evidence | None:
        """The enrolled photo that matched best; None for new_turtle, or when it was deleted since the search.
        ``fusion``: what scored the answer (None: no verification)."""
        image = shown.get(prediction.image_id) if prediction.image_id is not None else None
        if image is None:
            return None
        return Evidence(image_id=image.image_id, view=image.view, similarity=prediction.similarity,
                        inliers=prediction.inliers,
                        inliers_counted=inliers_counted(prediction.inliers, fusion),
                        url=image_url(image.individual_id, image.image_id))
