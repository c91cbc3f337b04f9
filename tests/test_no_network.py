"""The library works offline (field stations, ships): importing it must not reach out to the network."""

from __future__ import annotations

import os
import subprocess
import sys

SPY = """
import socket
calls = []
connect = socket.socket.connect
socket.socket.connect = lambda self, address: calls.append(address) or connect(self, address)
import reid.inference, reid.data.datamodule, reid.verification, reid.module, reid.cli, service.app
print(calls)
"""


def test_importing_the_library_opens_no_connection() -> None:
    """albumentations asks PyPI for its latest version at import (up to 2 s, and a warning on every command of an
    offline machine) unless NO_ALBUMENTATIONS_UPDATE is set; ``reid`` sets it, leaving a user's own value alone."""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    finished = subprocess.run([sys.executable, "-c", SPY], capture_output=True, text=True, env=env, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip().splitlines()[-1] == "[]"
