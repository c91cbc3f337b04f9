"""Reliability harness shared by ``tests/service/test_reliability.py`` and ``bench/service_reliability.py``: a mixed
load of concurrent clients, an index-versus-store comparison, and rounds of ``kill -9`` during enrolment.

One trap shapes every photo sent here: :func:`tests.service.helpers.numbered` copies of one photo differ by a
corner pixel, which gives them distinct bytes (and SHA-256) but, to an encoder, the same embedding (cosine
1 - 1e-7 between copies, within float noise). Two individuals holding copies of one photo therefore tie, and
"identify ranks the photo's individual first" would fail by chance. So each photo sent is a numbered copy of one
*content* (:class:`PhotoPool`: a dataset photo turned by one of the 8 rotations/flips and with one of the 6
orders of its colour channels), and no content is ever held by two individuals at once. Contents are told apart:
the largest cosine between two of the 1,536 contents of the synthetic 8 x 4 dataset under the tests' random-weight
encoder is 0.998, against 1.0 for a photo and itself.
"""

from __future__ import annotations

import itertools
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import numpy as np
import pandas as pd
from PIL import Image

from service.store import DATABASE_NAME
from tests.service.helpers import add, encode, enroll, identify, numbered

#: The request kinds of the mixed load, in report order.
KINDS = ("identify", "enroll", "add", "delete")
#: Share of each kind among the load's requests: mostly identify, as in the field.
_WEIGHTS = (0.55, 0.15, 0.15, 0.15)
#: Bound on any single request; a request slower than this is a failure, not a wait.
REQUEST_TIMEOUT_S = 60.0
#: Photos per /identify/batch request when checking that enrolments are searchable (the service takes up to 64).
_BATCH = 32
#: What :func:`reid.fileio.atomic_target` names its temporary files: ``.<name>.<random>.tmp``.
TEMPORARY_FILES = ".*.tmp"


