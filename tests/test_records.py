"""Dataset readers: every layout becomes the same record table; every mistake names its file and row."""

from __future__ import annotations

from pathlib import Path

import pytest

from reid.data.records import RECORD_COLUMNS, read_dataset
from reid.errors import DatasetError
from tests.conftest import write_image


def test_zindi_folder_reads_real_rows_with_normalised_views(zindi_folder: Path) -> None:
    records = read_dataset(zindi_folder)
    assert list(records.columns) == RECORD_COLUMNS
    # 12 train rows + 4 extra rows; test.csv rows are queries, not gallery records
    assert len(records) == 16
    train = records.iloc[:12]
    assert set(train["view"]) == {"top", "left", "right"}  # the raw file says "Top", "Right", "Left" too
    assert records.loc[records["image_id"] == "ID_RVATH2HZ", "view"].item() == "right"
    extra = records.iloc[12:]
    assert set(extra["identity"]) == {"t_id_he7JTQxO"} and set(extra["view"]) == {""}
    assert all(Path(p).is_file() for p in records["path"])  # .JPG and .jpg both matched


def test_zindi_missing_image_names_file_and_row(zindi_folder: Path) -> None:
    next((zindi_folder / "images").glob("ID_LM6S0B1M.*")).unlink()
    with pytest.raises(DatasetError, match=r"train\.csv row 6: image 'ID_LM6S0B1M' not found"):
        read_dataset(zindi_folder)


def test_labels_csv_with_views_and_splits(tmp_path: Path) -> None:
    for i in range(4):
        write_image(tmp_path / "img" / f"{i}.png", seed=i)
    (tmp_path / "labels.csv").write_text(
        "path,identity,view,split\nimg/0.png,a,Top,train\nimg/1.png,a,left,val\nimg/2.png,b, RIGHT ,train\nimg/3.png,b,,test\n"
    )
    records = read_dataset(tmp_path)
    assert records["identity"].tolist() == ["a", "a", "b", "b"]
    assert records["view"].tolist() == ["top", "left", "right", ""]
    assert records["split"].tolist() == ["train", "val", "train", "test"]


def test_folder_per_individual(tmp_path: Path) -> None:
    for identity in ("alpha", "beta"):
        for i in range(3):
            write_image(tmp_path / identity / f"{i}.PNG", seed=i, suffix_format="PNG")
    (tmp_path / "beta" / "notes.txt").write_text("not an image")
    records = read_dataset(tmp_path)
    assert records.groupby("identity").size().to_dict() == {"alpha": 3, "beta": 3}


def test_photos_in_sub_folders_or_loose_in_the_dataset_are_counted_not_dropped_silently(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A field archive keeps each encounter in a dated folder under its individual, and a dataset given one folder
    too high looks the same: neither is read as it stands, and neither is dropped without a word."""
    write_image(tmp_path / "t001" / "a.png", seed=1)
    write_image(tmp_path / "t001" / "2023-07-14 dive" / "b.png", seed=2)
    write_image(tmp_path / "t002" / "c.png", seed=3)
    write_image(tmp_path / "t002" / "@eaDir" / "c.png" / "SYNOPHOTO_THUMB.png", seed=4)  # a NAS's thumbnails
    write_image(tmp_path / "stray.png", seed=5)
    with caplog.at_level("WARNING", logger="reid.data.records"):
        records = read_dataset(tmp_path)
    assert records[["identity", "image_id"]].values.tolist() == [["t001", "t001/a"], ["t002", "t002/c"]]
    assert "skipped 1 photos directly in" in caplog.text and "stray.png" in caplog.text
    assert "skipped 1 photos in sub-folders of the individuals' folders (e.g. t001/2023-07-14 dive/b.png)" in caplog.text
    one_too_high = tmp_path / "upload"
    write_image(one_too_high / "images" / "t003" / "d.png", seed=6)
    write_image(one_too_high / "images" / "t004" / "e.png", seed=7)
    with pytest.raises(DatasetError, match=r"one level deeper \(e\.g\. images/t003/d\.png\): if images/ holds one "
                                           r"folder per individual, give .*upload/images as the dataset"):
        read_dataset(one_too_high)


def test_every_decodable_format_is_read_and_other_files_are_counted(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """GIF and JFIF photos are read like any other; an individual of .heic photos (which nothing here decodes) is
    not dropped without a word."""
    write_image(tmp_path / "t1" / "a.png", seed=1)
    write_image(tmp_path / "t2" / "b.gif", seed=2, suffix_format="GIF")
    write_image(tmp_path / "t2" / "c.jfif", seed=3, suffix_format="JPEG")
    (tmp_path / "t3").mkdir()
    (tmp_path / "t3" / "IMG_0001.HEIC").write_bytes(b"not decodable here")
    (tmp_path / "t3" / ".DS_Store").write_bytes(b"")
    with caplog.at_level("WARNING", logger="reid.data.records"):
        records = read_dataset(tmp_path)
    assert records["identity"].tolist() == ["t1", "t2", "t2"]
    assert "skipped 1 files that are not photos turtle-reid reads (1 .heic; e.g. " in caplog.text
    assert "IMG_0001.HEIC" in caplog.text and ".DS_Store" not in caplog.text


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("img/0.png,a\nimg/missing.png,b\n", r"labels\.csv row 3: image file .*missing\.png does not exist"),
        ("img/0.png,a\nimg/1.png,\n", r"labels\.csv row 3: empty identity"),
        ("img/0.png,a\nimg/0.png,b\n", r"labels\.csv row 3: duplicate path"),
        ("img/0.png,a\nimg/bad.png,b\n", r"labels\.csv row 3: .*bad\.png: not a recognisable image"),
    ],
)
def test_bad_labels_csv_rows_are_named(tmp_path: Path, rows: str, message: str) -> None:
    write_image(tmp_path / "img" / "0.png", seed=0)
    write_image(tmp_path / "img" / "1.png", seed=1)
    (tmp_path / "img" / "bad.png").write_bytes(b"this is text, not a PNG")
    (tmp_path / "labels.csv").write_text("path,identity\n" + rows)
    with pytest.raises(DatasetError, match=message):
        read_dataset(tmp_path)


def test_missing_column_and_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("file,who\nx.png,a\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['path', 'identity'\]"):
        read_dataset(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="unknown dataset format"):
        read_dataset(empty)
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "nowhere")


def test_a_photo_over_the_pixel_limit_is_named_with_the_variable_that_raises_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_image(tmp_path / "a" / "0.png", seed=0, size=(40, 32))
    write_image(tmp_path / "a" / "1.png", seed=1, size=(40, 32))
    monkeypatch.setenv("REID_MAX_PIXELS", "1000")
    with pytest.raises(DatasetError, match=r"0\.png: image is 40x32 = 1280 pixels, over the limit of 1000 "
                                           r"\(REID_MAX_PIXELS raises the limit\)$"):
        read_dataset(tmp_path)
    monkeypatch.setenv("REID_MAX_PIXELS", "1280")
    assert len(read_dataset(tmp_path)) == 2
