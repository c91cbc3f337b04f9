"""`reid evaluate` and `reid calibrate` on a checkpoint: the numbers a user reads, and the stored threshold."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from reid.cli import main
from reid.inference import Embedder, export_encoder


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return export_encoder(tmp_path / "tiny.ckpt", "lcnet_050", False, 48)


def test_evaluate_json_reports_closed_and_open_set(checkpoint: Path, synth_dataset: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    closed = report["closed_set"]
    assert {"top1", "top5", "queries", "protocol"} <= closed.keys()
    # the closed-set MAP@5 computed here by hand: each query's individuals ranked by their best gallery photo's cosine
    from reid.data.records import read_dataset
    from reid.evaluation import closed_and_open_protocols

    records = read_dataset(synth_dataset)
    vectors = Embedder.from_checkpoint(checkpoint).embed(records["path"].tolist())
    protocol, _ = closed_and_open_protocols(records)
    identities = records["identity"].to_numpy()
    precisions = []
    for query in protocol.queries:
        cosines = vectors[protocol.gallery] @ vectors[query]
        ranked = list(dict.fromkeys(identities[protocol.gallery][np.argsort(-cosines, kind="stable")]))[:5]
        precisions.append(1 / (ranked.index(identities[query]) + 1) if identities[query] in ranked else 0.0)
    assert closed["map5"] == pytest.approx(np.mean(precisions), abs=1e-4)
    assert closed["top1"] <= closed["map5"] <= closed["top5"]
    assert "map5" not in report  # the closed-set scores are reported once, under closed_set
    open_set = report["open_set"]
    assert {"known_accuracy", "unknown_accuracy", "balanced_accuracy"} <= open_set.keys()
    assert report["threshold_source"] == "oracle"  # an uncalibrated checkpoint says so
    assert "optimistic" in report["threshold_origin"]
    assert 0.0 <= open_set["auroc"] <= 1.0


def test_calibrate_writes_threshold_that_later_commands_use(checkpoint: Path, synth_dataset: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset)]) == 0
    threshold = Embedder.from_checkpoint(checkpoint).threshold
    assert threshold is not None and -1.0 <= threshold <= 1.0 + 1e-5
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["threshold"] == pytest.approx(threshold) and report["threshold_source"] == "checkpoint"
    assert report["threshold_origin"].startswith(f"reid calibrate on {synth_dataset}")


def test_calibrate_keeps_the_checkpoints_runner_up_weight_unless_told(checkpoint: Path, synth_dataset: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset),
                 "--runner-up-weight", "0.5"]) == 0
    assert Embedder.from_checkpoint(checkpoint).runner_up_weight == 0.5
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset)]) == 0
    embedder = Embedder.from_checkpoint(checkpoint)  # recalibrating keeps what the threshold is fitted for
    assert embedder.runner_up_weight == 0.5 and "0.5 x the runner-up's score" in embedder.threshold_origin
    capsys.readouterr()
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset),
                 "--runner-up-weight", "1.5"]) == 2
    assert "--runner-up-weight must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert Embedder.from_checkpoint(checkpoint).threshold == pytest.approx(embedder.threshold)  # nothing lost


def test_calibrate_fits_for_the_objective_asked_and_keeps_it(checkpoint: Path, synth_dataset: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--objective balanced_accuracy is stored with the threshold, named in its origin, and what a later calibrate
    (and evaluate's optimistic threshold) fits for unless told otherwise; an unknown objective changes nothing."""
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset),
                 "--objective", "balanced_accuracy"]) == 0
    assert "open-set balanced accuracy" in capsys.readouterr().out
    embedder = Embedder.from_checkpoint(checkpoint)
    assert embedder.threshold_objective == "balanced_accuracy"
    assert "open-set balanced accuracy" in embedder.threshold_origin
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset)]) == 0
    assert "open-set balanced accuracy" in Embedder.from_checkpoint(checkpoint).threshold_origin
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold_objective"] == "balanced_accuracy"
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
        main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset), "--objective", "accuracy"])
    assert exit_info.value.code == 2 and "invalid choice: 'accuracy'" in capsys.readouterr().err
    assert Embedder.from_checkpoint(checkpoint).threshold == pytest.approx(embedder.threshold)  # nothing lost


