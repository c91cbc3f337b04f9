"""Encoder construction and starting weights from local files (what users do offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from reid.cli import main
from reid.data.datamodule import ReIDDataModule
from reid.data.transforms import Preprocess
from reid.errors import ConfigError, WeightsError
from reid.inference import Embedder
from reid.model import Encoder
from reid.weights import create_backbone

BACKBONE = "resnet10t"


def _reference_state(seed: int = 7) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(BACKBONE, num_classes=1000).state_dict()  # includes a classifier, as hub files do


@pytest.mark.parametrize("prefix", ["", "backbone.", "model.", "module.", "encoder.backbone."])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_load_with_wrapper_prefixes_stripped(tmp_path: Path, prefix: str, suffix: str) -> None:
    state = {prefix + k: v for k, v in _reference_state().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    backbone = create_backbone(BACKBONE, str(path))
    expected = _reference_state()
    loaded = backbone.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)  # every tensor really came from the file


def test_mismatched_weights_list_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = _reference_state()
    state.pop("conv1.0.weight")
    state["extra.layer.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"1 missing \['conv1\.0\.weight'\], 1 unexpected \['extra\.layer\.weight'\]"):
        create_backbone(BACKBONE, str(path))


def test_weights_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        create_backbone(BACKBONE, str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_text("not torch")
    with pytest.raises(WeightsError, match="cannot read weights file .*junk.pth: not a file written by torch.save"):
        create_backbone(BACKBONE, str(tmp_path / "junk.pth"))
    with pytest.raises(ConfigError, match="model.backbone: unknown timm backbone 'resnet_nonexistent'"):
        create_backbone("resnet_nonexistent", False)


def test_embedding_is_l2_normalised_backbone_feature_or_projection() -> None:
    torch.manual_seed(0)
    images = torch.randn(3, 3, 64, 64)
    for source, dim in (("backbone", 512), ("projection", 32)):
        encoder = Encoder(BACKBONE, pretrained=False, projection_dim=32, embedding=source).eval()
        vectors = encoder.embed(images)
        assert vectors.shape == (3, dim)
        assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)


# --- foundation backbones: ViTs built for the input size, hf-hub: names, weights through timm's loader ---------------

VIT = "test_vit3"  # a tiny ViT in timm, built for one input size (160 px by default) like DINOv2


def _vit_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(VIT).state_dict()  # at timm's default size, with a classifier, as hub files are


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The Hugging Face hub offline (no 30 s of connection retries) with an empty cache of its own."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_hub_model(cache: Path, repo: str, model: torch.nn.Module) -> None:
    """Leave ``model`` in the hub cache as repo ``repo``, as an earlier online download would (timm's own export)."""
    revision = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    timm.models.save_for_hf(model, str(folder / "snapshots" / revision), safe_serialization=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)


def test_vit_is_built_for_the_requested_input_size() -> None:
    images = torch.randn(2, 3, 96, 96)
    with pytest.raises(AssertionError):  # what `reid evaluate` hit: timm's default ViT is built for 160 px
        Encoder(VIT).embed(images)
    vectors = Encoder(VIT, image_size=96).eval().embed(images)
    assert vectors.shape == (2, 96) and torch.allclose(vectors.norm(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(ConfigError, match=r"model.image_size: backbone 'test_maxvit' cannot take 100 px input"):
        create_backbone("test_maxvit", False, image_size=100)  # its attention windows do not tile 100 px


def test_cnns_and_tagged_names_take_image_size_too() -> None:
    assert Encoder(BACKBONE, image_size=64).eval().embed(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    assert create_backbone(f"{VIT}.r160_in1k", False, image_size=96).pretrained_cfg["tag"] == "r160_in1k"


def test_local_file_loads_through_timm_and_adapts_to_the_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = _vit_state(seed=3)
    path = tmp_path / "vit.safetensors"
    save_file(saved, str(path))
    overlays: list[object] = []
    create_model = timm.create_model

    def recording_create_model(*args: object, **kwargs: object) -> torch.nn.Module:
        overlays.append(kwargs.get("pretrained_cfg_overlay"))
        return create_model(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", recording_create_model)
    loaded = create_backbone(VIT, str(path), image_size=160).state_dict()
    assert {"file": str(path), "source": None} in overlays
    assert all(torch.equal(loaded[k], saved[k]) for k in loaded)  # every tensor really came from the file
    resized = create_backbone(VIT, str(path), image_size=96).state_dict()
    assert resized["pos_embed"].shape[1] < saved["pos_embed"].shape[1]  # timm resampled it to 6 x 6 patches
    assert all(torch.equal(resized[k], saved[k]) for k in resized if k != "pos_embed")


def test_hf_hub_name_offline_is_an_error_naming_it(tmp_path: Path, offline_hub: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    name = "hf-hub:BVRA/MegaDescriptor-T-224"
    assert main(["export", "--backbone", name, "--out", str(tmp_path / "mega.ckpt")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"reid: error: model.backbone: could not create '{name}' for 224 px input") and "hub" in error


def test_hf_hub_name_uses_the_hub_cache_and_a_local_file_beats_the_hub(tmp_path: Path, offline_hub: Path) -> None:
    torch.manual_seed(4)
    hub_model = timm.create_model(VIT)
    _cache_hub_model(offline_hub, "someone/tiny-vit", hub_model)
    hub = hub_model.state_dict()
    from_hub = create_backbone("hf-hub:someone/tiny-vit", True, image_size=160).state_dict()
    assert all(torch.equal(from_hub[k], hub[k]) for k in from_hub)
    local = _vit_state(seed=5)
    save_file(local, str(tmp_path / "local.safetensors"))
    from_file = create_backbone("hf-hub:someone/tiny-vit", str(tmp_path / "local.safetensors"), 160).state_dict()
    assert all(torch.equal(from_file[k], local[k]) for k in from_file)


def test_hub_model_preprocesses_by_its_own_config(tmp_path: Path, offline_hub: Path) -> None:
    """The data module reads a hub model's mean and std from the hub's config, as the model built from it has them."""
    model = timm.create_model(VIT)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    _cache_hub_model(offline_hub, "someone/odd-vit", model)
    name = "hf-hub:someone/odd-vit"
    data = ReIDDataModule(str(tmp_path), backbone=name, image_size=160)
    assert data.preprocess() == Encoder(name, image_size=160).preprocess(160) == \
        Preprocess(160, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


def test_exported_vit_embeds_and_evaluates_at_its_size(tmp_path: Path, synth_dataset: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "vit96.ckpt"
    assert main(["export", "--backbone", VIT, "--image-size", "96", "--out", str(checkpoint)]) == 0
    embedder = Embedder.from_checkpoint(checkpoint)  # rebuilt at 96 px from the checkpoint's preprocessing
    vectors = embedder.embed(sorted(synth_dataset.glob("images/*/*.png"))[:3])
    assert vectors.shape == (3, 96) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset), "--json"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["closed_set"]["map5"] <= 1.0


def test_a_seeded_run_draws_the_same_random_numbers_whatever_the_weight_source(tmp_path: Path) -> None:
    """Loading a weights file builds the model once as far as the random generator can tell, so a seeded fit
    starts its head and its batches from the same draws as it did before weights were loaded this way."""
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in _reference_state().items()}, str(path))
    torch.manual_seed(0)
    timm.create_model(BACKBONE, num_classes=0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    create_backbone(BACKBONE, str(path), image_size=64)
    assert torch.equal(torch.rand(4), expected)


def test_embed_takes_pil_images_and_refuses_arrays_it_would_misread(tmp_path: Path) -> None:
    """A float array in [0, 1] was embedded as an almost black photo, and greyscale or RGBA arrays failed deep in the
    network; a PIL image of any mode is converted as a file would be."""
    from PIL import Image

    from reid.inference import export_encoder

    embedder = Embedder.from_checkpoint(export_encoder(tmp_path / "e.ckpt", "lcnet_050", pretrained=False,
                                                       image_size=48))
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    from_array, from_pil, from_grey_pil = embedder.embed([pixels, Image.fromarray(pixels),
                                                          Image.fromarray(pixels).convert("L")])
    assert np.allclose(from_array, from_pil) and from_grey_pil.shape == from_array.shape
    with pytest.raises(ValueError, match=r"H x W x 3 uint8 RGB arrays .* got a float64 array of shape \(40, 50, 3\)"):
        embedder.embed([pixels / 255.0])
    with pytest.raises(ValueError, match=r"got a uint8 array of shape \(40, 50\)"):
        embedder.embed([pixels[..., 0]])
    with pytest.raises(TypeError, match="got list"):
        embedder.embed([[1, 2, 3]])


@pytest.mark.parametrize(("backbone", "size"), [("lcnet_050", 48), ("resnet10t", 64), ("convnext_atto", 64),
                                                ("test_vit3", 96), ("mobilenetv2_100", 224)])
def test_the_data_modules_preprocessing_is_the_models(backbone: str, size: int) -> None:
    """A data module on its own resolves the preprocessing from the backbone's name, without building it; the
    checkpoint stores the built model's. They must agree, or a model would be trained on other pixels than it serves."""
    built = Encoder(backbone, False, 32, image_size=size).preprocess(size, ())
    assert Preprocess.of_backbone(backbone, size) == built


def test_a_vit_at_a_size_its_patch_does_not_divide_is_refused() -> None:
    """timm's patch embedding drops the pixels left over: at 60 px a 16 px patch never sees the photo's last 12 px."""
    with pytest.raises(ConfigError, match=r"backbone 'vit_tiny_patch16_224' cannot take 60 px input: its patches "
                                          r"leave the last 12 px of each side of a 60 px photo out; use 48 or 64"):
        create_backbone("vit_tiny_patch16_224", False, 60)
    with pytest.raises(ConfigError, match=r"'pit_ti_224' .* leave the last 2 px .* use 248 or 256"):
        create_backbone("pit_ti_224", False, 250)  # 16 px windows every 8 px
    create_backbone("pvt_v2_b0", False, 256)  # padded overlapping windows reach every pixel at this size


def test_a_pil_image_embeds_as_the_same_photo_read_from_a_file(tmp_path: Path) -> None:
    """16-bit data, transparency and the EXIF orientation are converted as the file decoder converts them."""
    import io

    from PIL import Image

    from reid.imageio import decode_image, rgb_array_of

    rng = np.random.default_rng(0)
    grey16 = Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16))
    rgba = Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8))
    rotated = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    for image, save in ((grey16, {}), (rgba, {}), (rotated, {"exif": exif.tobytes()})):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", **save)
        assert np.array_equal(rgb_array_of(Image.open(io.BytesIO(buffer.getvalue()))), decode_image(buffer.getvalue()))
