"""A FAISS-backed gallery of photo embeddings and the individuals they belong to.

Embeddings are L2-normalised, so inner product is cosine similarity. A CPU index is always the master copy:
FAISS GPU indexes cannot ``remove_ids``, so when a GPU is present a GPU mirror serves searches and is rebuilt
from the master after a removal.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_invlist

from reid.metrics import Individual, Ranking, rank_individuals

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw", "ivf"]
#: Search breadth of HNSW, chosen with bench/gallery_search.py (see BENCHMARKS.md): FAISS's default (efSearch 16)
#: misses the exact top answer most of the time.
HNSW_EF_SEARCH = 256
#: Neighbours per HNSW node: FAISS's usual 32, which the bench's recall at HNSW_EF_SEARCH was measured with.
HNSW_NEIGHBOURS = 32
#: IVF geometry and search breadth, chosen with bench/gallery_search.py on 1,000,000 structured 512-d photos (see
#: BENCHMARKS.md, "Gallery search by index kind": recall@5 of individuals >= 0.98 against exact search, a query
#: 83-90 times faster than exact search on one core):
#:
#: - about ``IVF_LISTS_PER_ROOT`` * sqrt(n) lists, FAISS's usual lower bound, so the centroids a search compares
#:   and the photos a list holds both grow as sqrt(n);
#: - at least ``IVF_MIN_TRAIN_PER_LIST`` training photos a list (FAISS warns below 39) and at most ``ivf_lists``
#:   lists: k-means time grows with the square of the lists (4096 took 3.5 min on 2 cores);
#: - k-means sees ``IVF_TRAIN_PER_LIST`` photos a list, not FAISS's 256: on 200k photos 40 and 64 a list gave the
#:   same recall, and 256 a list would take ~20 min to train 4096 lists on 2 cores;
#: - a search scans about ``IVF_SCAN_PHOTOS`` photos of the gallery as it was at training (nprobe = that over the
#:   mean list size, at least ``IVF_MIN_NPROBE``): the cost of a search is fixed rather than the share of lists it
#:   probes, since finer lists split related individuals' photos over more lists (200k photos, nprobe 32: recall
#:   0.980 with 1024 lists, 0.966 with 2048). The cost grows with the gallery until it is re-trained (see
#:   ``IVF_RETRAIN_GROWTH``). At 1M photos (3200 lists) recall levels off near 0.985 (nprobe 40: 0.982, 60: 0.983,
#:   128: 0.986 at twice the time): the misses are unrelated photos (cosine < 0.26) that rank 2nd-5th when a query
#:   has a single true match, and such photos lie in any list.
IVF_LISTS_PER_ROOT = 4
IVF_MIN_TRAIN_PER_LIST = 39
IVF_TRAIN_PER_LIST = 40
IVF_MAX_LISTS = 4096
IVF_SCAN_PHOTOS = 12_000
IVF_MIN_NPROBE = 16
#: An IVF gallery is re-trained when it has grown to this many times the vectors it was trained on, so one
#: started empty does not keep the handful of lists its first enrolment could support.
IVF_RETRAIN_GROWTH = 4


def gpu_available() -> bool:
    """True when the installed FAISS build sees a GPU (never probe with StandardGpuResources: it aborts on CPU)."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(get_num_gpus and get_num_gpus() > 0)