def test_bad_threshold_and_missing_checkpoint_exit_2(tmp_path: Path, checkpoint: Path, synth_dataset: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset), "--threshold", "2.5"]) == 2
    assert "--threshold must be in [-2, 2] (scores lie in [-1, 1]; the runner-up's share can lift a bar past them), " \
           "got 2.5" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.ckpt"), "--data", str(synth_dataset)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(checkpoint.parent), "--data", str(synth_dataset)]) == 2
    assert f"checkpoint {checkpoint.parent} is a folder: give the checkpoint file, e.g. {checkpoint}" in \
        capsys.readouterr().err
    (tmp_path / "notes.ckpt").write_text("a text file saved under the wrong name")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "notes.ckpt"), "--data", str(synth_dataset)]) == 2
    error = capsys.readouterr().err
    assert f"cannot read checkpoint {tmp_path / 'notes.ckpt'}: not a file written by torch.save" in error
    assert "weights_only" not in error, "torch's advice to load with weights_only=False would run code from the file"
    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "objects.ckpt")  # unpickling it could run code
    assert main(["evaluate", "--checkpoint", str(tmp_path / "objects.ckpt"), "--data", str(synth_dataset)]) == 2
    error = capsys.readouterr().err
    assert "holds Python objects beyond tensors and plain values" in error and "weights_only" not in error


def test_a_photo_that_fails_to_decode_mid_run_is_named_without_a_traceback(
        tmp_path: Path, checkpoint: Path, synth_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file cut short after its header passes the up-front check and fails in a DataLoader worker, whose error
    torch re-raises with the worker's whole traceback as its message: the user reads the file's name alone."""
    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data)
    broken = sorted((data / "images").rglob("*.png"))[5]
    broken.write_bytes(broken.read_bytes()[:300])
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--batch-size", "4"]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and "DataLoader worker" not in error
    assert error.splitlines()[-1].startswith(f"reid: error: {broken}: the image is corrupt or truncated")


@pytest.mark.parametrize(("command", "flags", "message"), [
    ("evaluate", ["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    ("evaluate", ["--query-fraction", "2"], "argument --query-fraction: must be between 0 and 1 (exclusive), got 2"),
    ("evaluate", ["--unknown-fraction", "0"], "argument --unknown-fraction: must be between 0 and 1"),
    ("calibrate", ["--query-fraction", "3"], "argument --query-fraction: must be between 0 and 1"),
    ("calibrate", ["--verify", "--candidates", "0"], "argument --candidates: must be at least 1, got 0"),
    ("calibrate", ["--verify", "--max-side", "10"], "argument --max-side: must be at least 64, got 10"),
    ("rsm", ["--individuals", "0", "--out", "rsm.png"], "argument --individuals: must be at least 1, got 0"),
    ("rsm", ["--per-individual", "x", "--out", "rsm.png"], "argument --per-individual: 'x' is not a whole number"),
])
def test_numbers_out_of_range_are_usage_errors_that_change_nothing(
        command: str, flags: list[str], message: str, checkpoint: Path, synth_dataset: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset)]) == 0
    stored = Embedder.from_checkpoint(checkpoint).threshold
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--checkpoint", str(checkpoint), "--data", str(synth_dataset), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert Embedder.from_checkpoint(checkpoint).threshold == stored


def test_calibrate_verify_that_fails_midway_leaves_the_checkpoint_as_it_was(
        checkpoint: Path, synth_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The similarity threshold is written together with the verification, never before it: an interrupted
    `calibrate --verify` (minutes of matching) must not leave a new threshold beside an old verification."""
    from reid import cli
    from reid.errors import ReIDError

    before = checkpoint.read_bytes()

    def interrupted(*_: object) -> None:
        raise ReIDError("interrupted while matching")

    monkeypatch.setattr(cli, "_calibrate_verification", interrupted)
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset), "--verify"]) == 2
    assert checkpoint.read_bytes() == before