def _transforms() -> list[Callable[[np.ndarray], np.ndarray]]:
    """The 48 rotations, flips and channel orders that make distinct contents of one photo."""

    def transform(turns: int, flip: bool, channels: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
        def apply(pixels: np.ndarray) -> np.ndarray:
            turned = np.rot90(pixels, turns)
            return np.ascontiguousarray((turned[:, ::-1] if flip else turned)[..., list(channels)])
        return apply

    return [transform(turns, flip, channels) for channels in itertools.permutations(range(3))
            for turns in range(4) for flip in (False, True)]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class PhotoPool:
    """Distinct photo contents made from a dataset's photos (see the module docstring): content ``i`` is photo
    ``i % len(records)`` under transform ``i // len(records)``, so the first ``len(records)`` are the photos as they
    are. Thread-safe: it only reads."""

    _TRANSFORMS = _transforms()

    def __init__(self, records: pd.DataFrame) -> None:
        self._photos = [_pixels(Path(path)) for path in records["path"]]

    def __len__(self) -> int:
        return len(self._photos) * len(self._TRANSFORMS)

    def photo(self, content: int, number: int) -> bytes:
        """Copy ``number`` of content ``content``: distinct bytes for every (content, number mod 65536)."""
        pixels = self._TRANSFORMS[content // len(self._photos)](self._photos[content % len(self._photos)])
        return numbered(encode(Image.fromarray(pixels), "PNG"), number)


def _client(server_url: str, api_key: str | None) -> httpx.Client:
    return httpx.Client(base_url=server_url, timeout=REQUEST_TIMEOUT_S,
                        headers={"X-API-Key": api_key} if api_key else {})


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- mixed load ----------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What :func:`run_load` saw. ``misses`` are identifies of a photo that had to be found and was not; ``unexpected``
    are 4xx answers, which the load never provokes (each client writes only to its own individuals)."""

    seconds: float
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    latencies: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    server_errors: list[str] = field(default_factory=list)
    connection_errors: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)
    #: identifies whose photo had to be found (acknowledged before they started, no deletion asked before they ended)
    checked_identifies: int = 0

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def requests_per_second(self) -> float:
        return self.total / self.seconds

    def percentile(self, q: float, kind: str | None = None) -> float:
        """Latency percentile in seconds, of one kind or (``None``) of every request."""
        values = self.latencies[kind] if kind else [v for kind_values in self.latencies.values() for v in kind_values]
        return _percentile(values, q)

    def failures(self) -> list[str]:
        """Everything that should not have happened, for an assertion message."""
        return self.server_errors + self.connection_errors + self.unexpected + self.misses


@dataclass
class _Photo:
    """An enrolled photo as the load knows it; ``delete_requested`` is set *before* a deletion of it (or of its
    individual) is sent, since from then on a search may legitimately miss it."""

    data: bytes
    individual: str
    image_id: int
    delete_requested: float | None = None


class _Gallery:
    """The photos every client has had acknowledged, shared so that clients identify each other's photos."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: dict[int, _Photo] = {}  # image id → photo, while no deletion of it was asked

    def add(self, photo: _Photo) -> None:
        with self.lock:
            self.live[photo.image_id] = photo

    def pick(self, rng: random.Random) -> _Photo | None:
        with self.lock:
            return self.live[rng.choice(list(self.live))] if self.live else None

    def request_deletion(self, photos: Sequence[_Photo]) -> None:
        with self.lock:
            now = time.monotonic()
            for photo in photos:
                photo.delete_requested = now
                self.live.pop(photo.image_id, None)


class _LoadClient:
    """One client thread: its own HTTP connection, individuals and contents, and a seeded choice of requests."""

    def __init__(self, index: int, server_url: str, api_key: str | None, pool: PhotoPool, contents: list[int],
                 gallery: _Gallery, report: LoadReport, report_lock: threading.Lock, seed: int) -> None:
        self.server_url, self.api_key = server_url, api_key
        self.pool, self.gallery, self.report, self.report_lock = pool, gallery, report, report_lock
        self.rng = random.Random(f"{seed}-{index}")
        self.free = list(contents)  # contents no individual of this client holds
        self.individuals: dict[str, list[_Photo]] = {}  # this client's live individuals → their photos not deleted
        self.contents_of: dict[str, list[int]] = {}  # → the contents bound to it until its deletion is acknowledged
        self.names = (f"load-{seed}-{index}-{n}" for n in itertools.count())
        self.copies = itertools.count()  # copy numbers: contents are this client's alone

    def run(self, deadline: float) -> None:
        with _client(self.server_url, self.api_key) as client:
            while time.monotonic() < deadline:
                kind = self.rng.choices(KINDS, _WEIGHTS)[0]
                if kind == "enroll" and not self.free:
                    kind = "delete"
                if kind in ("add", "delete") and not self.individuals:
                    kind = "enroll" if self.free else "identify"
                getattr(self, kind)(client)

    def _send(self, kind: str, what: str, request: Callable[[], httpx.Response],
              expected: int) -> httpx.Response | None:
        """Send one request and account for it; the response when it has the expected status, else None."""
        started = time.monotonic()
        try:
            response = request()
        except httpx.TransportError as error:
            with self.report_lock:
                self.report.requests[kind] += 1
                self.report.connection_errors.append(f"{what}: {type(error).__name__}: {error}")
            return None
        with self.report_lock:
            self.report.requests[kind] += 1
            self.report.latencies[kind].append(time.monotonic() - started)
            if response.status_code == expected:
                return response
            problems = self.report.server_errors if response.status_code >= 500 else self.report.unexpected
            problems.append(f"{what}: {response.status_code} {response.text[:300]}")
        return None

    def _register(self, name: str, response: httpx.Response, uploads: list[bytes]) -> None:
        photos = [_Photo(data, name, image["image_id"])
                  for data, image in zip(uploads, response.json()["images"], strict=True)]
        self.individuals[name] += photos
        for photo in photos:
            self.gallery.add(photo)

    def identify(self, client: httpx.Client) -> None:
        photo = self.gallery.pick(self.rng)
        if photo is None:  # nothing enrolled yet: a photo as it is in the dataset, whose answer is not checked
            content = self.rng.randrange(len(self.pool))
            self._send("identify", "identify of a dataset photo",
                       lambda: identify(client, self.pool.photo(content, 0)), 200)
            return
        response = self._send("identify", f"identify of image {photo.image_id} of {photo.individual}",
                              lambda: identify(client, photo.data), 200)
        finished = time.monotonic()
        with self.gallery.lock:
            deleted_meanwhile = photo.delete_requested is not None and photo.delete_requested <= finished
        if response is None or deleted_meanwhile:
            return
        predictions = response.json()["predictions"]
        first = predictions[0]["individual_id"] if predictions else None
        with self.report_lock:
            self.report.checked_identifies += 1
            if first != photo.individual:
                self.report.misses.append(f"identify of image {photo.image_id} of {photo.individual} ranked "
                                          f"{first} first: {predictions[:2]}")

    def enroll(self, client: httpx.Client) -> None:
        name = next(self.names)
        content = self.free.pop(self.rng.randrange(len(self.free)))
        self.contents_of[name] = [content]  # bound even if the answer is lost: the individual may exist
        uploads = [self.pool.photo(content, next(self.copies)) for _ in range(self.rng.randint(1, 2))]
        response = self._send("enroll", f"enrol of {name}", lambda: enroll(client, name, uploads), 201)
        if response is not None:
            self.individuals[name] = []
            self._register(name, response, uploads)

    def add(self, client: httpx.Client) -> None:
        name = self.rng.choice(list(self.individuals))
        if self.free and self.rng.random() < 0.5:
            content = self.free.pop(self.rng.randrange(len(self.free)))
            self.contents_of[name].append(content)
        else:
            content = self.rng.choice(self.contents_of[name])
        uploads = [self.pool.photo(content, next(self.copies))]
        response = self._send("add", f"add to {name}", lambda: add(client, name, uploads), 201)
        if response is not None:
            self._register(name, response, uploads)

    def delete(self, client: httpx.Client) -> None:
        name = self.rng.choice(list(self.individuals))
        photos = self.individuals[name]
        if photos and self.rng.random() < 0.5:
            photo = photos.pop(self.rng.randrange(len(photos)))
            self.gallery.request_deletion([photo])
            self._send("delete", f"delete of image {photo.image_id} of {name}",
                       lambda: client.delete(f"/individuals/{name}/images/{photo.image_id}"), 204)
            return
        del self.individuals[name]
        self.gallery.request_deletion(photos)
        if self._send("delete", f"delete of {name}", lambda: client.delete(f"/individuals/{name}"), 204) is not None:
            self.free += self.contents_of.pop(name)


def run_load(server_url: str, api_key: str | None, records: pd.DataFrame, clients: int = 8, seconds: float = 8.0,
             seed: int = 0) -> LoadReport:
    """``clients`` threads, each with its own connection, send a seeded mix of identify, enrol, add-photo and
    delete requests for ``seconds``, and the report says how each kind fared.

    Each client writes only to individuals it enrolled (names ``load-<seed>-<client>-<n>``: run once per seed on a
    server), so every write must succeed; identifies pick a photo any client had acknowledged, and count a miss when
    its individual is not ranked first although no deletion of the photo or its individual was requested before the
    identify's answer arrived (a deletion sent during the identify may or may not be seen by it).
    """
    pool = PhotoPool(records)
    if len(pool) < 2 * clients:
        raise ValueError(f"{len(pool)} photo contents are too few for {clients} clients")
    gallery, report, report_lock = _Gallery(), LoadReport(seconds=0.0), threading.Lock()
    workers = [_LoadClient(i, server_url, api_key, pool, list(range(i, len(pool), clients)), gallery, report,
                           report_lock, seed) for i in range(clients)]
    started = time.monotonic()
    with ThreadPoolExecutor(clients) as executor:
        for done in [executor.submit(worker.run, started + seconds) for worker in workers]:
            done.result()  # a bug in the harness surfaces here instead of vanishing with its thread
    report.seconds = time.monotonic() - started
    return report


# -- index versus store --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexAndStore:
    """/health's view (search index size, photos) beside the database's rows; they must all be equal."""

    gallery_size: int
    photos: int
    image_rows: int
    embedding_rows: int

    @property
    def agree(self) -> bool:
        return self.gallery_size == self.photos == self.image_rows == self.embedding_rows


def index_equals_store(server_url: str, api_key: str | None, data_dir: Path) -> IndexAndStore:
    """The numbers that must agree after any sequence of writes; assert ``.agree`` and show the whole value."""
    with _client(server_url, api_key) as client:
        response = client.get("/health")
    response.raise_for_status()
    health = response.json()
    with closing(sqlite3.connect(data_dir / DATABASE_NAME)) as database:
        (images,) = database.execute("SELECT COUNT(*) FROM images").fetchone()
        (embeddings,) = database.execute("SELECT COUNT(*) FROM embeddings").fetchone()
    return IndexAndStore(health["gallery_size"], health["photos"], images, embeddings)


# -- kill -9 during enrolment --------------------------------------------------------------------------------------


class RunningServer(Protocol):
    """What the crash rounds need of a server (``tests.service.conftest.Server`` has it)."""

    url: str

    def kill(self) -> None: ...

    def stop(self) -> None: ...


#: ``start(checkpoint, data_dir)`` → a server answering /health (e.g. the ``start_server`` fixture).
StartServer = Callable[[Path, Path], RunningServer]


@dataclass
class CrashRound:
    number: int
    killed_after_s: float
    #: enrolments sent and acknowledged in this round, before the kill
    sent: int
    acknowledged: int
    #: from the kill until the restarted server answered /health
    restart_s: float
    problems: list[str]


@dataclass
class CrashReport:
    rounds: list[CrashRound]

    @property
    def passed(self) -> int:
        return sum(not r.problems for r in self.rounds)

    @property
    def acknowledged(self) -> int:
        return sum(r.acknowledged for r in self.rounds)

    def problems(self) -> list[str]:
        return [f"round {r.number}: {problem}" for r in self.rounds for problem in r.problems]


@dataclass(frozen=True)
class _Enrolment:
    upload: bytes
    url: str  # of the stored photo, as the acknowledgement gave it


class _Stream:
    """Enrols ``crash-<seed>-<n>`` (one photo of content n) one after another until the server is gone."""

    def __init__(self, server_url: str, api_key: str | None, pool: PhotoPool, seed: int, first: int) -> None:
        self.server_url, self.api_key, self.pool, self.seed = server_url, api_key, pool, seed
        self.numbers = range(first, len(pool))
        self.sent: list[str] = []
        self.acknowledged: dict[str, _Enrolment] = {}
        self.problems: list[str] = []
        self.started = threading.Event()

    def run(self) -> None:
        with _client(self.server_url, self.api_key) as client:
            for number in self.numbers:
                name, upload = f"crash-{self.seed}-{number}", self.pool.photo(number, number)
                self.sent.append(name)
                self.started.set()
                try:
                    response = enroll(client, name, [upload])
                except httpx.TransportError:
                    return  # killed
                if response.status_code != 201:
                    self.problems.append(f"enrol of {name} answered {response.status_code}: {response.text[:300]}")
                    return
                self.acknowledged[name] = _Enrolment(upload, response.json()["images"][0]["url"])
        self.started.set()


def _first_ranked(client: httpx.Client, uploads: dict[str, bytes]) -> dict[str, str]:
    """The individual ranked first for each photo (keyed by a name sent as its filename), or why there is none;
    through /identify/batch, which embeds the photos together: one request per :data:`_BATCH` photos."""
    firsts = {}
    names = list(uploads)
    for start in range(0, len(names), _BATCH):
        chunk = names[start:start + _BATCH]
        response = client.post("/identify/batch", files=[("files", (name, uploads[name])) for name in chunk])
        if response.status_code != 200:
            firsts.update(dict.fromkeys(chunk, f"none: /identify/batch answered {response.status_code}"))
            continue
        for name, item in zip(chunk, response.json()["results"], strict=True):
            if item["result"] is None:
                firsts[name] = f"none: {item['error']}"
            else:
                predictions = item["result"]["predictions"]
                firsts[name] = predictions[0]["individual_id"] if predictions else "none: no prediction"
    return firsts


def _listed(client: httpx.Client) -> dict[str, int] | str:
    """Every individual the server lists, with its photo count, or why the listing failed."""
    listed: dict[str, int] = {}
    while True:
        page = client.get("/individuals", params={"limit": 1000, "offset": len(listed)})
        if page.status_code != 200:
            return f"GET /individuals answered {page.status_code}: {page.text[:200]}"
        items = page.json()["items"]
        listed.update((item["individual_id"], item["image_count"]) for item in items)
        if not items or len(listed) >= page.json()["total"]:
            return listed


def _check_after_restart(server_url: str, api_key: str | None, data_dir: Path,
                         acknowledged: dict[str, _Enrolment], sent: set[str]) -> list[str]:
    """Every acknowledged enrolment is there with its one photo, byte for byte, and found first; nothing unsent
    exists; the index matches the store; no temporary file is left."""
    with _client(server_url, api_key) as client:
        listed = _listed(client)
        if isinstance(listed, str):
            return [listed]
        problems = [f"acknowledged {name} is lost" if name not in listed else f"{name} has {listed[name]} photos"
                    for name in acknowledged if listed.get(name) != 1]
        for name, enrolment in acknowledged.items():
            stored = client.get(enrolment.url)
            if stored.status_code != 200 or stored.content != enrolment.upload:
                problems.append(f"{name}'s photo at {enrolment.url} is not the one uploaded: {stored.status_code}, "
                                f"{len(stored.content)} bytes instead of {len(enrolment.upload)}")
        uploads = {name: enrolment.upload for name, enrolment in acknowledged.items()}
        for name, first in _first_ranked(client, uploads).items():
            if first != name:
                problems.append(f"identify of {name}'s photo ranked {first} first")
    never_sent = sorted(set(listed) - sent)
    if never_sent:
        problems.append(f"individuals that were never sent exist: {never_sent[:10]}")
    counts = index_equals_store(server_url, api_key, data_dir)
    if not counts.agree:
        problems.append(f"index and store disagree: {counts}")
    leftovers = sorted(str(path.relative_to(data_dir)) for path in data_dir.rglob(TEMPORARY_FILES))
    if leftovers:
        problems.append(f"temporary files left in the data folder: {leftovers[:10]}")
    return problems


def crash_rounds(start: StartServer, checkpoint: Path, data_dir: Path, records: pd.DataFrame, rounds: int,
                 seed: int = 0, api_key: str | None = None) -> CrashReport:
    """``rounds`` times: stream enrolments into a server, ``kill -9`` it at a seeded random moment 0.2-2 s into the
    stream, restart it on the same data folder and check everything acknowledged so far (all rounds) survived.

    Each round's restarted server is the next round's server; the last one is stopped before returning.
    """
    rng = random.Random(seed)
    pool = PhotoPool(records)
    acknowledged: dict[str, _Enrolment] = {}
    sent: set[str] = set()
    report = CrashReport([])
    server = start(checkpoint, data_dir)
    try:
        for number in range(1, rounds + 1):
            stream = _Stream(server.url, api_key, pool, seed, first=len(sent))  # names and contents never reused
            writer = threading.Thread(target=stream.run)
            writer.start()
            stream.started.wait(timeout=REQUEST_TIMEOUT_S)
            delay = rng.uniform(0.2, 2.0)
            time.sleep(delay)
            server.kill()
            killed = time.monotonic()
            writer.join(timeout=REQUEST_TIMEOUT_S)
            if writer.is_alive():
                raise RuntimeError(f"round {number}: the enrolment stream did not stop after the kill")
            sent.update(stream.sent)
            acknowledged.update(stream.acknowledged)
            server = start(checkpoint, data_dir)
            restart_s = time.monotonic() - killed
            problems = stream.problems + _check_after_restart(server.url, api_key, data_dir, acknowledged, sent)
            report.rounds.append(CrashRound(number, delay, len(stream.sent), len(stream.acknowledged), restart_s,
                                            problems))
    finally:
        server.stop()
    return report
