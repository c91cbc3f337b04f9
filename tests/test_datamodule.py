"""The data module: the model's preprocessing resolved from the linked model settings, and integer labels."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reid.data.datamodule import ReIDDataModule
from reid.imageio import decode_image
from reid.model import Encoder


@pytest.mark.parametrize("backbone", ["resnet10t", "test_resnet", "test_vit3.r160_in1k"])
def test_data_module_preprocesses_as_the_model_without_building_it(tmp_path: Path, backbone: str) -> None:
    """ImageNet statistics, a CNN and a tagged ViT with (0.5, 0.5, 0.5) ones: the name alone gives the model's."""
    data = ReIDDataModule(str(tmp_path), backbone=backbone, image_size=96)
    assert data.preprocess() == Encoder(backbone, image_size=96).preprocess(96)


def test_validation_embeds_with_the_attached_models_own_preprocessing(synth_dataset: Path) -> None:
    """In a fit the photos that pick best.ckpt are transformed by the very Preprocess the checkpoint stores."""
    from types import SimpleNamespace

    from reid.data.transforms import Preprocess

    data = ReIDDataModule(str(synth_dataset), individuals_per_batch=4, check_images=False, backbone="resnet10t",
                          image_size=64)
    own = Preprocess(72, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))  # differs from what the name alone resolves
    data.trainer = SimpleNamespace(lightning_module=SimpleNamespace(preprocess=own))
    assert data.preprocess() is own
    data.setup("fit")
    assert tuple(data.val_dataloader().dataset[0][0].shape)[-3:] == (3, 72, 72)  # (views,) 3 x size x size


def test_labels_are_one_integer_per_individual_across_every_table(synth_dataset: Path) -> None:
    data = ReIDDataModule(str(synth_dataset), split="individual", individuals_per_batch=4, check_images=False,
                          backbone="resnet10t", image_size=64)
    data.setup("fit")
    assert data.identities == sorted(data.records["identity"].unique())
    for frame in (data.records, data.train_records, data.gallery_records, data.query_records):
        assert frame["label"].dtype == np.int64
        assert [data.identities[label] for label in frame["label"]] == frame["identity"].tolist()


def test_training_crops_at_the_image_size_and_validation_embeds_at_the_test_size(synth_dataset: Path) -> None:
    data = ReIDDataModule(str(synth_dataset), individuals_per_batch=4, num_workers=0, check_images=False,
                          backbone="resnet10t", image_size=48, test_image_size=64)
    data.setup("fit")
    images, _, _ = next(iter(data.train_dataloader()))
    assert images.shape[-2:] == (48, 48)
    assert next(iter(data.val_dataloader()))[0].shape[-2:] == (64, 64)
    assert data.preprocess().image_size == 64  # what the checkpoint will store