def test_an_output_that_cannot_be_written_costs_no_result_and_no_traceback(
        tmp_path: Path, checkpoint: Path, synth_dataset: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out` into a folder not made yet is made; a disk that refuses the file (full, read-only, gone) ends in one
    error line with exit code 2, after the report was printed; a heatmap format matplotlib cannot write is refused
    before any photo is embedded."""
    out = tmp_path / "not" / "made" / "yet.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["closed_set"]["queries"] > 0
    capsys.readouterr()

    def full_disk(self: Path, data: bytes) -> int:
        raise OSError(28, "No space left on device")  # as CPython reports a failed write: with no file name

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(synth_dataset), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "closed set (" in captured.out, "the report is printed before the file is written"
    assert captured.err.endswith(f"\nreid: error: {out}: No space left on device\n") and "Traceback" not in captured.err
    assert list(out.parent.iterdir()) == [out], "the earlier results stay whole, and no temporary file is left"
    assert main(["rsm", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "never read"),
                 "--out", str(tmp_path / "rsm.jpgx")]) == 2
    assert "a heatmap is written as one of .png, .jpg" in capsys.readouterr().err


def test_rsm_writes_a_png(tmp_path: Path, checkpoint: Path, synth_dataset: Path) -> None:
    out = tmp_path / "rsm.png"
    assert main(["rsm", "--checkpoint", str(checkpoint), "--data", str(synth_dataset), "--out", str(out),
                 "--individuals", "4", "--per-individual", "3", "--by-view"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _with_split_column(synth_dataset: Path, data: Path, query_split: str) -> Path:
    """The synthetic set with a split column: every fourth photo of each individual in ``query_split``."""
    labels = (synth_dataset / "labels.csv").read_text().splitlines()
    rows = [f"{line},{query_split if i % 4 == 3 else 'train'}" for i, line in enumerate(labels[1:])]
    data.mkdir()
    (data / "labels.csv").write_text("\n".join([labels[0] + ",split", *rows]) + "\n")
    (data / "images").symlink_to(synth_dataset / "images")
    return data


def test_split_column_picks_queries_and_none_ignores_it(tmp_path: Path, checkpoint: Path, synth_dataset: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = _with_split_column(synth_dataset, tmp_path / "with_split", query_split="val")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data)]) == 2
    error = capsys.readouterr().err
    assert ("no photos with split 'test' to use as queries; the dataset's splits are ['train', 'val']: --query-split "
            "val picks another, --query-split none ignores the column") in error
    assert "embedding" not in error, "refused before any photo is embedded"
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(data), "--query-split", "val"]) == 2
    assert "--query-split none holds a seeded share of the individuals out instead" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--query-split", "val", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["closed_set"]["queries"] == 8 and report["closed_set"]["protocol"] == "split column: val vs rest"
    assert main(["calibrate", "--checkpoint", str(checkpoint), "--data", str(data), "--query-split", "none"]) == 0


def test_split_without_unknown_queries_reports_no_open_set(tmp_path: Path, checkpoint: Path, synth_dataset: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = _with_split_column(synth_dataset, tmp_path / "closed_only", query_split="test")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "open set: no query shows an individual missing from the gallery" in out and "nan" not in out
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["open_set"] is None


def test_a_split_of_new_individuals_only_reports_no_closed_set_and_writes_strict_json(
        tmp_path: Path, checkpoint: Path, synth_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The layout `reid calibrate` asks for (test photos of individuals not in train): nothing to score in the closed
    set, and no known query in the open set, so neither a 0.0000 nor a NaN in what is printed or written."""
    labels = (synth_dataset / "labels.csv").read_text().splitlines()
    identities = sorted({line.split(",")[1] for line in labels[1:]})
    new = set(identities[-2:])
    data = tmp_path / "new_only"
    data.mkdir()
    (data / "labels.csv").write_text("\n".join(
        [labels[0] + ",split", *[f"{line},{'test' if line.split(',')[1] in new else 'train'}" for line in labels[1:]]])
        + "\n")
    (data / "images").symlink_to(synth_dataset / "images")
    out = tmp_path / "results.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "closed set: no query shows an individual of the gallery" in printed
    assert "known n/a" in printed and "nan" not in printed.lower() and "MAP@5 0.0000  top-1" not in printed
    report = json.loads(out.read_text(), parse_constant=lambda constant: pytest.fail(f"{constant} in the JSON"))
    assert report["closed_set"] is None and report["open_set"]["known_accuracy"] is None
    assert report["open_set"]["queries"] == sum(line.split(",")[1] in new for line in labels[1:])


@pytest.mark.parametrize(("command", "example"), [
    (["evaluate", "--data", "D", "--out"], "results.json"),
    (["predict", "--gallery", "D", "--queries", "D", "--out"], "submission.csv"),
    (["predict", "--gallery", "D", "--queries", "D", "--out", "x.csv", "--report"], "report.json"),
    (["rsm", "--data", "D", "--out"], "rsm.png"),
    (["explain", "--query", "q.jpg", "--photo", "p.jpg", "--out"], "explain.png"),
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
        tmp_path: Path, checkpoint: Path, command: list[str], example: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A folder given as the file, or a path under a file, ended in a traceback after every photo was embedded."""
    folder, afile = tmp_path / "results", tmp_path / "notes.txt"
    folder.mkdir()
    afile.write_text("a file")
    for out, problem in [(folder, f"{folder} is a folder: name the file to write, e.g. {folder / example}"),
                         (afile / example, f"{afile / example}: {afile} is a file, not a folder")]:
        with pytest.raises(SystemExit) as exit_info:
            main([*command[:1], "--checkpoint", str(checkpoint), *command[1:], str(out)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": {problem}")
