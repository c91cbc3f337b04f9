"""Seeded splits by image (closed set) and by individual (open set)."""

from __future__ import annotations

import pandas as pd
import pytest

from reid.data.splits import assign_splits
from reid.errors import ConfigError, DatasetError


def _records(counts: dict[str, int], split: str = "") -> pd.DataFrame:
    rows = [{"image_id": f"{k}{i}", "path": f"/x/{k}{i}.png", "identity": k, "view": "", "split": split}
            for k, n in counts.items() for i in range(n)]
    return pd.DataFrame(rows)


def test_by_image_keeps_every_individual_in_train_and_is_seeded() -> None:
    records = _records({"a": 5, "b": 4, "c": 1})
    split = assign_splits(records, "image", 0.25, seed=3)
    assert set(split.loc[split["split"] == "train", "identity"]) == {"a", "b", "c"}
    assert (split.loc[split["identity"] == "c", "split"] == "train").all()  # a lone photo cannot be a query
    assert split["split"].tolist() == assign_splits(records, "image", 0.25, seed=3)["split"].tolist()
    assert split["split"].tolist() != assign_splits(records, "image", 0.25, seed=4)["split"].tolist()


def test_by_individual_holds_whole_individuals_out() -> None:
    records = _records({k: 3 for k in "abcdefgh"})
    split = assign_splits(records, "individual", 0.25, seed=0)
    held_out = set(split.loc[split["split"] == "val", "identity"])
    assert len(held_out) == 2
    assert held_out.isdisjoint(split.loc[split["split"] == "train", "identity"])


def test_dataset_split_column_is_used_as_is() -> None:
    records = _records({"a": 2}, split="test")
    assert (assign_splits(records, "auto")["split"] == "test").all()
    with pytest.raises(DatasetError, match="needs a split column"):
        assign_splits(_records({"a": 2}), "column")
    with pytest.raises(ConfigError, match="data.val_fraction must be between 0 and 1"):
        assign_splits(records, "image", val_fraction=1.5)
