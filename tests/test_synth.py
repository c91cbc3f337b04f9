"""Tests for the synthetic multi-view dataset: layout, determinism, stability of individuals, argument checks, and
that identity lives in the pattern geometry rather than in colour (so a model cannot shortcut it)."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from reid.data.synth import VIEWS, generate_synthetic_dataset
from reid.errors import DatasetError


def _rows(labels: Path) -> list[dict[str, str]]:
    with labels.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _pixels(root: Path, rel: str) -> np.ndarray:
    with Image.open(root / rel) as img:
        return np.asarray(img.convert("RGB"))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _gen(out: Path, **kwargs) -> Path:
    kwargs.setdefault("image_size", 40)
    kwargs.setdefault("progress", False)
    return generate_synthetic_dataset(out, **kwargs)


def test_layout_labels_and_images(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    labels = _gen(out, individuals=4, images_per_individual=5, image_size=48, seed=3)

    assert labels == out / "labels.csv"
    with labels.open(encoding="utf-8") as fh:
        assert fh.readline().strip() == "path,identity,view"
    rows = _rows(labels)
    assert len(rows) == 4 * 5
    assert sorted({r["identity"] for r in rows}) == ["ind_000", "ind_001", "ind_002", "ind_003"]
    for ident in ("ind_000", "ind_003"):
        views = [r["view"] for r in rows if r["identity"] == ident]
        assert views == ["top", "left", "right", "top", "left"]  # cycles, so >= 3 photos give all views
    for r in rows:
        assert not Path(r["path"]).is_absolute()
        assert r["path"].startswith(f"images/{r['identity']}/")
        assert r["path"].endswith(f"_{r['view']}.png")
        with Image.open(out / r["path"]) as img:
            assert img.format == "PNG"
            assert img.mode == "RGB"
            assert img.size == (48, 48)
    assert len({r["path"] for r in rows}) == len(rows)
    assert set(VIEWS) == {"top", "left", "right"}


def test_first_individual_names_and_identity(tmp_path: Path) -> None:
    a = _gen(tmp_path / "a", individuals=2, images_per_individual=2, first_individual=100)
    assert sorted({r["identity"] for r in _rows(a)}) == ["ind_100", "ind_101"]
    # ind_100 is the same animal whichever range it is generated in.
    _gen(tmp_path / "b", individuals=3, images_per_individual=2, first_individual=99)
    for photo in ("ind_100_00_top.png", "ind_100_01_left.png"):
        rel = f"images/ind_100/{photo}"
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_same_seed_gives_identical_bytes_different_seed_differs(tmp_path: Path) -> None:
    _gen(tmp_path / "a", individuals=3, images_per_individual=3, seed=7)
    _gen(tmp_path / "b", individuals=3, images_per_individual=3, seed=7)
    _gen(tmp_path / "c", individuals=3, images_per_individual=3, seed=8)
    files_a, files_b, files_c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    images = [k for k in files_a if k.endswith(".png")]
    assert all(files_a[k] != files_c[k] for k in images)


def test_individual_is_stable_when_asking_for_more(tmp_path: Path) -> None:
    _gen(tmp_path / "small", individuals=5, images_per_individual=4, seed=1)
    _gen(tmp_path / "big", individuals=10, images_per_individual=6, seed=1)
    small = sorted((tmp_path / "small" / "images" / "ind_003").glob("*.png"))
    assert len(small) == 4
    for path in small:
        assert path.read_bytes() == (tmp_path / "big" / "images" / "ind_003" / path.name).read_bytes()


def test_photos_of_one_individual_differ(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    _gen(out, individuals=1, images_per_individual=4, image_size=64)
    first = _pixels(out, "images/ind_000/ind_000_00_top.png").astype(np.float32)
    again = _pixels(out, "images/ind_000/ind_000_03_top.png").astype(np.float32)
    # Same individual, same view: pose, lighting and background must still change the photo a lot.
    assert np.abs(first - again).mean() > 10.0


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"individuals": 0}, "individuals"),
        ({"individuals": -3}, "individuals"),
        ({"images_per_individual": 0}, "images_per_individual"),
        ({"image_size": 31}, "image_size"),
        ({"image_size": 2.5}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"first_individual": -1}, "first_individual"),
        ({"image_format": "tiff"}, "image_format"),
    ],
)
def test_bad_arguments_raise_dataset_error_naming_value(tmp_path: Path, kwargs: dict, named: str) -> None:
    with pytest.raises(DatasetError) as info:
        generate_synthetic_dataset(tmp_path / "ds", progress=False, **kwargs)
    message = str(info.value)
    assert named in message
    assert repr(next(iter(kwargs.values()))) in message
    assert not (tmp_path / "ds" / "labels.csv").exists()


def test_jpeg_photos_are_listed_and_read_like_png_ones(tmp_path: Path) -> None:
    """JPEG is what cameras write, so a loading benchmark should decode it: same layout, same individuals."""
    labels = _gen(tmp_path / "ds", individuals=2, images_per_individual=3, image_size=48, image_format="jpeg")
    rows = _rows(labels)
    assert [r["path"].rsplit("_", 1)[-1] for r in rows] == ["top.jpg", "left.jpg", "right.jpg"] * 2
    for r in rows:
        with Image.open(tmp_path / "ds" / r["path"]) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (48, 48))


def test_output_path_that_is_a_file_raises(tmp_path: Path) -> None:
    target = tmp_path / "not_a_folder"
    target.write_text("x")
    with pytest.raises(DatasetError, match="not_a_folder"):
        _gen(target, individuals=1, images_per_individual=1)


def test_rerun_into_same_folder_lists_only_new_images(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    _gen(out, individuals=3, images_per_individual=4)
    labels = _gen(out, individuals=2, images_per_individual=2)
    rows = _rows(labels)
    assert len(rows) == 4
    assert {r["identity"] for r in rows} == {"ind_000", "ind_001"}
    assert all((out / r["path"]).is_file() for r in rows)
    assert not (out / "labels.csv.tmp").exists()


def test_reid_synth_never_replaces_another_datasets_labels_unless_forced(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from reid.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "labels.csv").write_text("path,identity\nphotos/a.jpg,t1\n")
    assert main(["synth", "--out", str(mine), "--individuals", "1", "--images-per-individual", "1"]) == 2
    assert "lists photos reid synth did not write (e.g. photos/a.jpg)" in capsys.readouterr().err
    assert (mine / "labels.csv").read_text() == "path,identity\nphotos/a.jpg,t1\n"
    assert main(["synth", "--out", str(mine), "--individuals", "1", "--images-per-individual", "1", "--force"]) == 0
    assert len(_rows(mine / "labels.csv")) == 1
    # a synthetic dataset is refreshed by running the command again, as before
    assert main(["synth", "--out", str(mine), "--individuals", "2", "--images-per-individual", "1"]) == 0
    assert len(_rows(mine / "labels.csv")) == 2


def _nn_top1(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest-neighbour (Euclidean) top-1 accuracy."""
    dist = ((features[:, None, :] - features[None, :, :]) ** 2).sum(axis=-1)
    np.fill_diagonal(dist, np.inf)
    return float((labels[dist.argmin(axis=1)] == labels).mean())