class Gallery:
    """Photo embeddings keyed by integer id, each belonging to an individual; searchable by individual.

    Thread-safe: searches, adds and removals each hold one lock, so they run one at a time (a FAISS search uses
    every core itself, and takes about a millisecond, BENCHMARKS.md).

    Args:
        dim: embedding dimension.
        kind: ``flat`` (exact), ``hnsw`` (approximate, no training, but slow to build and rebuilt whole after
            every removal) or ``ivf`` (approximate; trained by :meth:`train` before a bulk load, else on the
            first vectors added, and re-trained as the gallery grows; the choice for galleries of a million photos,
            where exact search takes 0.1-0.5 s a query).
        use_gpu: ``None`` picks the GPU when FAISS sees one.
        ivf_lists: the most inverted lists an IVF index gets (it gets about 4 * sqrt(photos) below that).
        ivf_scan: about how many photos an IVF search scans; sets nprobe at each training.
    """

    def __init__(self, dim: int, kind: IndexKind = "flat", use_gpu: bool | None = None,
                 ivf_lists: int = IVF_MAX_LISTS, ivf_scan: int = IVF_SCAN_PHOTOS) -> None:
        if kind not in ("flat", "hnsw", "ivf"):
            raise ValueError(f"index kind must be flat, hnsw or ivf, got {kind!r}")
        self.dim = dim
        self.kind: IndexKind = kind
        # FAISS has no GPU HNSW: an HNSW gallery always searches on the CPU.
        wants_gpu = gpu_available() if use_gpu is None else bool(use_gpu and gpu_available())
        self.use_gpu = wants_gpu and kind != "hnsw"
        self._max_ivf_lists = ivf_lists
        self._ivf_scan = ivf_scan
        self._ivf_lists = ivf_lists
        self._ivf_nprobe = 1
        self._ivf_trained_on = 0
        self._lock = threading.RLock()
        self._identity: dict[int, Individual] = {}
        # Photos per individual, kept up to date so that a search knows how many individuals there are without
        # counting a million photos' identities (50 ms a query at 1M photos, more than the IVF search itself).
        self._photos_of: Counter[Individual] = Counter()
        self._master = self._new_master()
        self._gpu_index: faiss.Index | None = None
        self._gpu_stale = True

    @property
    def device(self) -> str:
        return "gpu" if self.use_gpu else "cpu"

    def _new_master(self) -> faiss.Index:
        if self.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = HNSW_EF_SEARCH
        elif self.kind == "ivf":
            # A flat coarse quantizer, not HNSW: comparing 4096 centroids takes well under a millisecond, and FAISS
            # clones the quantizer when it mirrors an IVF index on the GPU, which it cannot do for HNSW. (nprobe
            # stays below the GPU's limit of 1024 or more: at most 308, for galleries of ~24k photos.)
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, self._ivf_lists, faiss.METRIC_INNER_PRODUCT)
            ivf.nprobe = self._ivf_nprobe
            ivf.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST
            # IVF stores ids itself; wrapping it in an IDMap would break removals (IVF does not renumber).
            return ivf
        else:
            inner = faiss.IndexFlatIP(self.dim)
        return faiss.IndexIDMap2(inner)

    def __len__(self) -> int:
        return len(self._identity)

    def identities(self) -> set[Individual]:
        with self._lock:
            return set(self._photos_of)

    def add(self, ids: Sequence[int], embeddings: np.ndarray, identities: Sequence[Individual]) -> None:
        """Add photos; ``ids`` must be new (re-adding an id would make FAISS return it twice)."""
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1, self.dim)
        id_array = np.asarray(ids, dtype=np.int64)
        if not (len(id_array) == len(vectors) == len(identities)):
            raise ValueError(f"{len(id_array)} ids, {len(vectors)} embeddings and {len(identities)} identities")
        with self._lock:
            clash = [int(i) for i in id_array if int(i) in self._identity]
            if clash:
                raise ValueError(f"gallery already holds ids {clash[:10]}")
            if len(vectors) == 0:
                return
            if self.kind == "ivf" and not self._master.is_trained:
                self._master = self._trained_ivf(len(vectors), vectors)  # k-means samples IVF_TRAIN_PER_LIST a list
            self._master.add_with_ids(vectors, id_array)
            self._identity.update(zip(id_array.tolist(), identities))
            self._photos_of.update(identities)
            if self.kind == "ivf" and len(self._identity) >= IVF_RETRAIN_GROWTH * self._ivf_trained_on:
                self._retrain_ivf()
            elif self._gpu_index is not None and not self._gpu_stale:
                self._gpu_index.add_with_ids(vectors, id_array)  # adds need no full copy to the GPU

    def _flat_contents(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, vectors)`` of a flat or HNSW master, read back from FAISS, which stores both whole (no copy is
        kept beside it: at a million 1280-d photos that would be 5 GB more)."""
        ids = faiss.vector_to_array(self._master.id_map).astype(np.int64)
        return ids, self._master.index.reconstruct_n(0, self._master.ntotal)

    def _ivf_contents(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, vectors)`` of each non-empty inverted list of the IVF master, one list at a time (IVF-Flat keeps
        every vector whole in its list)."""
        for number in range(self._master.nlist):
            ids, codes = get_invlist(self._master.invlists, number)
            if len(ids):
                yield ids, codes.view(np.float32).reshape(-1, self.dim)

    def training_share(self, total: int) -> float:
        """The share of ``total`` photos that an IVF gallery sized for them trains on; 0 for the kinds that need no
        training, or for no photos."""
        if self.kind != "ivf" or total <= 0:
            return 0.0
        lists, _ = self._ivf_geometry(total)
        return min(1.0, IVF_TRAIN_PER_LIST * lists / total)

    def train(self, total: int, sample: np.ndarray) -> None:
        """Size an empty IVF gallery for ``total`` photos and train it on ``sample``, about
        :meth:`training_share` of them, before they are added.

        A bulk load (the service indexing its store at start) trains once, on photos drawn from all of them;
        adding them batch by batch would train on the first batch alone and again each time the gallery had grown
        ``IVF_RETRAIN_GROWTH`` times.
        """
        with self._lock:
            if self.kind != "ivf":
                raise ValueError(f"only an IVF gallery is trained, this one is {self.kind}")
            if self._identity:
                raise ValueError(f"train an IVF gallery before adding photos; it holds {len(self._identity)}")
            sample = np.ascontiguousarray(sample, dtype=np.float32).reshape(-1, self.dim)
            if not len(sample):
                raise ValueError(f"an IVF gallery for {total} photos needs photos to train on; the sample is empty")
            lists, _ = self._ivf_geometry(total)
            # k-means needs a photo per list at least: a sample short of that sizes the index for itself instead
            self._master = self._trained_ivf(total if len(sample) >= lists else len(sample), sample)

    def _ivf_geometry(self, n: int) -> tuple[int, int]:
        """Lists and nprobe of an IVF index trained on ``n`` photos (see ``IVF_*``)."""
        lists = max(1, min(self._max_ivf_lists, round(IVF_LISTS_PER_ROOT * math.sqrt(n)), n // IVF_MIN_TRAIN_PER_LIST))
        return lists, min(lists, max(IVF_MIN_NPROBE, math.ceil(self._ivf_scan * lists / n)))

    def _trained_ivf(self, n: int, training: np.ndarray) -> faiss.Index:
        """A new, empty IVF index sized for ``n`` photos, trained on ``training`` (those photos or a sample)."""
        self._ivf_lists, self._ivf_nprobe = self._ivf_geometry(n)
        index = self._new_master()
        index.train(training)
        self._ivf_trained_on = n
        log.info("IVF index trained for %d vectors: %d lists, nprobe %d", n, self._ivf_lists, self._ivf_nprobe)
        return index

    def _retrain_ivf(self) -> None:
        """Re-train on every photo: k-means on a seeded sample of the size it would keep anyway, drawn list by list,
        then the photos moved over one old list at a time, so that no third copy of the gallery is ever held."""
        total = len(self._identity)
        sample = _seeded_sample((vectors for _, vectors in self._ivf_contents()), self.training_share(total))
        index = self._trained_ivf(total, np.concatenate(sample))
        for ids, vectors in self._ivf_contents():
            index.add_with_ids(vectors, ids)
        self._master = index
        self._gpu_stale = True

    def remove(self, ids: Sequence[int]) -> None:
        """Remove photos by id (unknown ids are ignored)."""
        with self._lock:
            id_array = np.asarray([i for i in ids if int(i) in self._identity], dtype=np.int64)
            if len(id_array) == 0:
                return
            if self.kind == "hnsw":
                # HNSW cannot remove vectors: rebuild it from the vectors that stay.
                ids, vectors = self._flat_contents()
                keep = ~np.isin(ids, id_array)
                self._master = self._new_master()
                self._master.add_with_ids(vectors[keep], ids[keep])
            else:
                self._master.remove_ids(id_array)
            for i in id_array.tolist():
                individual = self._identity.pop(i)
                self._photos_of[individual] -= 1
                if not self._photos_of[individual]:
                    del self._photos_of[individual]
            self._gpu_stale = True  # GPU indexes cannot remove ids: the mirror is copied again from the master

    def _search_index(self) -> faiss.Index:
        if not self.use_gpu:
            return self._master
        if self._gpu_stale:
            resources = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(resources, 0, self._master)
            self._gpu_resources = resources  # the GPU index is only valid while its resources live
            self._gpu_stale = False
        return self._gpu_index

    def identities_of(self, image_ids: Sequence[int]) -> list[Individual | None]:
        """The individual each gallery photo belongs to; None for a photo removed since a search found it."""
        with self._lock:
            return [self._identity.get(int(image_id)) for image_id in image_ids]

    def search_photos(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` most similar photos of each query: ``(scores, ids)``, both ``Q x n``, id -1 past the end."""
        vectors = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        with self._lock:
            if not self._identity:
                return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
            return _cosines(self._search_index(), vectors, min(n, len(self._identity)))

    def search(self, queries: np.ndarray, k: int) -> list[Ranking]:
        """Rank up to ``k`` distinct individuals for each query, each scored by its best-matching photo.

        Photos are fetched in growing numbers until ``k`` distinct individuals are found or the gallery is
        exhausted, so one individual with many photos cannot crowd the others out of the answer.
        """
        vectors = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        with self._lock:
            total = len(self._identity)
            if total == 0:
                return [[] for _ in range(len(vectors))]
            index = self._search_index()
            wanted_individuals = min(k, len(self._photos_of))
            fetch = min(total, max(4 * k, 32))
            while True:
                scores, ids = _cosines(index, vectors, fetch)
                rankings = [
                    rank_individuals(s[i >= 0], [self._identity[int(j)] for j in i[i >= 0]], k, i[i >= 0])
                    for s, i in zip(scores, ids)
                ]
                if fetch >= total or all(len(r) >= wanted_individuals for r in rankings):
                    return rankings
                fetch = min(total, fetch * 4)


def train_for_batches(gallery: Gallery, total: int, batches: Iterable[np.ndarray], seed: int = 0) -> None:
    """Train an empty IVF gallery once for ``total`` photos, on a seeded sample drawn from every batch of their
    vectors (:meth:`Gallery.train`), before the batches are added; other kinds need no training. The service does
    this with its store at start, and bench/gallery_search.py with its photos."""
    share = gallery.training_share(total)
    if not share:
        return
    sample = _seeded_sample(batches, share, seed)
    if sum(len(part) for part in sample):
        gallery.train(total, np.concatenate(sample))


def _seeded_sample(batches: Iterable[np.ndarray], share: float, seed: int = 0) -> list[np.ndarray]:
    """About ``share`` of the rows of every batch, drawn with a seeded generator: k-means's training photos, taken
    from all of a gallery's photos without holding them all at once."""
    rng = np.random.default_rng(seed)
    return [vectors[rng.random(len(vectors)) < share] for vectors in batches]


def _cosines(index: faiss.Index, vectors: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search``, its inner products clipped to a cosine's range: float32 rounding scores a photo against
    itself 1.0000001, which a user reads as a bug in the evidence."""
    scores, ids = index.search(vectors, n)
    np.clip(scores, -1.0, 1.0, out=scores)
    return scores, ids
