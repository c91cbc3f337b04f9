"""End to end: `reid fit` from a YAML config on synthetic data gives a checkpoint that embeds images later."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from reid.cli import main
from reid.data.transforms import Preprocess
from reid.inference import Embedder, export_encoder, read_checkpoint
from reid.module import ReIDModule

REPO = Path(__file__).resolve().parents[1]


def _fit_args(root: Path, data: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--data.root", str(data), "--trainer.default_root_dir", str(root),
        "--model.backbone", "lcnet_050", "--model.pretrained", "false", "--model.image_size", "48",
        "--data.individuals_per_batch", "4", "--data.batches_per_epoch", "3", "--data.num_workers", "0",
        "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", *extra,
    ]


def test_fit_keeps_best_checkpoint_by_map5_and_it_embeds_like_training(tmp_path: Path, synth_dataset: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_fit_args(tmp_path, synth_dataset)) == 0
    best = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
    printed = capsys.readouterr().out
    assert f"best checkpoint: {best}" in printed
    assert f"next: reid evaluate --checkpoint {best} --data {synth_dataset} --query-split none" in printed
    checkpoint = read_checkpoint(best)
    callback_state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert callback_state["monitor"] == "val_map5"
    assert 0.0 <= float(callback_state["best_model_score"]) <= 1.0
    meta = checkpoint["reid"]
    assert meta["backbone"] == "lcnet_050" and meta["preprocess"]["image_size"] == 48
    assert meta["config"]["data"]["root"] == str(synth_dataset) and meta["version"]
    # the data module was given the model's backbone and size (linked), and resolved the model's preprocessing
    assert (meta["config"]["data"]["backbone"], meta["config"]["data"]["image_size"]) == ("lcnet_050", 48)
    assert Preprocess.of_backbone("lcnet_050", 48).to_dict() == meta["preprocess"]
    # fit -> serve answers new_turtle with no extra step: the threshold was fitted on held-out individuals
    assert -1.0 <= meta["threshold"] <= 1.0 + 1e-5  # a bar just above the best score seen, where flagging all is best
    assert meta["threshold_origin"].startswith("reid fit, validation of epoch") and "held out" in meta["threshold_origin"]
    # an RSM heatmap per validation, beside the logs
    assert len(list((best.parents[1] / "rsm").glob("epoch_*.png"))) == 2

    embedder = Embedder.from_checkpoint(best)
    photos = sorted(synth_dataset.glob("images/*/*.png"))[:3]
    vectors = embedder.embed(photos)
    assert vectors.shape == (3, embedder.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(embedder.embed(photos), vectors, atol=1e-6)  # deterministic at inference
    assert embedder.threshold == pytest.approx(meta["threshold"])

    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(best), "--data", str(synth_dataset), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["threshold_source"] == "checkpoint" and report["threshold_origin"] == meta["threshold_origin"]

    # `reid validate` reproduces the score the checkpoint was kept for, printed once (not once per loader)
    assert main(["validate", *_fit_args(tmp_path, synth_dataset)[1:], "--ckpt_path", str(best)]) == 0
    table = capsys.readouterr().out
    assert "DataLoader 1" not in table
    [printed] = re.findall(r"val_map5\s*│\s*([0-9.]+)", table)
    assert float(printed) == pytest.approx(float(callback_state["best_model_score"]), abs=1e-6)


def test_fit_with_validation_cut_short_still_scores_and_keeps_a_checkpoint(tmp_path: Path, synth_dataset: Path) -> None:
    """Two batches of four photos a validation: enough gallery photos and queries to score (gallery and queries are
    interleaved), so val_map5 is logged and the best checkpoint kept."""
    assert main(_fit_args(tmp_path, synth_dataset, "--trainer.limit_val_batches", "2", "--data.eval_batch_size", "4",
                          "--trainer.max_epochs", "1")) == 0
    best = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
    callbacks = read_checkpoint(best)["callbacks"]
    state = next(value for key, value in callbacks.items() if key.startswith("ModelCheckpoint"))
    assert 0.0 <= float(state["best_model_score"]) <= 1.0


def test_validate_without_a_checkpoint_says_it_scores_the_starting_weights(tmp_path: Path, synth_dataset: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="reid.cli"):
        assert main(["validate", *_fit_args(tmp_path, synth_dataset)[1:]]) == 0
    assert "no --ckpt_path: validating the starting weights (model.pretrained False), not a trained model" in caplog.text


def test_print_config_shows_overrides(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(tmp_path, tmp_path / "somewhere", "--print_config"))
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["backbone"] == "lcnet_050" and config["trainer"]["max_epochs"] == 2


def test_fit_on_missing_dataset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_fit_args(tmp_path, tmp_path / "nowhere")) == 2
    assert "reid: error: dataset folder" in capsys.readouterr().err
    for verbose in (["-v"], ["-vv"], ["--verb"]):  # reid's own flag before Lightning's command, as argparse spells it
        assert main([*verbose, *_fit_args(tmp_path, tmp_path / "nowhere")]) == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith("reid: error: dataset folder")
    assert main([*_fit_args(tmp_path, tmp_path / "nowhere"), "-v"]) == 2
    assert "reid's -v goes before the command: reid -v fit ..." in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # reid's own help, with every command
        main(["-h", "fit"])
    assert exit_info.value.code == 0 and "validate" in capsys.readouterr().out
    assert not (tmp_path / "lightning_logs").exists(), "no empty version_N folder for a run that never started"


@pytest.mark.parametrize("override", [["--data.individuals_per_batch", "100"], ["--data.photos_per_individual", "1"],
                                      ["--data.batches_per_epoch", "0"]])
def test_batch_settings_the_data_cannot_fill_leave_no_empty_run_folder(tmp_path: Path, synth_dataset: Path,
                                                                      override: list[str]) -> None:
    assert main(_fit_args(tmp_path, synth_dataset, *override)) == 2
    assert not (tmp_path / "lightning_logs").exists(), "no empty version_N folder for a run that never started"


@pytest.mark.parametrize(("override", "message"), [
    (["--model.lr", "-1"], "model.lr must be > 0, got -1.0"),
    (["--model.temperature", "0"], "model.temperature must be > 0, got 0.0"),
    (["--model.image_size", "0"], "model.image_size must be at least 16 (pixels), got 0"),
    (["--model.backbone", "resnet_nonexistent"], "model.backbone: unknown timm backbone 'resnet_nonexistent'"),
    (["--model.backbone", "test_maxvit", "--model.image_size", "100"],
     "model.image_size: backbone 'test_maxvit' cannot take 100 px input"),
    (["--model.backbone", "test_vit3", "--model.image_size", "96", "--model.test_image_size", "128"],
     "model.test_image_size: test_vit3 cannot embed 128 px photos when built for model.image_size 96"),
    (["--model.runner_up_weight", "2"], "model.runner_up_weight must be in [0, 1], got 2.0"),
    (["--model.test_crops", "[1.5]"], "model.test_crops: test crops must be fractions in (0, 1) of the photo's sides, "
                                      "got [1.5]"),
    (["--data.individuals_per_batch", "100"], "data.individuals_per_batch must be at most 8"),
    (["--data.photos_per_individual", "1"], "data.photos_per_individual must be >= 2"),
    (["--data.val_fraction", "1.5"], "data.val_fraction must be between 0 and 1 (exclusive), got 1.5"),
    (["--data.augmentations", "[{type: NoSuchTransform}]"], "data.augmentations: unknown albumentations transform"),
    (["--data.augmentations", "[{type: GaussianBlur, blur_limt: [3, 5]}]"],
     "data.augmentations: {'type': 'GaussianBlur', 'blur_limt': [3, 5]}: Argument(s) 'blur_limt' are not valid for "
     "transform GaussianBlur (a misspelt argument?)"),
    # validation cut to one photo (a gallery photo): nothing to score, and without val_map5 no checkpoint to keep
    (["--trainer.fast_dev_run", "true", "--data.eval_batch_size", "1"],
     "validation embedded 0 query and 1 gallery photos: scoring needs both; raise --trainer.limit_val_batches"),
    (["--trainer.limit_val_batches", "0.01"], "You requested to check 0.01 of the `val_dataloader` but 0.01 * 1 < 1"),
    # settings under which a fit would keep no validated checkpoint, refused before training
    (["--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "2"],
     "trainer.max_epochs 1 with trainer.check_val_every_n_epoch 2: the model is validated, and the best one kept, "
     "every 2 epochs, so no epoch would be validated and no best.ckpt written; set --trainer.max_epochs to a multiple "
     "of 2 (e.g. 2), or --trainer.check_val_every_n_epoch 1"),
    (["--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "2"],
     "trainer.max_epochs 3 with trainer.check_val_every_n_epoch 2: the model is validated, and the best one kept, "
     "every 2 epochs, so the last 1 epoch(s) would be trained and never kept"),
    (["--trainer.limit_val_batches", "0"], "trainer.limit_val_batches 0 turns validation off"),
    (["--trainer.fast_dev_run", "true", "--verify", "true"], "--verify true needs a best checkpoint, and "
                                                             "trainer.fast_dev_run saves none"),
    (["--ckpt_path", "last"], "--ckpt_path last would look in this new run's own folder, which holds no checkpoint"),
    (["--trainer.max_epochs", "0"], "trainer.max_epochs 0 trains nothing"),
    (["--checkpoint.save_last", "true"], "checkpoint.save_last: reid fit always writes the latest epoch to last.ckpt"),
    (["--trainer.max_steps", "1", "--verify", "true"], "no best checkpoint was kept, so --verify had nothing to "
                                                       "verify: the fit ended (max_steps, max_time) before its first "
                                                       "validation"),
])
def test_impossible_settings_exit_2_naming_the_key(tmp_path: Path, synth_dataset: Path, override: list[str],
                                                   message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every impossible setting is one ``reid: error:`` line naming its config key, before any training step."""
    assert main(_fit_args(tmp_path, synth_dataset, *override)) == 2
    error = capsys.readouterr().err
    # (Lightning's log handlers still point at an earlier test's closed stderr, which logging reports; a user's
    # terminal has no such thing, so only the last line and the absence of our exception's traceback count.)
    assert error.strip().splitlines()[-1].startswith(f"reid: error: {message}")
    assert "ConfigError" not in error and "WeightsError" not in error


