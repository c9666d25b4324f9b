"""`slidr up && slidr status && slidr down && slidr up` on private ports and a private state folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_up_status_down_up(tmp_path: Path, services: object) -> None:
    env = {
        **os.environ,
        "SLIDR_HOME": str(tmp_path / "home"),
        "SLIDR_CACHE_DIR": str(ROOT / ".cache"),  # the jars the session already fetched
        # ports below Linux's ephemeral range (32768-60999): a client connection's local port can take one inside
        # it (CI, stop 36: "Socket server failed to bind to 127.0.0.1:39092: Address already in use")
        "SLIDR_KAFKA_BOOTSTRAP": "127.0.0.1:29092",
        "SLIDR_KAFKA_CONTROLLER_PORT": "29093",
        "SLIDR_REDIS_URL": "redis://127.0.0.1:26379/0",
        "SLIDR_KAFKA_HEAP": "-Xmx512m -Xms256m",
    }

    def slidr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "slidr", *args], env=env, capture_output=True, text=True,
                              timeout=180, cwd=tmp_path)

    try:
        assert slidr("status").returncode == 3  # nothing runs there yet
        up = slidr("up")
        assert up.returncode == 0, up.stderr
        assert "5 created" in up.stdout
        st = slidr("status")
        assert st.returncode == 0 and "127.0.0.1:29092" in st.stdout and "26379" in st.stdout
        down = slidr("down")
        assert down.returncode == 0 and "stopped" in down.stderr
        assert slidr("status").returncode == 3
        again = slidr("up")  # restarts on the same data: topics survive, none to create
        assert again.returncode == 0, again.stderr
        assert "0 created" in again.stdout
    finally:
        slidr("down")
    assert slidr("status").returncode == 3
