"""Seeded train/validation splits of a record table.

Two questions need two splits. *By image* (closed set) asks "do we recognise a known individual in a new
photo?": every individual keeps photos on both sides. *By individual* (open set) asks "do we notice a turtle we
have never seen?": held-out individuals appear only as queries and should come back as "new_turtle".
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from reid.errors import DatasetError, require

SplitMode = Literal["auto", "column", "image", "individual"]


def split_by_image(records: pd.DataFrame, val_fraction: float, seed: int) -> pd.Series:
    """Send about ``val_fraction`` of each individual's photos to ``val``, always keeping one in ``train``.

    Individuals with a single photo stay wholly in ``train``: as a query they would have nothing to match.
    """
    rng = np.random.default_rng(seed)
    split = pd.Series("train", index=records.index)
    for _, group in records.groupby("identity", sort=True):
        if len(group) < 2:
            continue
        n_val = min(len(group) - 1, max(1, int(round(len(group) * val_fraction))))
        split[rng.permutation(group.index.to_numpy())[:n_val]] = "val"
    return split


def split_by_individual(records: pd.DataFrame, val_fraction: float, seed: int) -> pd.Series:
    """Hold out about ``val_fraction`` of the individuals (all their photos) as ``val``."""
    identities = np.array(sorted(records["identity"].unique()))
    if len(identities) < 2:
        raise DatasetError(f"an open-set split needs at least 2 individuals; the dataset has {len(identities)}")
    n_val = min(len(identities) - 1, max(1, int(round(len(identities) * val_fraction))))
    held_out = set(np.random.default_rng(seed).permutation(identities)[:n_val])
    return records["identity"].map(lambda identity: "val" if identity in held_out else "train")


def assign_splits(records: pd.DataFrame, mode: SplitMode = "auto", val_fraction: float = 0.25,
                  seed: int = 0) -> pd.DataFrame:
    """Return a copy of ``records`` whose ``split`` column is filled.

    ``auto`` uses the dataset's own ``split`` column when it has one (values kept as they are) and splits by
    image otherwise; ``column`` insists on the dataset's column.
    """
    require("data.val_fraction", val_fraction, 0.0 < val_fraction < 1.0, "between 0 and 1 (exclusive)")
    has_column = bool((records["split"] != "").any())
    result = records.copy()
    if mode == "column" or (mode == "auto" and has_column):
        if not has_column:
            raise DatasetError("split mode 'column' needs a split column in labels.csv; the dataset has none")
        return result
    if mode in ("auto", "image"):
        result["split"] = split_by_image(records, val_fraction, seed)
    elif mode == "individual":
        result["split"] = split_by_individual(records, val_fraction, seed)
    else:
        raise DatasetError(f"unknown split mode {mode!r}; use auto, column, image or individual")
    return result
