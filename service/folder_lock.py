"""One process at a time owns a data folder: the server that searches it, or an offline enrol or re-index.

The running server's FAISS index is built from the store at start and then follows the server's own writes, so a
second writer on the same folder (another ``reid serve``, or ``reid enroll`` while a server runs) would leave the
index behind its store. Every owner holds an exclusive ``flock`` on ``reid.lock`` for as long as it runs; the kernel
drops it when the process ends, however it ends (``kill -9`` included), so a stale lock cannot outlive its holder.
The file also says who holds it, for the refusal message.
"""

from __future__ import annotations

import fcntl
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from service.errors import StoreError

LOCK_NAME = "reid.lock"


class FolderInUseError(StoreError):
    """Another process owns the data folder."""


def _describe(holder: dict[str, object]) -> str:
    where = f" at {holder['url']}" if holder.get("url") else ""
    return f"{holder.get('command', 'a turtle-reid process')} (pid {holder.get('pid', '?')}){where} since " \
           f"{holder.get('since', '?')}"


class FolderLock:
    """An exclusive claim on a data folder, released by :meth:`release` or when the process ends."""

    def __init__(self, root: Path, command: str, url: str | None = None) -> None:
        """Claim ``root`` for ``command`` (e.g. ``reid serve``), reachable at ``url`` when it is a server.

        Raises:
            FolderInUseError: another process holds it; the message says which, and what to do instead.
        """
        self.path = Path(root).expanduser() / LOCK_NAME
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileExistsError:
            raise StoreError(f"the data folder {root} is a file; name a folder (it is created if missing)") from None
        except OSError as error:
            raise StoreError(f"cannot use {root} as the data folder: {error.strerror or error}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            advice = ("wait for it to finish" if not holder.get("url")
                      else "stop it first" if command == "reid reindex"  # re-indexing is not done through an API
                      else f"enrol through its API (POST {holder['url']}/individuals) or stop it first")
            raise FolderInUseError(f"the data folder {root} is in use by {_describe(holder)}; {advice}") from None
        holder = {"command": command, "pid": os.getpid(), "url": url,
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder).encode(), 0)

    def _holder(self) -> dict[str, object]:
        """Who holds the lock, as written by them; an empty dict while they are still writing it."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
