"""Test-time zoom: a photo's centre crops embedded beside it (``model.test_crops``), one vector a photo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reid.cli import main
from reid.data.datamodule import ReIDDataModule
from reid.data.transforms import Preprocess
from reid.errors import ConfigError
from reid.imageio import decode_image
from reid.inference import Embedder, read_checkpoint
from reid.model import Encoder


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(3)
    return Encoder("resnet10t", pretrained=False, projection_dim=16).eval()


def test_a_photo_and_its_centre_crop_make_one_embedding(encoder: Encoder, synth_dataset: Path) -> None:
    """The embedding is the normalised mean of the whole photo's and the crop's, each embedded as a photo alone."""
    whole = Embedder(encoder, encoder.preprocess(64))
    zoomed = Embedder(encoder, encoder.preprocess(64, crops=(0.5,)))
    photos = [decode_image(path) for path in sorted(synth_dataset.glob("images/*/*.png"))[:3]]
    height, width = photos[0].shape[:2]
    middles = [photo[height // 4: height // 4 + height // 2, width // 4: width // 4 + width // 2] for photo in photos]
    expected = whole.embed(photos) + whole.embed(middles)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    vectors = zoomed.embed(photos)
    assert np.allclose(vectors, expected, atol=1e-5)
    assert not np.allclose(vectors, whole.embed(photos), atol=1e-3)  # the crop changes what is compared
    # files go through the DataLoader path, arrays through the direct one: the same vectors
    files = sorted(synth_dataset.glob("images/*/*.png"))[:3]
    assert np.allclose(zoomed.embed(files, batch_size=2), vectors, atol=1e-5)
    onnx = Embedder(encoder, encoder.preprocess(64, crops=(0.5,)), backend="onnx")
    assert np.allclose(onnx.embed(photos), vectors, atol=1e-4)  # ONNX Runtime takes the views as a batch too


def test_crops_travel_with_the_checkpoint_and_old_checkpoints_embed_the_whole_photo() -> None:
    preprocess = Preprocess(64, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), (0.5, 0.7))
    assert Preprocess.from_dict(preprocess.to_dict()) == preprocess
    stored_before = {k: v for k, v in preprocess.to_dict().items() if k != "crops"}
    assert Preprocess.from_dict(stored_before).crops == ()
    for wrong in ((1.0,), (0.0,), (-0.5,), (True,)):
        with pytest.raises(ConfigError, match=r"test crops must be fractions in \(0, 1\)"):
            Preprocess(64, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), wrong)


def test_validation_embeds_each_photo_with_its_crops(synth_dataset: Path) -> None:
    data = ReIDDataModule(str(synth_dataset), individuals_per_batch=4, num_workers=0, check_images=False,
                          backbone="resnet10t", image_size=48, test_crops=[0.5])
    data.setup("fit")
    images, _, _ = next(iter(data.train_dataloader()))
    assert images.shape[1:] == (3, 48, 48)  # training is untouched
    assert next(iter(data.val_dataloader()))[0].shape[1:] == (2, 3, 48, 48)  # the photo, then its crop
    assert data.preprocess().crops == (0.5,)


def test_fit_with_test_crops_validates_and_stores_them(tmp_path: Path, synth_dataset: Path) -> None:
    from tests.test_fit import _fit_args

    assert main(_fit_args(tmp_path, synth_dataset, "--model.test_crops", "[0.5]", "--trainer.max_epochs", "1")) == 0
    best = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
    meta = read_checkpoint(best)["reid"]
    assert meta["preprocess"]["crops"] == [0.5] and meta["config"]["data"]["test_crops"] == [0.5]  # linked
    assert Embedder.from_checkpoint(best).preprocess.crops == (0.5,)
