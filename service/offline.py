"""Work on a store without the server: enrol a whole dataset, and re-embed every photo with a new model.

Both write through :class:`service.store.Store`, with the same durability and idempotency as the API. Both claim the
data folder (:class:`service.folder_lock.FolderLock`): while a server runs on it they refuse, naming the server,
because its index would not see what they write; enrol through the server's API instead, or stop it first.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pandas as pd
from tqdm.auto import tqdm

from reid.data.records import read_dataset
from reid.errors import DatasetError, ImageDecodeError
from reid.imageio import configured_max_pixels
from reid.inference import Embedder
from reid.onnx_backend import Backend
from service.engine import model_record
from service.errors import StoreError
from service.folder_lock import FolderLock
from service.identifiers import check_individual_id
from service.photos import Photo, read_photo, within_pixel_budget
from service.store import DATABASE_NAME, Store

log = logging.getLogger(__name__)

T = TypeVar("T")


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[start:start + size] for start in range(0, len(items), size)]


@dataclass(frozen=True)
class EnrollReport:
    added: int
    already_enrolled: int
    skipped: int
    #: individuals of the dataset that are in the store now (one whose every photo was skipped is not)
    individuals: int


def enroll_dataset(checkpoint: Path, data_dir: Path, dataset: Path, batch_size: int = 32,
                   progress: bool = True, backend: Backend = "torch") -> EnrollReport:
    """Enrol every photo of a dataset (any layout :func:`reid.data.records.read_dataset` reads) into the store.

    Re-running it adds only what is new. Unreadable photos are skipped with a warning, so one bad file does not
    stop a long enrolment; identities that cannot be individual ids stop it before any work is done. When the
    checkpoint was calibrated for verification, each photo's local features are stored with it, so a verifying
    server does not have to extract them at start-up.
    """
    records = read_dataset(dataset, check_images=False)  # a bad photo is skipped below, not a reason to stop
    identities = sorted(records["identity"].unique())
    invalid = []
    for identity in identities:
        try:
            check_individual_id(identity)
        except ValueError as error:
            invalid.append(str(error))
    if invalid:
        raise DatasetError(f"{dataset}: {len(invalid)} identities cannot be individual ids, e.g. {invalid[:3]}")
    with FolderLock(data_dir, "reid enroll"):
        embedder = Embedder.from_checkpoint(checkpoint, backend=backend)
        store = Store(data_dir)
        store.bind_model(model_record(embedder, str(Path(checkpoint).expanduser().resolve())))
        store.sweep()
        return _enroll_records(store, embedder, records, batch_size, progress)


def _new_photos(rows: pd.DataFrame, known: set[str], max_pixels: int, tally: Counter[str]) -> Iterator[Photo]:
    """The photos of ``rows`` not stored yet (``known`` SHA-256s), decoded one by one as they are drawn; ``tally``
    counts those ``stored before``, those ``skipped`` as unreadable (each named in a warning) and those ``read``."""
    for path, view in zip(rows["path"], rows["view"]):
        try:
            data = Path(path).read_bytes()
            if hashlib.sha256(data).hexdigest() in known:
                tally["stored before"] += 1
                continue
            photo = read_photo(data, max_pixels, view, name=str(path))
        except (OSError, ImageDecodeError) as error:  # either message names the file
            log.warning("skipping a photo: %s", error)
            tally["skipped"] += 1
            continue
        tally["read"] += 1
        yield photo


def _enroll_records(store: Store, embedder: Embedder, records: pd.DataFrame, batch_size: int,
                    progress: bool) -> EnrollReport:
    """Enrol every record's photo, skipping those already stored and those that cannot be read."""
    extraction = embedder.verification.fusion.extraction if embedder.verification is not None else None
    max_pixels = configured_max_pixels()  # $REID_MAX_PIXELS, as read_dataset's header pass applied it
    added = already = skipped = individuals = 0
    with tqdm(total=len(records), unit="photo", desc="enrolling", disable=not progress) as bar:
        for identity, rows in records.groupby("identity", sort=True):
            tally: Counter[str] = Counter()
            for chunk in within_pixel_budget(_new_photos(rows, store.photo_hashes(identity), max_pixels, tally),
                                             lambda photo: photo.width * photo.height, max_pixels, batch_size):
                vectors = embedder.embed([photo.pixels for photo in chunk], batch_size=batch_size)
                features = None if extraction is None else [extraction.extract(photo.pixels) for photo in chunk]
                stored = store.add_images(identity, chunk, vectors, embedder.fingerprint, "any", features, extraction)
                fresh = sum(not image.already_enrolled for image in stored)
                added, already = added + fresh, already + len(stored) - fresh
            already += tally["stored before"]
            skipped += tally["skipped"]
            individuals += bool(tally["read"] or tally["stored before"])
            bar.update(len(rows))
    return EnrollReport(added, already, skipped, individuals)


def reindex(checkpoint: Path, data_dir: Path, batch_size: int = 32, progress: bool = True) -> int:
    """Re-embed every stored photo with ``checkpoint``'s model and make it the store's model; returns the count.

    New embeddings are written beside the old ones and committed in batches; only the final switch makes them
    current, in one transaction. A crash before it leaves the store working with the old model, and running
    ``reindex`` again resumes where it stopped.
    """
    if not (Path(data_dir).expanduser() / DATABASE_NAME).is_file():
        raise StoreError(f"{data_dir} holds no service store ({DATABASE_NAME}); nothing to re-index")
    with FolderLock(data_dir, "reid reindex"):
        embedder = Embedder.from_checkpoint(checkpoint)
        store = Store(data_dir)
        model = model_record(embedder, str(Path(checkpoint).expanduser().resolve()))
        todo = store.images_without_embedding(model.fingerprint)
        for chunk in tqdm(_chunks(todo, batch_size), unit="batch", desc="re-embedding", disable=not progress):
            vectors = embedder.embed([store.pixels(image) for image in chunk], batch_size=batch_size)
            store.put_embeddings(model.fingerprint, [image.image_id for image in chunk], vectors)
        if not store.switch_model(model):  # only when a writer ignored the folder lock
            raise StoreError(f"photos were added to {data_dir} while it was re-indexed; run reid reindex again")
    return len(todo)
