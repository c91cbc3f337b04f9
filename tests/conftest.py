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


@pytest.fixture(scope="session")
def slanted_turtle(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[np.ndarray], np.ndarray]:
    """One upright photo (512 px) of each of four synthetic individuals, and the first one seen at a slant: squeezed
    to 30% of its width, as by a camera tilted ~73 degrees, then turned 40 degrees. Plain SIFT matches the slanted
    photo no better than random matches do; simulated tilts (ASIFT) match it."""
    import cv2

    from reid.data.synth import generate_synthetic_dataset
    from reid.imageio import decode_image

    root = tmp_path_factory.mktemp("slanted")
    generate_synthetic_dataset(root, individuals=4, images_per_individual=1, seed=0, image_size=256, progress=False)
    upright = [cv2.resize(decode_image(path), (512, 512), interpolation=cv2.INTER_CUBIC)
               for path in sorted((root / "images").glob("*/*.png"))]
    turned = cv2.warpAffine(upright[0], cv2.getRotationMatrix2D((256, 256), 40.0, 1.0), (512, 512),
                            borderMode=cv2.BORDER_REFLECT)
    return upright, cv2.resize(turned, (154, 512), interpolation=cv2.INTER_AREA)


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