def test_training_batches_travel_as_pixels_and_normalise_on_the_device_as_evaluation_does(
        synth_dataset: Path) -> None:
    """A training batch is uint8 (a quarter of float32's bytes to copy to the GPU); normalised by the training step,
    an unaugmented photo is the very tensor that evaluation embeds, so training and serving see the same input."""
    data = ReIDDataModule(str(synth_dataset), individuals_per_batch=4, num_workers=0, check_images=False,
                          backbone="resnet10t", image_size=48, augmentations=[])
    data.setup("fit")
    images, _, indices = next(iter(data.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 48, 48)
    preprocess = data.preprocess()
    evaluation = preprocess.eval_transform()
    paths = data.train_records["path"].to_numpy()[indices.numpy()]
    expected = torch.stack([evaluation(image=decode_image(path))["image"][0] for path in paths])
    normalise = preprocess.pixel_normaliser()
    torch.testing.assert_close(normalise(images), expected, rtol=0, atol=1e-6)
    assert not normalise.state_dict()  # nothing new in checkpoints: older ones load as they are
    with pytest.raises(TypeError, match="float32"):
        normalise(expected)


def test_training_loads_with_workers_after_this_process_ran_opencv_in_parallel(synth_dataset: Path) -> None:
    """A notebook that generated or verified photos (OpenCV's thread pool running) and then trains: the workers
    start and serve batches, and the process's own OpenCV threads are as they were. Configuring OpenCV in each
    forked worker instead hung for ever here, so the script runs in its own process group, killed after a minute."""
    script = f"""
import cv2, numpy as np
from reid.data.datamodule import ReIDDataModule
cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), dtype=np.uint8), (0, 0), 3)
threads = cv2.getNumThreads()
data = ReIDDataModule({str(synth_dataset)!r}, individuals_per_batch=4, num_workers=2, check_images=False,
                      backbone="resnet10t", image_size=48)
data.setup("fit")
images, _, _ = next(iter(data.train_dataloader()))
print(tuple(images.shape), cv2.getNumThreads() == threads)
"""
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the workers too
        process.communicate()
        pytest.fail("the data loader's workers hung after OpenCV had run in parallel in this process")
    assert process.returncode == 0, err
    assert out.split("\n")[-2] == "(8, 3, 48, 48) True"


def test_validation_interleaves_gallery_and_queries_so_any_first_batches_hold_both(synth_dataset: Path) -> None:
    """`limit_val_batches` and `fast_dev_run` keep a loader's first batches: a gallery-first loader cut short held no
    query, and validation logged no score (then ModelCheckpoint stopped the fit, missing val_map5)."""
    data = ReIDDataModule(str(synth_dataset), individuals_per_batch=4, check_images=False, backbone="resnet10t",
                          image_size=48, num_workers=0, eval_batch_size=4)
    data.setup("fit")
    table = data.validation_records
    assert len(table) == len(data.gallery_records) + len(data.query_records) == 32
    assert table["query"].sum() == len(data.query_records) > 0
    assert table["path"].is_unique and set(table["path"]) == set(data.records["path"])
    for batch in range(0, len(table), 4):
        assert table["query"][batch:batch + 4].any() and not table["query"][batch:batch + 4].all()


def test_validation_with_no_query_photo_is_a_clear_error(tmp_path: Path) -> None:
    from reid.errors import DatasetError
    from tests.conftest import write_image

    rows = ["path,identity,split"]
    for individual in ("a", "b"):
        for photo in range(2):
            write_image(tmp_path / f"{individual}{photo}.png", seed=photo, size=(32, 32))
            rows.append(f"{individual}{photo}.png,{individual},train")
    write_image(tmp_path / "c0.png", seed=9, size=(32, 32))
    rows.append("c0.png,c,val")  # an unseen individual's only photo is enrolled: nothing is left to query
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    data = ReIDDataModule(str(tmp_path), split="column", backbone="resnet10t", image_size=48)
    with pytest.raises(DatasetError, match="validation has no query photo"):
        data.setup("fit")


def test_a_split_column_without_val_photos_names_its_values_and_the_way_round_it(tmp_path: Path) -> None:
    """A hold-out marked train/test is a common labels.csv: the refusal says what the column holds and that
    --data.split image draws validation photos instead (not "give individuals 2 photos", which they have)."""
    from reid.errors import DatasetError
    from tests.conftest import write_image

    rows = ["path,identity,split"]
    for individual in ("a", "b"):
        for photo, split in enumerate(("train", "train", "test")):
            write_image(tmp_path / f"{individual}{photo}.png", seed=photo, size=(32, 32))
            rows.append(f"{individual}{photo}.png,{individual},{split}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    data = ReIDDataModule(str(tmp_path), backbone="resnet10t", image_size=48)
    with pytest.raises(DatasetError, match=r"0 validation photos; both must be non-empty \(its split column has 4 "
                                           r"train, 2 test: mark some photos val .* --data.split image"):
        data.setup("fit")
    drawn = ReIDDataModule(str(tmp_path), split="image", individuals_per_batch=2, backbone="resnet10t", image_size=48)
    drawn.setup("fit")
    assert len(drawn.val_records) > 0


def _augmented_batches(root: Path, workers: int, seed: int, rank: int | None = None) -> list[torch.Tensor]:
    data = ReIDDataModule(str(root), individuals_per_batch=2, batches_per_epoch=4, num_workers=workers,
                          check_images=False, backbone="resnet10t", image_size=48, val_fraction=0.34,
                          augmentations=[{"type": "Affine", "rotate": [-15, 15], "scale": [0.85, 1.15], "p": 1.0},
                                         {"type": "ColorJitter", "brightness": 0.3, "p": 1.0}])
    if rank is not None:  # one rank of a two-process (DDP) run
        from types import SimpleNamespace

        data.trainer = SimpleNamespace(global_rank=rank, world_size=2, lightning_module=None)
    data.setup("fit")
    torch.manual_seed(seed)  # what seed_everything does
    return [batch[0] for batch in data.train_dataloader()]


def test_augmentations_differ_between_workers_and_repeat_with_the_seed(tmp_path: Path) -> None:
    """Every photo a copy of one image, so batches differ by their augmentations alone: forked workers once drew the
    same ones slot for slot, and the same seed gave different augmentations from one fit to the next."""
    from tests.conftest import write_image

    rows = ["path,identity"]
    for individual in range(6):
        for photo in range(3):
            write_image(tmp_path / f"{individual}_{photo}.png", seed=0, size=(64, 64))
            rows.append(f"{individual}_{photo}.png,t{individual}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    two_workers = _augmented_batches(tmp_path, 2, seed=0)
    assert not torch.equal(two_workers[0], two_workers[1]), "batches 0 and 1 come from different workers"
    one_process = _augmented_batches(tmp_path, 0, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(one_process, _augmented_batches(tmp_path, 0, seed=0)))
    assert not torch.equal(one_process[0], _augmented_batches(tmp_path, 0, seed=1)[0])
    assert all(torch.equal(a, b) for a, b in zip(two_workers, _augmented_batches(tmp_path, 2, seed=0)))
    # DDP ranks share the seed, and must not share the augmentations
    for workers in (0, 2):
        first, second = (_augmented_batches(tmp_path, workers, seed=0, rank=rank)[0] for rank in (0, 1))
        assert not torch.equal(first, second)