def test_an_unknown_threshold_objective_exits_2_naming_the_key(tmp_path: Path, synth_dataset: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A choice outside the list is refused by the config parser itself, naming the key and the choices, in one
    line (not after the hundred lines of usage jsonargparse prints)."""
    assert main(_fit_args(tmp_path, synth_dataset, "--model.threshold_objective", "accuracy")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith('reid: error: Parser key "model.threshold_objective"') and "balanced_accuracy" in error
    assert error.endswith("(reid fit --help lists every option)")
    assert main(_fit_args(tmp_path, synth_dataset, "--model.temprature", "0.1")) == 2  # a misspelt key
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "reid: error: unrecognized arguments: --model.temprature 0.1 (reid fit --help lists every option)")


def test_a_fit_from_the_shell_prints_each_lightning_line_once(tmp_path: Path, synth_dataset: Path) -> None:
    """Lightning's messages ("GPU available: ...") and ours share stderr without doubling (they printed twice: once
    through Lightning's own handler, once through the root handler the CLI sets up)."""
    command = [sys.executable, "-m", "reid.cli", *_fit_args(tmp_path, synth_dataset, "--data.individuals_per_batch",
                                                            "100")]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert finished.returncode == 2
    lines = finished.stderr.splitlines()
    assert sum("GPU available:" in line for line in lines) == 1, finished.stderr
    assert sum("Seed set to 0" in line for line in lines) == 1, finished.stderr
    assert lines[-1].startswith("reid: error: data.individuals_per_batch must be at most 8")


def test_ctrl_c_mid_fit_names_the_best_checkpoint_so_far_and_how_to_resume(tmp_path: Path, synth_dataset: Path) -> None:
    command = [sys.executable, "-m", "reid.cli", *_fit_args(tmp_path, synth_dataset, "--trainer.max_epochs", "3"),
               "--trainer.callbacks+=tests.callbacks.CtrlCInSecondEpoch"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert finished.returncode == 130 and "Traceback" not in finished.stderr, finished.stderr
    assert finished.stderr.rstrip().endswith("reid: interrupted")
    assert (f"interrupted: the best checkpoint so far is {checkpoints / 'best.ckpt'}; resume the fit with "
            f"--ckpt_path {checkpoints / 'last.ckpt'}") in finished.stderr
    resumed = main(_fit_args(tmp_path, synth_dataset, "--trainer.max_epochs", "3",
                             "--ckpt_path", str(checkpoints / "last.ckpt")))
    assert resumed == 0 and (tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "best.ckpt").is_file()


def test_last_ckpt_is_the_latest_epoch_and_a_second_fit_into_one_folder_keeps_the_first_ones_best(
        tmp_path: Path, synth_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A resume goes on from last.ckpt: it once stayed at the best epoch, and the epochs after it were trained again.
    Two fits sharing a folder (no logger, or one --checkpoint.dirpath) once replaced the first fit's best.ckpt."""
    arguments = _fit_args(tmp_path, synth_dataset, "--trainer.logger", "false",
                          "--trainer.callbacks+=tests.callbacks.FirstEpochScoresBest")
    assert main(arguments) == 0
    checkpoints = tmp_path / "checkpoints"
    best, last = read_checkpoint(checkpoints / "best.ckpt"), read_checkpoint(checkpoints / "last.ckpt")
    assert (best["epoch"], last["epoch"]) == (0, 1) and last["global_step"] == 6  # 3 batches an epoch
    first = (checkpoints / "best.ckpt").read_bytes()
    capsys.readouterr()
    assert main(arguments) == 0
    assert f"best checkpoint: {checkpoints / 'best-v1.ckpt'}" in capsys.readouterr().out
    assert (checkpoints / "best.ckpt").read_bytes() == first


def test_a_fit_called_from_python_ignores_the_callers_own_arguments(tmp_path: Path, synth_dataset: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`make demo` runs `reid fit` in its own process (`python -m reid.demo --out demo`): Lightning warned that
    "args" and the command line were both given, and the caller's arguments must survive the call."""
    monkeypatch.setattr(sys, "argv", ["reid-demo", "--out", "demo"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(_fit_args(tmp_path, synth_dataset, "--data.individuals_per_batch", "100")) == 2
    assert not [w for w in caught if "args parameter" in str(w.message)]
    assert sys.argv == ["reid-demo", "--out", "demo"]


@pytest.mark.parametrize("key, value", [("verify_candidates", "0"), ("verify_fallback", "-1")])
def test_verify_settings_out_of_range_exit_2_naming_the_key(tmp_path: Path, synth_dataset: Path, key: str, value: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_fit_args(tmp_path, synth_dataset, "--verify", "true", f"--{key}", value)) == 2
    assert f'key "{key}"' in capsys.readouterr().err


def test_verify_false_turns_off_a_configs_verify_step_saying_its_settings_are_ignored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    """turtles_cpu.yaml sets verify_fallback: 20; `--verify false` alone turns the verify step off (the dataset here is
    missing, so the command stops at that, the first mistake left, before any training)."""
    with caplog.at_level("WARNING", logger="reid.cli"):
        assert main(["fit", "--config", str(REPO / "configs" / "turtles_cpu.yaml"), "--data.root", str(tmp_path / "no"),
                     "--trainer.default_root_dir", str(tmp_path), "--verify", "false", "--verify_candidates", "40"]) == 2
    assert "reid: error: dataset folder" in capsys.readouterr().err
    assert ("verify_fallback 20 and verify_candidates 40: ignored, as settings of the verify step, which runs only "
            "with --verify true") in caplog.text


def test_resuming_from_what_is_not_a_training_checkpoint_exit_2_before_training(
        tmp_path: Path, synth_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    exported = export_encoder(tmp_path / "frozen.ckpt", "lcnet_050", False, 48)
    for path, says in [(tmp_path / "missing.ckpt", "no such checkpoint file"),
                       (tmp_path / "notes.txt", "not a file written by torch.save"),
                       (exported, "holds no training state to resume from")]:
        assert main(_fit_args(tmp_path, synth_dataset, "--ckpt_path", str(path))) == 2
        last = capsys.readouterr().err.splitlines()[-1]
        assert last.startswith(f"reid: error: --ckpt_path {path}") and says in last
    assert not (tmp_path / "lightning_logs").exists()  # refused before any training


@pytest.mark.parametrize("loss", ["supcon", "subcenter_arcface"])
def test_other_losses_and_open_set_split_train(tmp_path: Path, synth_dataset: Path, loss: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_fit_args(tmp_path, synth_dataset, "--model.loss", loss, "--data.split", "individual",
                          "--trainer.max_epochs", "1")) == 0
    # held-out individuals are enrolled for validation, so they can be found (not a forced 0) and a threshold can be
    # fitted on them. Whether 3 steps from random weights already find them is up to CPU arithmetic, whose order
    # varies from run to run (a collapsed embedding ties every photo and scores 0): the score is only bounded.
    best = read_checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt")
    score = next(v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint"))["best_model_score"]
    assert 0.0 <= float(score) <= 1.0
    assert best["reid"]["threshold"] is not None and "held out" in best["reid"]["threshold_origin"]
    assert best["reid"]["config"]["model"]["loss"] == loss
    # loaded the Lightning way, and validated on data with other individuals (the loss is not used there)
    path = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
    assert ReIDModule.load_from_checkpoint(path).hparams.loss == loss
    assert main(["validate", *_fit_args(tmp_path, synth_dataset, "--model.loss", loss, "--ckpt_path", str(path))[1:],
                 "--data.split", "image"]) == 0


def test_resuming_arcface_on_other_individuals_exit_2_before_a_new_run_folder(
        tmp_path: Path, synth_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from reid.data.synth import generate_synthetic_dataset

    arcface = ("--model.loss", "subcenter_arcface")
    assert main(_fit_args(tmp_path, synth_dataset, *arcface, "--trainer.max_epochs", "1")) == 0
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    fewer = tmp_path / "six"
    generate_synthetic_dataset(fewer, individuals=6, images_per_individual=4, seed=1, image_size=64, progress=False)
    capsys.readouterr()
    assert main(_fit_args(tmp_path, fewer, *arcface, "--ckpt_path", str(last))) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "reid: error: this checkpoint's sub-center ArcFace learnt 8 individuals, and the data has 6: resume on the data "
        "it was trained on, or start a new fit from its weights with --model.pretrained")
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]  # no empty version_1


def test_a_trained_checkpoint_loads_without_its_starting_weights_file(tmp_path: Path, synth_dataset: Path) -> None:
    """load_from_checkpoint rebuilt the starting weights, so it failed once that file was moved (and downloaded
    them for imagenet-offline on a machine with an empty cache)."""
    import timm

    start = tmp_path / "start.pth"
    torch.save(timm.create_model("lcnet_050", num_classes=0).state_dict(), start)
    assert main(_fit_args(tmp_path, synth_dataset, "--model.pretrained", str(start), "--trainer.max_epochs", "1")) == 0
    start.unlink()
    module = ReIDModule.load_from_checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt")
    assert module.hparams.backbone == "lcnet_050"


def test_a_larger_test_size_is_what_validation_and_the_checkpoint_use(tmp_path: Path, synth_dataset: Path) -> None:
    assert main(_fit_args(tmp_path, synth_dataset, "--model.test_image_size", "64", "--trainer.max_epochs", "1")) == 0
    meta = read_checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt")["reid"]
    assert meta["preprocess"]["image_size"] == 64 and meta["config"]["model"]["image_size"] == 48
    assert meta["config"]["data"]["test_image_size"] == 64  # linked from the model
    assert Embedder.from_checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
                                    ).preprocess.image_size == 64


def test_fit_with_verify_stores_verification_that_later_commands_use(tmp_path: Path, synth_dataset: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """fit --verify -> evaluate/serve verify by default, with a threshold on fused scores fitted on held-out
    individuals: no `reid calibrate --verify` step in between. Both thresholds are fitted with, and stored with, the
    runner-up weight, which evaluate then applies, and fitted for the objective the config names."""
    assert main(_fit_args(tmp_path, synth_dataset, "--verify", "true", "--trainer.max_epochs", "1",
                          "--model.runner_up_weight", "0.5", "--verify_candidates", "8", "--verify_fallback", "3",
                          "--model.threshold_objective", "balanced_accuracy")) == 0
    best = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
    printed = capsys.readouterr()
    assert f"verification written to {best}" in printed.out
    assert "verifying validation photos" in printed.err  # minutes of matching on real photos: a progress bar
    meta = read_checkpoint(best)["reid"]
    verification = meta["verification"]
    assert verification["fusion"]["candidates"] == 8  # what the service and evaluate will verify per query
    assert verification["fusion"]["fallback"]["top"] == 3
    assert verification["fusion"]["inlier_floor"] == 8  # counts random matches reach are read as none
    assert "ASIFT fallback on the 3" in verification["threshold_origin"]
    assert verification["threshold_origin"].startswith("reid fit --verify, fusion learnt on the")
    assert 0.0 <= verification["threshold"] <= 1.0 + 1e-5 and "held out of the gallery" in verification["threshold_origin"]
    assert meta["threshold_origin"].startswith("reid fit, validation of epoch")  # the similarity threshold stays
    assert meta["runner_up_weight"] == verification["runner_up_weight"] == 0.5
    assert "0.5 x the runner-up's score" in meta["threshold_origin"] and "runner-up" in verification["threshold_origin"]
    assert meta["threshold_objective"] == "balanced_accuracy"
    assert all("fitted for balanced accuracy" in origin for origin in (meta["threshold_origin"],
                                                                       verification["threshold_origin"]))

    assert main(["evaluate", "--checkpoint", str(best), "--data", str(synth_dataset), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] is True and report["threshold"] == pytest.approx(verification["threshold"])
    assert report["runner_up_weight"] == 0.5



def test_a_trained_module_embeds_as_the_embedder_does_through_lightnings_conventions(tmp_path: Path,
                                                                                    synth_dataset: Path) -> None:
    """model(images) and trainer.predict work, and give the embeddings `reid evaluate` and the service use."""
    import lightning as L

    from reid.data.records import read_dataset
    from reid.imageio import decode_image

    assert main(_fit_args(tmp_path, synth_dataset, "--trainer.max_epochs", "1")) == 0
    best = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
    module = ReIDModule.load_from_checkpoint(best).eval()
    embedder = Embedder.from_checkpoint(best)
    paths = read_dataset(synth_dataset)["path"].tolist()[:6]
    expected = embedder.embed(paths)
    transform = embedder.preprocess.eval_transform()
    batch = torch.stack([transform(image=decode_image(path))["image"] for path in paths])  # B x V x 3 x H x W
    with torch.no_grad():
        assert np.allclose(module(batch).numpy(), expected, atol=1e-5)
        assert np.allclose(module(batch[:, 0]).numpy(), expected, atol=1e-5)  # one view: B x 3 x H x W
    predicted = L.Trainer(logger=False, enable_progress_bar=False).predict(module, [batch])
    assert np.allclose(predicted[0].numpy(), expected, atol=1e-5)
