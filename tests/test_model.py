"""Encoder construction and starting weights from local files (what users do offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from reid.errors import WeightsError
from reid.model import Encoder, create_backbone

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
    with pytest.raises(WeightsError, match="cannot read weights file"):
        create_backbone(BACKBONE, str(tmp_path / "junk.pth"))
    with pytest.raises(WeightsError, match="unknown timm backbone 'resnet_nonexistent'"):
        create_backbone("resnet_nonexistent", False)


def test_embedding_is_l2_normalised_backbone_feature_or_projection() -> None:
    torch.manual_seed(0)
    images = torch.randn(3, 3, 64, 64)
    for source, dim in (("backbone", 512), ("projection", 32)):
        encoder = Encoder(BACKBONE, pretrained=False, projection_dim=32, embedding=source).eval()
        vectors = encoder.embed(images)
        assert vectors.shape == (3, dim)
        assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
