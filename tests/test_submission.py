"""Zindi submissions: `reid predict` writes what Zindi accepts, `reid score` scores it as Zindi does."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from reid.cli import main
from reid.inference import export_encoder
from reid.metrics import NEW_TURTLE
from tests.conftest import FIXTURES, write_image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_encoder(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", "lcnet_050", False, 48)


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def test_predict_on_real_zindi_test_csv_writes_490_rows_in_order(tmp_path: Path, checkpoint: Path,
                                                                  synth_dataset: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    queries = tmp_path / "zindi"
    queries.mkdir()
    shutil.copy(FIXTURES / "zindi_test" / "test.csv", queries / "test.csv")
    ids = [row["image_id"] for row in csv.DictReader((queries / "test.csv").open())]
    for i, image_id in enumerate(ids):
        write_image(queries / "images" / f"{image_id}.JPG", seed=i, size=(24, 24), suffix_format="JPEG")
    out = tmp_path / "submission.csv"
    assert main(["predict", "--checkpoint", str(checkpoint), "--gallery", str(synth_dataset), "--queries",
                 str(queries / "test.csv"), "--out", str(out), "--threshold", "0.5"]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["image_id", "prediction1", "prediction2", "prediction3", "prediction4", "prediction5"]
    assert [r[0] for r in rows[1:]] == ids and len(ids) == 490
    assert all(len(set(r[1:])) == 5 for r in rows[1:])
    # the file scores: answer truth = each row's own second prediction -> MAP@5 exactly 0.5
    truth = _write_csv(tmp_path / "truth.csv", [["image_id", "turtle_id"]] + [[r[0], r[2]] for r in rows[1:]])
    capsys.readouterr()
    assert main(["score", "--submission", str(out), "--truth", str(truth), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["map5"] == pytest.approx(0.5)


def test_score_tricky_cases_hand_computed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    submission = _write_csv(tmp_path / "s.csv", [
        ["image_id", "prediction1", "prediction2", "prediction3", "prediction4", "prediction5"],
        ["q1", "a", "b", "c", "d", "e"],              # right at 1 -> 1
        ["q2", "b", "b", "a", "c", "d"],              # duplicates count as positions -> 1/3
        ["q3", "x", NEW_TURTLE, "a", "b", "c"],       # new_turtle is a label -> 1/2
        ["q4", "a", "b", "c", "d", "e"],              # truth absent -> 0
        ["q5", "a", "a", "a", "a", "a"],              # credited once -> 1
    ])
    truth = _write_csv(tmp_path / "t.csv", [["image_id", "turtle_id"], ["q1", "a"], ["q2", "a"], ["q3", NEW_TURTLE],
                                            ["q4", "z"], ["q5", "a"]])
    assert main(["score", "--submission", str(submission), "--truth", str(truth), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["map5"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 0 + 1) / 5)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["image_id", "p1"], ["q1", "a"]], "columns must be"),
        ([["image_id", *[f"prediction{i}" for i in range(1, 6)]], ["q1", "a", "b", "c", "d", "e"]], "not answered"),
        ([["image_id", *[f"prediction{i}" for i in range(1, 6)]], ["q1", *"abcde"], ["q2", *"abcde"], ["zz", *"abcde"]],
         "image ids not in"),
        ([["image_id", *[f"prediction{i}" for i in range(1, 6)]], ["q1", *"abcde"], ["q1", *"abcde"], ["q2", *"abcde"]],
         "answered more than once"),
    ],
)
def test_score_rejects_malformed_submissions_with_exit_2(tmp_path: Path, rows: list[list[str]], message: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    submission = _write_csv(tmp_path / "s.csv", rows)
    truth = _write_csv(tmp_path / "t.csv", [["image_id", "turtle_id"], ["q1", "a"], ["q2", "b"]])
    assert main(["score", "--submission", str(submission), "--truth", str(truth)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("content", "message"), [
    (b'image_id\n"ID_1\nID_2\n', "cannot be parsed as CSV"),
    (b"image_id,x\nID_1,1\nID_2,1,2,3\n", "Expected 2 fields in line 3, saw 4"),
    (b"\xff\xfe\x00bad", "cannot be parsed as CSV"),
    (b"", "cannot be parsed as CSV"),
    (b"id\nID_1\n", "missing column(s) ['image_id']"),
])
def test_predict_with_a_malformed_test_csv_exits_2_naming_the_file(tmp_path: Path, checkpoint: Path,
                                                                   synth_dataset: Path, content: bytes, message: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    queries = tmp_path / "zindi" / "test.csv"
    queries.parent.mkdir()
    queries.write_bytes(content)
    assert main(["predict", "--checkpoint", str(checkpoint), "--gallery", str(synth_dataset),
                 "--queries", str(queries), "--out", str(tmp_path / "s.csv")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"reid: error: {queries}:") and message in error and "Traceback" not in error


def test_predict_with_too_small_gallery_explains(tmp_path: Path, checkpoint: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for identity in ("a", "b"):
        for i in range(2):
            write_image(tmp_path / "gallery" / identity / f"{i}.png", seed=i)
    write_image(tmp_path / "queries" / "q.png", seed=9)
    assert main(["predict", "--checkpoint", str(checkpoint), "--gallery", str(tmp_path / "gallery"),
                 "--queries", str(tmp_path / "queries"), "--out", str(tmp_path / "s.csv")]) == 2
    error = capsys.readouterr().err
    assert "gallery: 2 individuals, and no new_turtle threshold; a Zindi submission needs five" in error
    assert "or four with a new_turtle threshold" in error and not (tmp_path / "s.csv").exists()
    for identity in ("c", "d"):
        write_image(tmp_path / "gallery" / identity / "0.png", seed=5)
    assert main(["predict", "--checkpoint", str(checkpoint), "--gallery", str(tmp_path / "gallery"),
                 "--queries", str(tmp_path / "queries"), "--out", str(tmp_path / "s.csv"), "--threshold", "0.5"]) == 0
    row = (tmp_path / "s.csv").read_text().splitlines()[1].split(",")
    assert row[0] == "q" and set(row[1:]) == {"a", "b", "c", "d", "new_turtle"}, "four individuals and new_turtle"


def test_query_photos_sharing_a_name_are_refused_before_any_work(tmp_path: Path, checkpoint: Path,
                                                                  synth_dataset: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Ids are file stems: a folder holding 001.png and 001.jpg, or a labels.csv listing a/001.png and b/001.png,
    would give a submission answering '001' twice, which Zindi (and `reid score`) refuse."""
    write_image(tmp_path / "folder" / "001.png", seed=1)
    write_image(tmp_path / "folder" / "001.jpg", seed=2)
    write_image(tmp_path / "dataset" / "a" / "001.png", seed=3)
    write_image(tmp_path / "dataset" / "b" / "001.png", seed=4)
    (tmp_path / "dataset" / "labels.csv").write_text("path,identity\na/001.png,x\nb/001.png,y\n")
    for queries, paths in [(tmp_path / "folder", ["001.jpg", "001.png"]),
                           (tmp_path / "dataset", ["a/001.png", "b/001.png"])]:
        assert main(["predict", "--checkpoint", str(checkpoint), "--gallery", str(synth_dataset),
                     "--queries", str(queries), "--out", str(tmp_path / "s.csv")]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"reid: error: {queries}: 2 query photos share image ids, e.g. '001' for ")
        assert all(str(queries / path) in error for path in paths) and "rename the photos" in error
    assert not (tmp_path / "s.csv").exists()
