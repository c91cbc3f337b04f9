"""Shared fixtures: small real image files and datasets made on the fly (tests never need ../shared/data)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"

torch.set_num_threads(2)
# Local features of dataset photos are cached on disk (reid.verification): keep the tests' out of the user's cache.
os.environ.setdefault("REID_FEATURE_CACHE", tempfile.mkdtemp(prefix="reid-features-"))


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 32), suffix_format: str | None = None) -> Path:
    """A small random RGB image (seeded) written to ``path``."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=suffix_format)
    return path


@pytest.fixture
def zindi_folder(tmp_path: Path) -> Path:
    """The real Zindi CSV rows from tests/fixtures/zindi with generated images (extensions in mixed case)."""
    root = tmp_path / "zindi"
    shutil.copytree(FIXTURES / "zindi", root)
    ids = []
    for name in ("train.csv", "extra_images.csv", "test.csv"):
        ids += [line.split(",")[0] for line in (root / name).read_text().splitlines()[1:]]
    for i, image_id in enumerate(ids):
        write_image(root / "images" / f"{image_id}{'.JPG' if i % 2 else '.jpg'}", seed=i, suffix_format="JPEG")
    return root


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic multi-view dataset shared by the tests that train or embed."""
    from reid.data.synth import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_dataset(root, individuals=8, images_per_individual=4, seed=0, image_size=64, progress=False)
    return root
