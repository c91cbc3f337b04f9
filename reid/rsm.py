"""Representational similarity matrices (RSMs): what the encoder thinks is alike.

Photos are sorted by individual (and, optionally, by view inside each individual), so a well-trained encoder
shows bright blocks on the diagonal: photos of one individual resemble each other more than anyone else's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from reid.onnx_backend import Backend


@dataclass
class RSM:
    """A similarity matrix with the individual (and view) of each row, in plotting order."""

    matrix: np.ndarray
    identities: list[str]
    views: list[str]


def select_photos(identities: Sequence[str], views: Sequence[str] | None = None, individuals: int | None = None,
                  per_individual: int | None = None, by_view: bool = False, seed: int = 0) -> np.ndarray:
    """Indices of the photos to show: up to ``individuals`` individuals x ``per_individual`` photos, sorted.

    Sorting is by individual, then view when ``by_view``, then original order, which is what makes the blocks.
    """
    views = list(views) if views is not None else [""] * len(identities)
    rng = np.random.default_rng(seed)
    names = sorted(set(identities))
    if individuals is not None and individuals < len(names):
        names = sorted(rng.choice(names, size=individuals, replace=False).tolist())
    chosen: list[int] = []
    for name in names:
        members = [i for i, identity in enumerate(identities) if identity == name]
        if per_individual is not None and per_individual < len(members):
            members = sorted(rng.choice(members, size=per_individual, replace=False).tolist())
        if by_view:
            members = sorted(members, key=lambda i: (views[i], i))
        chosen.extend(members)
    return np.array(chosen, dtype=np.int64)


def compute_rsm(embeddings: np.ndarray, identities: Sequence[str], views: Sequence[str] | None = None,
                individuals: int | None = None, per_individual: int | None = None, by_view: bool = False,
                seed: int = 0) -> RSM:
    """Cosine similarities between the selected photos (embeddings are L2-normalised, so a dot product)."""
    views = list(views) if views is not None else [""] * len(identities)
    order = select_photos(identities, views, individuals, per_individual, by_view, seed)
    vectors = np.asarray(embeddings, dtype=np.float32)[order]
    return RSM(vectors @ vectors.T, [identities[i] for i in order], [views[i] for i in order])


def _blocks(labels: Sequence[str]) -> list[tuple[int, int, str]]:
    """Runs of equal consecutive labels as (start, end, label)."""
    runs: list[tuple[int, int, str]] = []
    for i, label in enumerate(labels):
        if runs and runs[-1][2] == label:
            runs[-1] = (runs[-1][0], i + 1, label)
        else:
            runs.append((i, i + 1, label))
    return runs


def plot_rsm(rsm: RSM, title: str = "Representational similarity", by_view: bool = False) -> Figure:
    """Heatmap with one labelled block per individual, thin view separators when ``by_view``, and a colour bar.

    A bare matplotlib ``Figure``, not pyplot: no global state to close or lock (the service draws from several
    threads), headless by construction, and matplotlib is imported only when a plot is drawn, which keeps ~1 s
    out of the service's start-up (BENCHMARKS.md, start-up).
    """
    from matplotlib.figure import Figure

    n = len(rsm.identities)
    size = min(14.0, 4.0 + n * 0.06)
    figure = Figure(figsize=(size + 1.5, size))
    axis = figure.subplots()
    image = axis.imshow(rsm.matrix, cmap="viridis", vmin=float(min(0.0, rsm.matrix.min())), vmax=1.0,
                        interpolation="nearest")
    blocks = _blocks(rsm.identities)
    if by_view:
        for start, _, _ in _blocks([f"{a}\x00{b}" for a, b in zip(rsm.identities, rsm.views)])[1:]:
            axis.axhline(start - 0.5, color="white", linewidth=0.3, alpha=0.6)
            axis.axvline(start - 0.5, color="white", linewidth=0.3, alpha=0.6)
    for start, end, _ in blocks[1:]:
        axis.axhline(start - 0.5, color="white", linewidth=1.0)
        axis.axvline(start - 0.5, color="white", linewidth=1.0)
    centres = [(start + end - 1) / 2 for start, end, _ in blocks]
    labels = [label for _, _, label in blocks]
    font = max(4, min(9, int(400 / max(1, len(blocks)))))
    axis.set_xticks(centres, labels, rotation=90, fontsize=font)
    axis.set_yticks(centres, labels, fontsize=font)
    axis.set_title(title + (" (photos grouped by individual, then view)" if by_view else " (photos grouped by individual)"))
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="cosine similarity")
    figure.tight_layout()
    return figure


def dataset_rsm(checkpoint: str | Path, data: str | Path, individuals: int | None = 12, per_individual: int | None = 8,
                by_view: bool = False, seed: int = 0, batch_size: int = 32,
                backend: Backend = "torch") -> tuple[RSM, Figure]:
    """The RSM of a dataset under a checkpoint, and its heatmap: the one call a notebook needs.

    Only the selected photos are embedded, so a large dataset costs no more than the photos shown.
    """
    from reid.data.records import read_dataset
    from reid.inference import Embedder

    records = read_dataset(data)
    chosen = select_photos(records["identity"].tolist(), records["view"].tolist(), individuals, per_individual,
                           by_view, seed)
    records = records.iloc[chosen].reset_index(drop=True)
    embeddings = Embedder.from_checkpoint(checkpoint, backend=backend).embed(records["path"].tolist(), batch_size,
                                                                             progress=True)
    rsm = compute_rsm(embeddings, records["identity"].tolist(), records["view"].tolist(), by_view=by_view)
    return rsm, plot_rsm(rsm, title=f"RSM of {Path(checkpoint).name}", by_view=by_view)
