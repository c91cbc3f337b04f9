"""One data folder, one process, one truth: a second server, an offline enrolment or a re-index cannot write behind a
running server's back, a crash leaves nothing half-written, and ``reid serve`` says when (and where) it is ready."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pandas as pd
import pytest

from service.engine import Engine
from service.settings import Settings
from service.store import PHOTOS_DIR
from tests.service.conftest import StartServer, reid_command
from tests.service.helpers import photos

pytestmark = pytest.mark.slow


def test_a_served_folder_refuses_other_writers_until_the_server_stops(start_server: StartServer, tmp_path: Path,
                                                                      checkpoint_a: Path, checkpoint_b: Path,
                                                                      synth_dataset: Path) -> None:
    data_dir = tmp_path / "data"
    server = start_server(checkpoint_a, data_dir)
    assert f"turtle-reid is ready at {server.url} (0 individuals, 0 photos)" in server.log()
    pid = server.process.pid
    refusals = {
        "enroll": reid_command("enroll", "--checkpoint", checkpoint_a, "--data-dir", data_dir, "--data", synth_dataset),
        "reindex": reid_command("reindex", "--checkpoint", checkpoint_b, "--data-dir", data_dir),
        "serve": reid_command("serve", "--checkpoint", checkpoint_a, "--data-dir", data_dir, "--port", "0"),
    }
    for command, refused in refusals.items():
        assert refused.returncode == 2, (command, refused.stderr)
        assert refused.stderr.strip().splitlines()[-1].startswith(f"reid: error: the data folder {data_dir} is in use by reid serve "
                                         f"(pid {pid}) at {server.url}"), (command, refused.stderr)
        assert "Traceback" not in refused.stderr
        advice = "stop it first" if command == "reindex" else f"enrol through its API (POST {server.url}/individuals)"
        assert refused.stderr.strip().endswith(advice) or advice in refused.stderr, (command, refused.stderr)
    assert "POST" not in refusals["reindex"].stderr, "re-indexing is not something its API does"
    with server.client() as client:
        health = client.get("/health").json()
        assert (health["gallery_size"], health["photos"]) == (0, 0), "nothing was written behind the server's back"

    server.stop()
    enrolled = reid_command("enroll", "--checkpoint", checkpoint_a, "--data-dir", data_dir, "--data", synth_dataset)
    assert enrolled.returncode == 0, enrolled.stderr
    restarted = start_server(checkpoint_a, data_dir)
    with restarted.client() as client:
        health = client.get("/health").json()
        assert health["gallery_size"] == health["photos"] == 32


def test_start_up_sweeps_what_a_crash_left_and_keeps_every_stored_photo(tmp_path: Path, checkpoint_a: Path,
                                                                        records: pd.DataFrame) -> None:
    settings = Settings(checkpoint=checkpoint_a, data_dir=tmp_path / "data")
    uploads = photos(records, "ind_004")[:2]
    with Engine.open(settings) as engine:
        stored = engine.enroll("turtle-4", [engine.decode_upload(data, "files", None) for data in uploads], "new")
    kept = [settings.data_dir / image.file for image in stored]
    folder = settings.data_dir / PHOTOS_DIR / "ab"
    folder.mkdir(parents=True, exist_ok=True)
    temporary = kept[0].parent / f".{kept[0].name}.x1y2.tmp"  # a write killed before its rename (fileio)
    temporary.write_bytes(b"half a photo")
    orphan = folder / ("ab" + "0" * 62 + ".png")  # renamed into place, but its row was never committed
    orphan.write_bytes(uploads[0])

    with Engine.open(settings) as engine:
        assert not temporary.exists() and not orphan.exists()
        assert all(path.is_file() for path in kept)
        assert len(engine.gallery) == engine.store.counts()[1] == 2
        best = engine.identify([engine.decode_upload(uploads[1], "file", None).pixels], 1, None)[0].predictions[0]
        assert (best.individual_id, round(best.score, 4)) == ("turtle-4", 1.0)


def test_a_busy_port_is_one_line_and_frees_the_folder(tmp_path: Path, checkpoint_a: Path,
                                                      records: pd.DataFrame) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = reid_command("serve", "--checkpoint", checkpoint_a, "--data-dir", tmp_path / "data",
                               "--port", str(port))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (f"reid: error: cannot listen on 127.0.0.1:{port}: {os.strerror(98)} (is "
                                      "another server using the port? choose another with --port)")
    with Engine.open(Settings(checkpoint=checkpoint_a, data_dir=tmp_path / "data")) as engine:
        engine.enroll("after", [engine.decode_upload(photos(records, "ind_001")[0], "files", None)], "new")



def test_a_data_folder_that_cannot_be_one_is_a_user_error(tmp_path: Path) -> None:
    """`--data-dir` naming a file, or a place no folder can be made, is refused in one line, not with a traceback."""
    from service.errors import StoreError
    from service.folder_lock import FolderLock

    notes = tmp_path / "notes.md"
    notes.write_text("kept as it is")
    with pytest.raises(StoreError, match=f"the data folder {notes} is a file; name a folder"):
        FolderLock(notes, "reid serve")
    with pytest.raises(StoreError, match=f"cannot use {notes / 'data'} as the data folder: Not a directory"):
        FolderLock(notes / "data", "reid enroll")
    assert notes.read_text() == "kept as it is"


@pytest.mark.parametrize(("host", "problem"), [
    ("999.1.1.1", "'999.1.1.1' is not an address or a name this machine can resolve (--host: e.g. 127.0.0.1"),
    ("192.0.2.1", f"{os.strerror(errno.EADDRNOTAVAIL)} (--host must be an address of this machine"),
])
def test_a_host_that_is_not_this_machines_says_so(host: str, problem: str) -> None:
    """A mistyped --host is not reported as a busy port (192.0.2.1 is documentation's TEST-NET: no machine's)."""
    from reid.errors import ReIDError
    from service.cli import _listen

    with pytest.raises(ReIDError) as refused:
        _listen(host, 0).close()
    assert str(refused.value).startswith(f"cannot listen on {host}:0: {problem}")


def test_every_setting_is_a_flag_and_a_wrong_value_names_it(tmp_path: Path, checkpoint_a: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from reid.cli import build_parser
    from reid.errors import ReIDError
    from service.cli import _settings

    monkeypatch.setenv("REID_DEFAULT_K", "7")
    base = ["serve", "--checkpoint", str(checkpoint_a), "--data-dir", str(tmp_path / "data")]
    settings = _settings(build_parser().parse_args([*base, "--default-threshold", "0.5", "--no-protect-reads"]))
    assert (settings.default_k, settings.default_threshold, settings.protect_reads) == (7, 0.5, False)
    assert _settings(build_parser().parse_args([*base, "--default-k", "2"])).default_k == 2, "a flag beats the variable"
    with pytest.raises(ReIDError, match="--default-k or REID_DEFAULT_K: Input should be less than or equal to 50"):
        _settings(build_parser().parse_args([*base, "--default-k", "51"]))
    with pytest.raises(ReIDError, match=r"invalid service settings: protect_reads needs api_key \(REID_API_KEY\)"):
        _settings(build_parser().parse_args([*base, "--protect-reads"]))  # a server that would protect nothing
    monkeypatch.setenv("REID_API_KEY", "")  # `REID_API_KEY=${KEY}` with KEY unset: every write would be refused
    with pytest.raises(ReIDError, match=r"api_key \(--api-key or REID_API_KEY\) is empty: set a key, or leave it unset"):
        _settings(build_parser().parse_args(base))
    monkeypatch.delenv("REID_API_KEY")
    with pytest.raises(ReIDError, match="is empty"):
        _settings(build_parser().parse_args([*base, "--api-key", " "]))