def _dark_structure(image: np.ndarray) -> np.ndarray:
    """Crude geometry feature: where the image is darker than its surroundings (scale seams, spots), coarsely pooled.

    Dividing by a local mean removes brightness, colour and gradient, so only the layout of dark marks remains.
    """
    gray = image.astype(np.float32).mean(axis=-1) / 255.0
    local = cv2.GaussianBlur(gray, (0, 0), 6) + 1e-3
    dark = np.clip(1.0 - gray / local, 0.0, None)
    dark = cv2.GaussianBlur(dark, (0, 0), 1.5)
    feature = cv2.resize(dark, (16, 16), interpolation=cv2.INTER_AREA).ravel()
    feature = feature - feature.mean()
    return feature / (np.linalg.norm(feature) + 1e-9)  # compare layouts, not how much dark there is


def test_identity_is_in_geometry_not_colour(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    rows = _rows(_gen(out, individuals=20, images_per_individual=6, image_size=64, seed=0))
    labels = np.array([r["identity"] for r in rows])
    images = [_pixels(out, r["path"]) for r in rows]
    # Chance is 5/119 ~ 0.04: global colour must not identify individuals ...
    mean_rgb = np.stack([img.reshape(-1, 3).mean(axis=0) for img in images])
    colour_top1 = _nn_top1(mean_rgb, labels)
    assert colour_top1 < 0.3
    # ... while the layout of the pattern does, across views, even with a crude hand-made feature.
    geometry_top1 = _nn_top1(np.stack([_dark_structure(img) for img in images]), labels)
    assert geometry_top1 > 0.3
    assert geometry_top1 > colour_top1 + 0.15
