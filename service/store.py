"""The service's source of truth: a SQLite database (WAL) of individuals, photos and embeddings, plus the photo files.

Durability rules, so that a ``kill -9`` at any moment loses nothing that was acknowledged:

* every write is one ``BEGIN IMMEDIATE`` transaction, committed (``synchronous=FULL``) before the caller answers;
* a photo file is written atomically (temp + fsync + rename) *inside* that transaction, before the row that points
  at it is committed, so a committed row always has its file; a crash in between leaves at most an orphan file;
* files are removed only after the rows that referenced them are committed away, under the write lock, and only
  when no other row (another individual enrolled with the same photo) still uses them.

Embeddings are kept per model fingerprint, and ``meta`` names the model whose embeddings are current. That makes a
re-index atomic: new vectors are written beside the old ones, then one transaction switches the fingerprint and drops
the old ones; a crash before the switch leaves the old embeddings current (and the new ones reusable).

Local features (keypoints and descriptors for verification) are extracted once, when a photo is enrolled, and stored
in the same transaction as the photo, so no query recomputes them and no crash leaves a photo without them. They do
not depend on the model, so a re-index keeps them; they do depend on how they were extracted (the size and the
method, reid.local_features.Extraction), which is stored with them: a photo has one row per extraction, so the
features of verification's fallback (simulated tilts, stored the first time a query needs them) sit beside the
plain ones.

Every write opens its own short-lived connection, so the store is safe to use from any thread or process. The
small reads a request makes (evidence photos, listings, counts) go through one read-only connection per thread, kept
open: opening a connection costs ~0.3 ms, a visible share of identifying a small photo, whose answer reads its
evidence photos. The bulk reads of start-up and re-indexing open their own, like writes. In autocommit mode each
read statement sees every transaction committed before it, so a kept connection never answers from an old snapshot.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np

from reid.errors import ImageDecodeError, ReIDError
from reid.fileio import write_atomically
from reid.imageio import decode_image
from reid.local_features import Extraction, LocalFeatures
from service.errors import ConflictError, ModelMismatchError, NotFoundError, StorageFullError, StoreError
from service.photos import Photo

log = logging.getLogger(__name__)

DATABASE_NAME = "reid.sqlite3"
PHOTOS_DIR = "photos"
#: 1: individuals, images, embeddings, meta. 2: adds local_features. 3: adds local_features.method (the features
#: of a version 2 store are "rootsift", not equalised). 4: local_features keyed by (image, size, method), not by the
#: image alone. Opening an older store upgrades it in place (new tables are created empty, rows are kept); a newer
#: store is refused rather than half understood.
SCHEMA_VERSION = 4
#: Stored photos were checked against the pixel limit (and, since it exists, the smallest side) when they were
#: uploaded; decoding them again must not fail on a stricter limit than the one the server ran with.
_NO_PIXEL_LIMIT = 2**62

#: The columns of local_features (schema version 4), also used to rebuild an older store's table.
_LOCAL_FEATURES_COLUMNS = """    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    max_side INTEGER NOT NULL,             -- long side (pixels) the photo was extracted at
    features BLOB NOT NULL,                -- reid.local_features.LocalFeatures.to_bytes()
    method TEXT NOT NULL DEFAULT 'rootsift',  -- reid.local_features.Extraction.method
    PRIMARY KEY (image_id, max_side, method)"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS individuals (id TEXT PRIMARY KEY, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: a deleted photo's id is never given to another one
    individual_id TEXT NOT NULL REFERENCES individuals(id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL,
    file TEXT NOT NULL,                    -- relative to the data folder, derived from sha256 only
    media_type TEXT NOT NULL,
    view TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    created TEXT NOT NULL,
    UNIQUE (individual_id, sha256)
);
CREATE INDEX IF NOT EXISTS images_by_sha256 ON images(sha256);
CREATE TABLE IF NOT EXISTS embeddings (
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    model TEXT NOT NULL,                   -- fingerprint of the encoder weights that made the vector
    vector BLOB NOT NULL,                  -- float32, L2-normalised
    PRIMARY KEY (image_id, model)
);
CREATE TABLE IF NOT EXISTS local_features (
{_LOCAL_FEATURES_COLUMNS}
);
"""

#: Photos lacking an embedding by the model given as the one parameter.
_WITHOUT_EMBEDDING = ("FROM images im WHERE NOT EXISTS "
                      "(SELECT 1 FROM embeddings e WHERE e.image_id = im.id AND e.model = ?)")

#: How a write treats the individual: must be new (POST /individuals), must exist (adding photos), or either
#: (offline enrolment of a dataset, which may be re-run).
IndividualMode = Literal["new", "existing", "any"]


@dataclass(frozen=True)
class ModelRecord:
    """Which model made the stored embeddings."""

    fingerprint: str
    name: str
    dim: int
    checkpoint: str

    def describe(self) -> str:
        return f"checkpoint {self.checkpoint} (model {self.name}, fingerprint {self.fingerprint})"


@dataclass(frozen=True)
class StoredImage:
    image_id: int
    individual_id: str
    sha256: str
    file: str
    media_type: str
    view: str
    width: int
    height: int
    created: str
    already_enrolled: bool = False


@dataclass(frozen=True)
class IndividualRecord:
    individual_id: str
    created: str
    image_count: int
    #: the individual's first photo, shown beside its name; None when it has none left
    cover_image_id: int | None = None


@dataclass(frozen=True)
class EmbeddingBatch:
    """Embeddings of one model for some photos, ready for :meth:`reid.gallery.Gallery.add`."""

    image_ids: list[int]
    identities: list[str]
    views: list[str]
    vectors: np.ndarray


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _image(row: sqlite3.Row, already_enrolled: bool = False) -> StoredImage:
    return StoredImage(row["id"], row["individual_id"], row["sha256"], row["file"], row["media_type"], row["view"],
                       row["width"], row["height"], row["created"], already_enrolled)


class Store:
    """Individuals, photos, embeddings and local features under one data folder (``reid.sqlite3`` + ``photos/``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()
        self.database = self.root / DATABASE_NAME
        self._readers = threading.local()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._refuse_photos_without_database()
            with self._connect() as connection:
                mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    log.warning("SQLite refused WAL mode for %s (got %s); writes will block reads", self.database,
                                mode)
                self._create_or_upgrade(connection)
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot open the service's store in {self.root}: {error}") from error

    def _refuse_photos_without_database(self) -> None:
        """A folder whose photos/ holds files but whose database is missing or empty is a restore gone wrong (the
        database left behind, or renamed), never a new store: opened as one, the start-up sweep would delete every
        photo as unreferenced."""
        if self.database.is_file() and self.database.stat().st_size > 0:
            return
        photos = self.root / PHOTOS_DIR
        # stored photos only: an interrupted write's temporary file, or a .DS_Store, starts with a dot
        files = sum(1 for path in photos.rglob("*") if path.is_file() and not path.name.startswith(".")
                    ) if photos.is_dir() else 0
        if files:
            raise StoreError(f"{photos} holds {files} photo file{'s' if files > 1 else ''} but {self.database} is "
                             f"{'empty' if self.database.is_file() else 'missing'}: put the store's database back "
                             f"(e.g. from a backup) and start again; to start an empty store here, move {photos} away")

    def _create_or_upgrade(self, connection: sqlite3.Connection) -> None:
        """Create the tables a store of :data:`SCHEMA_VERSION` has. Every version so far only adds tables or columns
        with defaults, so an older store is upgraded by creating the missing ones (``IF NOT EXISTS`` and the column
        check make this safe to repeat)."""
        has_meta = connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        row = connection.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() if has_meta else None
        version = SCHEMA_VERSION if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(f"the store in {self.root} has schema version {version}, newer than the version "
                             f"{SCHEMA_VERSION} this turtle-reid reads; upgrade turtle-reid")
        connection.executescript(_SCHEMA)
        columns = {row[1] for row in connection.execute("PRAGMA table_info(local_features)")}
        if "method" not in columns:  # a version 2 store: its features were extracted without equalisation
            connection.execute("ALTER TABLE local_features ADD COLUMN method TEXT NOT NULL DEFAULT 'rootsift'")
        keys = [row[1] for row in connection.execute("PRAGMA table_info(local_features)") if row[5]]
        if keys == ["image_id"]:  # versions 2 and 3 kept one set of features a photo: rebuilt, rows kept
            connection.executescript(f"""
                BEGIN IMMEDIATE;
                ALTER TABLE local_features RENAME TO local_features_old;
                CREATE TABLE local_features (
                {_LOCAL_FEATURES_COLUMNS}
                );
                INSERT INTO local_features (image_id, max_side, features, method)
                    SELECT image_id, max_side, features, method FROM local_features_old;
                DROP TABLE local_features_old;
                COMMIT;""")
        connection.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        if version < SCHEMA_VERSION:
            log.info("store %s upgraded from schema version %d to %d", self.root, version, SCHEMA_VERSION)

    def _open(self) -> sqlite3.Connection:
        """A connection in autocommit mode (transactions are explicit) with rows readable by column name."""
        connection = sqlite3.connect(self.database, timeout=60, isolation_level=None)
        connection.row_factory = sqlite3.Row
        return connection

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = self._open()
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA synchronous = FULL")  # a commit survives power loss, not only a process kill
        try:
            yield connection
        finally:
            connection.close()

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection, opened on its first read and kept (see the module docstring)."""
        connection = getattr(self._readers, "connection", None)
        if connection is None:
            connection = self._open()
            connection.execute("PRAGMA query_only = ON")
            self._readers.connection = connection
        return connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from the start, so read-then-write steps cannot race. A
        full disk, met writing a photo file or the database, is a :class:`StorageFullError` naming the folder."""
        try:
            with self._connect() as connection:
                connection.execute("BEGIN IMMEDIATE")
                try:
                    yield connection
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
                connection.execute("COMMIT")
        except (OSError, sqlite3.OperationalError) as error:
            # SQLite says SQLITE_FULL (13) in sqlite_errorcode from Python 3.11, and "database or disk is full" always
            if not (getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
                    or getattr(error, "sqlite_errorcode", None) == 13 or "disk is full" in str(error)):
                raise
            raise StorageFullError(f"the disk of the data folder {self.root} is full ({error}); the request changed "
                                   "nothing: free space on it (even a deletion needs a little, for its journal)"
                                   ) from error

    def path_of(self, image: StoredImage) -> Path:
        return self.root / image.file

    def pixels(self, image: StoredImage) -> np.ndarray:
        """The stored photo decoded to RGB, for work done on it after enrolment (re-embedding, local features).

        Raises:
            ReIDError: the file is missing or no longer decodes; the message says how to get rid of the photo.
        """
        try:
            return decode_image(self.path_of(image), max_pixels=_NO_PIXEL_LIMIT, min_side=1)
        except ImageDecodeError as error:
            raise ReIDError(f"cannot read image {image.image_id} of individual {image.individual_id!r} from "
                            f"{self.path_of(image)}: {error}; delete it "
                            f"(DELETE /individuals/{image.individual_id}/images/{image.image_id}) and try again"
                            ) from error

    # -- model -------------------------------------------------------------------------------------------------

    @staticmethod
    def _model(connection: sqlite3.Connection) -> ModelRecord | None:
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        if "model_fingerprint" not in meta:
            return None
        return ModelRecord(meta["model_fingerprint"], meta["model_name"], int(meta["model_dim"]),
                           meta["model_checkpoint"])

    @staticmethod
    def _set_model(connection: sqlite3.Connection, model: ModelRecord) -> None:
        connection.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [
            ("model_fingerprint", model.fingerprint), ("model_name", model.name), ("model_dim", str(model.dim)),
            ("model_checkpoint", model.checkpoint)])

    def bind_model(self, model: ModelRecord) -> None:
        """Make ``model`` the store's model, refusing when photos embedded by another model are stored.

        An empty store takes any model; a store whose photos were embedded by a model with other weights must be
        re-indexed first (``reid reindex``), otherwise queries would compare vectors from two different spaces.
        """
        with self._transaction() as connection:
            current = self._model(connection)
            if current is not None and current.fingerprint != model.fingerprint:
                photos = connection.execute("SELECT COUNT(*) FROM images").fetchone()[0]
                if photos:
                    raise ModelMismatchError(
                        f"the {photos} photos in {self.root} were embedded by {current.describe()}, but "
                        f"{model.describe()} is loaded; start with the old checkpoint, or re-embed them with "
                        f"`reid reindex --checkpoint {model.checkpoint} --data-dir {self.root}`")
                log.info("empty store %s switches from %s to %s", self.root, current.describe(), model.describe())
            self._set_model(connection, model)

    @staticmethod
    def _require_model(connection: sqlite3.Connection, fingerprint: str) -> None:
        current = Store._model(connection)
        if current is None or current.fingerprint != fingerprint:
            raise ModelMismatchError(
                f"the store was re-indexed with {current.describe() if current else 'no model'} after this service "
                f"loaded model {fingerprint}; restart the service with the new checkpoint")

    # -- writes ------------------------------------------------------------------------------------------------

    def add_images(self, individual_id: str, photos: Sequence[Photo], vectors: np.ndarray, fingerprint: str,
                   mode: IndividualMode, features: Sequence[LocalFeatures] | None = None,
                   extraction: Extraction | None = None) -> list[StoredImage]:
        """Store photos, their embeddings and (when given) their local features extracted by ``extraction``, for one
        individual, all or nothing, and return them in order.

        A photo already enrolled for this individual (same SHA-256) is returned with ``already_enrolled=True``
        instead of being stored twice, which makes every enrolment safe to retry.
        """
        if len(photos) != len(vectors):
            raise ValueError(f"{len(photos)} photos but {len(vectors)} embeddings")
        if features is not None and (len(features) != len(photos) or extraction is None):
            raise ValueError(f"{len(photos)} photos but {len(features)} local features (extracted by {extraction})")
        stored: list[StoredImage] = []
        written: dict[str, str] = {}  # photo files this call wrote: removed again if it fails (a full disk)
        try:
            with self._transaction() as connection:
                self._require_model(connection, fingerprint)
                exists = connection.execute("SELECT 1 FROM individuals WHERE id = ?", (individual_id,)).fetchone()
                if exists and mode == "new":
                    raise ConflictError(f"individual {individual_id!r} already exists", "individual_id")
                if not exists and mode == "existing":
                    raise NotFoundError(f"individual {individual_id!r} does not exist", "individual_id")
                if not exists:
                    connection.execute("INSERT INTO individuals VALUES (?, ?)", (individual_id, _now()))
                for i, (photo, vector) in enumerate(zip(photos, vectors)):
                    row = connection.execute("SELECT * FROM images WHERE individual_id = ? AND sha256 = ?",
                                             (individual_id, photo.sha256)).fetchone()
                    if row is None:
                        row = self._insert_image(connection, individual_id, photo, vector, fingerprint, written)
                        if features is not None:
                            connection.execute("INSERT INTO local_features VALUES (?, ?, ?, ?)",
                                               (row["id"], extraction.max_side, features[i].to_bytes(),
                                                extraction.method))
                        stored.append(_image(row))
                    else:
                        stored.append(_image(row, already_enrolled=True))
        except BaseException:
            try:
                self._remove_unused_files(written)
            except (OSError, sqlite3.Error, StorageFullError) as error:
                log.warning("photo files of a failed enrolment are left until the next start: %s", error)
            raise
        return stored

    def _insert_image(self, connection: sqlite3.Connection, individual_id: str, photo: Photo, vector: np.ndarray,
                      fingerprint: str, written: dict[str, str]) -> sqlite3.Row:
        file = f"{PHOTOS_DIR}/{photo.sha256[:2]}/{photo.sha256}{photo.extension}"
        if not (self.root / file).is_file():  # content-addressed: an existing file already holds these bytes
            written[photo.sha256] = file
            write_atomically(self.root / file, photo.data)
        cursor = connection.execute(
            "INSERT INTO images (individual_id, sha256, file, media_type, view, width, height, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (individual_id, photo.sha256, file, photo.media_type, photo.view, photo.width, photo.height, _now()))
        connection.execute("INSERT INTO embeddings VALUES (?, ?, ?)",
                           (cursor.lastrowid, fingerprint, np.asarray(vector, dtype=np.float32).tobytes()))
        return connection.execute("SELECT * FROM images WHERE id = ?", (cursor.lastrowid,)).fetchone()

    def delete_individual(self, individual_id: str) -> list[int]:
        """Delete an individual with all its photos; returns the deleted image ids."""
        with self._transaction() as connection:
            rows = connection.execute("SELECT id, sha256, file FROM images WHERE individual_id = ?",
                                      (individual_id,)).fetchall()
            if connection.execute("DELETE FROM individuals WHERE id = ?", (individual_id,)).rowcount == 0:
                raise NotFoundError(f"individual {individual_id!r} does not exist", "individual_id")
        self._remove_unused_files({row["sha256"]: row["file"] for row in rows})
        return [row["id"] for row in rows]

    def delete_image(self, individual_id: str, image_id: int) -> None:
        """Delete one photo of an individual (the individual stays, even with no photo left)."""
        with self._transaction() as connection:
            image = self._find_image(connection, individual_id, image_id)
            connection.execute("DELETE FROM images WHERE id = ?", (image_id,))
        self._remove_unused_files({image.sha256: image.file})

    def _remove_unused_files(self, files: dict[str, str]) -> None:
        """Unlink photo files no row uses any more; under the write lock, so no enrolment can be reusing them."""
        with self._transaction() as connection:
            for sha256, file in files.items():
                if connection.execute("SELECT 1 FROM images WHERE sha256 = ?", (sha256,)).fetchone() is None:
                    self._unlink(self.root / file)

    @staticmethod
    def _unlink(path: Path) -> bool:
        """Remove a photo file no row refers to. A file that cannot be removed (a read-only folder, a full disk's
        journal) is logged and left: the rows are already gone, so the deletion stands, and a file no row refers to
        is only space, swept at the next start."""
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            log.warning("could not remove %s, which no photo refers to any more (%s); it is removed at the next "
                        "start if the folder allows it", path, error)
            return False
        return True

    def sweep(self) -> int:
        """Remove what a crash can leave in ``photos/``: temporary files of interrupted writes, and photo files no row
        refers to (written, but the transaction that was to point at them never committed); returns the count.

        Only the folder's owner (:class:`service.folder_lock.FolderLock`) may sweep: another writer's file, written
        before its row is committed, would look unreferenced.
        """
        with self._connect() as connection:
            referenced = {row[0] for row in connection.execute("SELECT DISTINCT file FROM images")}
        removed = 0
        for path in sorted((self.root / PHOTOS_DIR).rglob("*")):
            if (path.is_file() and path.relative_to(self.root).as_posix() not in referenced
                    and self._unlink(path)):
                removed += 1
        if removed:
            log.info("removed %d files a crash left in %s (temporary or unreferenced photo files)", removed,
                     self.root / PHOTOS_DIR)
        return removed

    # -- reads -------------------------------------------------------------------------------------------------

    @staticmethod
    def _find_image(connection: sqlite3.Connection, individual_id: str, image_id: int) -> StoredImage:
        row = connection.execute("SELECT * FROM images WHERE id = ? AND individual_id = ?",
                                 (image_id, individual_id)).fetchone()
        if row is not None:
            return _image(row)
        if connection.execute("SELECT 1 FROM individuals WHERE id = ?", (individual_id,)).fetchone() is None:
            raise NotFoundError(f"individual {individual_id!r} does not exist", "individual_id")
        raise NotFoundError(f"individual {individual_id!r} has no image {image_id}", "image_id")

    def images(self, image_ids: Sequence[int]) -> dict[int, StoredImage]:
        """The stored photos among ``image_ids``, by id, in one query (ids deleted meanwhile are left out)."""
        if not image_ids:
            return {}
        rows = self._reader().execute(f"SELECT * FROM images WHERE id IN ({', '.join('?' * len(image_ids))})",
                                      [int(image_id) for image_id in image_ids]).fetchall()
        return {row["id"]: _image(row) for row in rows}

    def image(self, individual_id: str, image_id: int) -> StoredImage:
        return self._find_image(self._reader(), individual_id, image_id)

    def individual(self, individual_id: str) -> tuple[IndividualRecord, list[StoredImage]]:
        connection = self._reader()
        row = connection.execute("SELECT * FROM individuals WHERE id = ?", (individual_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"individual {individual_id!r} does not exist", "individual_id")
        images = [_image(r) for r in connection.execute(
            "SELECT * FROM images WHERE individual_id = ? ORDER BY id", (individual_id,))]
        return IndividualRecord(row["id"], row["created"], len(images), images[0].image_id if images else None), images

    def individuals(self, limit: int, offset: int, contains: str = "") -> tuple[int, list[IndividualRecord]]:
        """One page of individuals in id order whose id contains ``contains`` (any case), and how many match."""
        pattern = "%" + contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        connection = self._reader()
        total = connection.execute("SELECT COUNT(*) FROM individuals WHERE id LIKE ? ESCAPE '\\'",
                                   (pattern,)).fetchone()[0]
        rows = connection.execute(
            "SELECT i.id, i.created, COUNT(im.id) AS images, MIN(im.id) AS cover FROM individuals i "
            "LEFT JOIN images im ON im.individual_id = i.id WHERE i.id LIKE ? ESCAPE '\\' "
            "GROUP BY i.id ORDER BY i.id LIMIT ? OFFSET ?", (pattern, limit, offset)).fetchall()
        return total, [IndividualRecord(r["id"], r["created"], r["images"], r["cover"]) for r in rows]

    def photo_hashes(self, individual_id: str) -> set[str]:
        """SHA-256 of every photo enrolled for an individual (lets a re-run skip them before embedding)."""
        return {row[0] for row in self._reader().execute("SELECT sha256 FROM images WHERE individual_id = ?",
                                                         (individual_id,))}

    def other_owners(self, individual_id: str, sha256: str) -> list[str]:
        """The other individuals this exact photo is enrolled for, in id order: one photo under two individuals is
        allowed (a service cannot know which filing is wrong) but is usually a mistake, so enrolments report it."""
        rows = self._reader().execute("SELECT DISTINCT individual_id FROM images WHERE sha256 = ? AND individual_id != ? "
                                      "ORDER BY individual_id", (sha256, individual_id))
        return [row[0] for row in rows]

    def missing_individuals(self, individual_ids: Sequence[str]) -> list[str]:
        connection = self._reader()
        return [i for i in individual_ids
                if connection.execute("SELECT 1 FROM individuals WHERE id = ?", (i,)).fetchone() is None]

    def counts(self) -> tuple[int, int]:
        """(individuals, photos)."""
        connection = self._reader()
        return (connection.execute("SELECT COUNT(*) FROM individuals").fetchone()[0],
                connection.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def embeddings(self, fingerprint: str, individual_ids: Sequence[str] | None = None,
                   batch_size: int = 10_000) -> Iterator[EmbeddingBatch]:
        """Stored embeddings of one model, in image id order, in batches (all photos, or those of some individuals)."""
        query = ("SELECT im.id, im.individual_id, im.view, e.vector FROM images im "
                 "JOIN embeddings e ON e.image_id = im.id AND e.model = ?")
        parameters: list[object] = [fingerprint]
        if individual_ids is not None:
            query += f" WHERE im.individual_id IN ({', '.join('?' * len(individual_ids))})"
            parameters += list(individual_ids)
        with self._connect() as connection:
            model = self._model(connection)
            size = 4 * model.dim if model is not None and model.fingerprint == fingerprint else None
            cursor = connection.execute(query + " ORDER BY im.id", parameters)
            while rows := cursor.fetchmany(batch_size):
                damaged = next((r for r in rows if size is not None and len(r["vector"]) != size), None)
                if damaged is not None:
                    raise StoreError(f"the embedding of image {damaged['id']} of individual "
                                     f"{damaged['individual_id']!r} in {self.database} is damaged "
                                     f"({len(damaged['vector'])} bytes where the model's {model.dim} dimensions take "
                                     f"{size}): restore the data folder from a backup")
                yield EmbeddingBatch([r["id"] for r in rows], [r["individual_id"] for r in rows],
                                     [r["view"] for r in rows],
                                     np.stack([np.frombuffer(r["vector"], dtype=np.float32) for r in rows]))

    # -- local features ----------------------------------------------------------------------------------------

    def local_features(self, extraction: Extraction, batch_size: int = 1000) -> Iterator[list[tuple[int, bytes]]]:
        """Stored local-feature blobs extracted by ``extraction``, as ``(image_id, blob)`` in image id order, in
        batches."""
        with self._connect() as connection:
            cursor = connection.execute("SELECT image_id, features FROM local_features WHERE max_side = ? AND "
                                        "method = ? ORDER BY image_id", (extraction.max_side, extraction.method))
            while rows := cursor.fetchmany(batch_size):
                yield [(row[0], bytes(row[1])) for row in rows]

    def local_features_of(self, extraction: Extraction, image_id: int) -> bytes | None:
        """One photo's local-feature blob extracted by ``extraction``; None when it has none."""
        row = self._reader().execute("SELECT features FROM local_features WHERE image_id = ? AND max_side = ? AND "
                                     "method = ?", (int(image_id), extraction.max_side, extraction.method)).fetchone()
        return None if row is None else bytes(row[0])

    def put_local_features(self, extraction: Extraction, image_ids: Sequence[int],
                           features: Sequence[LocalFeatures]) -> None:
        """Store (or replace) photos' local features; photos deleted meanwhile are skipped."""
        with self._transaction() as connection:
            connection.executemany(
                "INSERT OR REPLACE INTO local_features SELECT id, ?, ?, ? FROM images WHERE id = ?",
                [(extraction.max_side, item.to_bytes(), extraction.method, int(image_id))
                 for image_id, item in zip(image_ids, features)])

    # -- re-indexing -------------------------------------------------------------------------------------------

    def images_without_embedding(self, fingerprint: str) -> list[StoredImage]:
        """Photos that have no embedding by model ``fingerprint`` yet (what a re-index still has to do)."""
        with self._connect() as connection:
            return [_image(r) for r in connection.execute(f"SELECT * {_WITHOUT_EMBEDDING} ORDER BY im.id",
                                                          (fingerprint,))]

    def put_embeddings(self, fingerprint: str, image_ids: Sequence[int], vectors: np.ndarray) -> None:
        """Store embeddings by a model that is not (yet) current; photos deleted meanwhile are skipped."""
        with self._transaction() as connection:
            connection.executemany(
                "INSERT OR REPLACE INTO embeddings SELECT id, ?, ? FROM images WHERE id = ?",
                [(fingerprint, np.asarray(vector, dtype=np.float32).tobytes(), int(image_id))
                 for image_id, vector in zip(image_ids, vectors)])

    def switch_model(self, model: ModelRecord) -> bool:
        """Make ``model`` current and drop other models' embeddings, in one transaction.

        Returns False (changing nothing) when a photo still lacks an embedding by ``model``, e.g. one enrolled
        while the re-index ran; the caller embeds those and tries again.
        """
        with self._transaction() as connection:
            if connection.execute(f"SELECT COUNT(*) {_WITHOUT_EMBEDDING}", (model.fingerprint,)).fetchone()[0]:
                return False
            self._set_model(connection, model)
            connection.execute("DELETE FROM embeddings WHERE model != ?", (model.fingerprint,))
            return True
