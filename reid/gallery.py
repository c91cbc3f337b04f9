"""A FAISS-backed gallery of photo embeddings and the individuals they belong to.

Embeddings are L2-normalised, so inner product is cosine similarity. A CPU index is always the master copy:
FAISS GPU indexes cannot ``remove_ids``, so when a GPU is present a GPU mirror serves searches and is rebuilt
from the master after a removal.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Literal

import faiss
import numpy as np

from reid.metrics import Ranking, rank_individuals

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw", "ivf"]
#: Search breadth of the approximate indexes, chosen with bench/gallery_search.py (see BENCHMARKS.md): on
#: 1280-d embeddings FAISS's defaults (efSearch 16, nprobe 1) miss the exact top answer most of the time.
HNSW_EF_SEARCH = 256
IVF_MIN_NPROBE = 16
IVF_MAX_NPROBE = 128
#: An IVF gallery is re-trained when it has grown to this many times the vectors it was trained on, so one
#: started empty does not keep the handful of lists its first enrolment could support.
IVF_RETRAIN_GROWTH = 4


def gpu_available() -> bool:
    """True when the installed FAISS build sees a GPU (never probe with StandardGpuResources: it aborts on CPU)."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(get_num_gpus and get_num_gpus() > 0)


class Gallery:
    """Photo embeddings keyed by integer id, each belonging to an individual; searchable by individual.

    Thread-safe: searches take a shared snapshot under a lock; adds and removals are serialised.

    Args:
        dim: embedding dimension.
        kind: ``flat`` (exact), ``hnsw`` (approximate, no training, good for large galleries) or ``ivf``
            (approximate; trained on the first vectors added, only worth it beyond ~100k photos).
        use_gpu: ``None`` picks the GPU when FAISS sees one.
    """

    def __init__(self, dim: int, kind: IndexKind = "flat", use_gpu: bool | None = None, ivf_lists: int = 1024,
                 hnsw_neighbours: int = 32) -> None:
        if kind not in ("flat", "hnsw", "ivf"):
            raise ValueError(f"index kind must be flat, hnsw or ivf, got {kind!r}")
        self.dim = dim
        self.kind: IndexKind = kind
        # FAISS has no GPU HNSW: an HNSW gallery always searches on the CPU.
        wants_gpu = gpu_available() if use_gpu is None else bool(use_gpu and gpu_available())
        self.use_gpu = wants_gpu and kind != "hnsw"
        self._requested_ivf_lists = ivf_lists
        self._ivf_lists = ivf_lists
        self._ivf_trained_on = 0
        self._hnsw_neighbours = hnsw_neighbours
        self._lock = threading.RLock()
        self._identity: dict[int, str] = {}
        # The vectors themselves, kept beside FAISS so that HNSW (no removal) and IVF (re-training) can be rebuilt
        # without asking an index type to reconstruct what it may not store.
        self._vectors: dict[int, np.ndarray] = {}
        self._master = self._new_master()
        self._gpu_index: faiss.Index | None = None
        self._gpu_stale = True

    @property
    def device(self) -> str:
        return "gpu" if self.use_gpu else "cpu"

    def _new_master(self) -> faiss.Index:
        if self.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self._hnsw_neighbours, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = HNSW_EF_SEARCH
        elif self.kind == "ivf":
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, self._ivf_lists, faiss.METRIC_INNER_PRODUCT)
            # Visit an eighth of the lists (within bounds): nprobe=1, FAISS's default, misses most neighbours.
            ivf.nprobe = min(self._ivf_lists, max(IVF_MIN_NPROBE, min(IVF_MAX_NPROBE, self._ivf_lists // 8)))
            # IVF stores ids itself; wrapping it in an IDMap would break removals (IVF does not renumber).
            return ivf
        else:
            inner = faiss.IndexFlatIP(self.dim)
        return faiss.IndexIDMap2(inner)

    def __len__(self) -> int:
        return len(self._identity)

    def identities(self) -> set[str]:
        with self._lock:
            return set(self._identity.values())

    def add(self, ids: Sequence[int], embeddings: np.ndarray, identities: Sequence[str]) -> None:
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
                self._master = self._trained_ivf(vectors)
            self._master.add_with_ids(vectors, id_array)
            self._identity.update(zip(id_array.tolist(), identities))
            self._vectors.update(zip(id_array.tolist(), vectors))
            if self.kind == "ivf" and len(self._identity) >= IVF_RETRAIN_GROWTH * self._ivf_trained_on:
                self._retrain_ivf()
            elif self._gpu_index is not None and not self._gpu_stale:
                self._gpu_index.add_with_ids(vectors, id_array)  # adds need no full copy to the GPU

    def _all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.array(sorted(self._vectors), dtype=np.int64)
        vectors = np.stack([self._vectors[int(i)] for i in ids]) if len(ids) else np.zeros((0, self.dim), np.float32)
        return ids, vectors

    def _trained_ivf(self, vectors: np.ndarray) -> faiss.Index:
        """A new, empty IVF index trained on ``vectors``, with as many lists as they support (39 points a list)."""
        self._ivf_lists = max(1, min(self._requested_ivf_lists, len(vectors) // 39))
        index = self._new_master()
        index.train(vectors)
        self._ivf_trained_on = len(vectors)
        log.info("IVF index trained on %d vectors with %d lists", len(vectors), self._ivf_lists)
        return index

    def _retrain_ivf(self) -> None:
        ids, vectors = self._all_vectors()
        index = self._trained_ivf(vectors)
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
                ids, vectors = self._all_vectors()
                keep = ~np.isin(ids, id_array)
                self._master = self._new_master()
                self._master.add_with_ids(vectors[keep], ids[keep])
            else:
                self._master.remove_ids(id_array)
            for i in id_array.tolist():
                del self._identity[i]
                del self._vectors[i]
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

    def identity_of(self, image_id: int) -> str:
        """The individual a gallery photo belongs to."""
        with self._lock:
            return self._identity[int(image_id)]

    def search_photos(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` most similar photos of each query: ``(scores, ids)``, both ``Q x n``, id -1 past the end."""
        vectors = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        with self._lock:
            if not self._identity:
                return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
            return self._search_index().search(vectors, min(n, len(self._identity)))

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
            wanted_individuals = min(k, len(set(self._identity.values())))
            fetch = min(total, max(4 * k, 32))
            while True:
                scores, ids = index.search(vectors, fetch)
                rankings = [
                    rank_individuals(s[i >= 0], [self._identity[int(j)] for j in i[i >= 0]], k, i[i >= 0])
                    for s, i in zip(scores, ids)
                ]
                if fetch >= total or all(len(r) >= wanted_individuals for r in rankings):
                    return rankings
                fetch = min(total, fetch * 4)
