"""The temp dir of a local Ray instance (``bark-serve up`` and ``dataset``): issue 25's rough edges.

Before: a RAY_TMPDIR that did not exist failed with Errno 2, and the ``bark-ray-XXXXXXXX`` dir added
17 characters to Ray's socket paths, so a RAY_TMPDIR that Ray alone accepts overflowed 107 bytes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from bark_serve.cli.common import CliError, ray_temp_dir


@pytest.fixture
def short_tmp():
    """A short dir under /tmp (pytest's tmp_path is itself too long for Ray's sockets)."""
    path = Path(tempfile.mkdtemp(prefix="brt", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_missing_ray_tmpdir_is_created(short_tmp, monkeypatch):
    base = short_tmp / "not" / "yet"
    monkeypatch.setenv("RAY_TMPDIR", str(base))
    made = Path(ray_temp_dir("bark-serve up"))
    assert made.parent == base and made.is_dir() and len(made.name) == 10  # "br" + 8


def test_a_ray_tmpdir_too_long_for_rays_sockets_is_refused_plainly(tmp_path, monkeypatch):
    base = tmp_path / ("x" * 100)
    monkeypatch.setenv("RAY_TMPDIR", str(base))
    with pytest.raises(CliError, match="too long.*107"):
        ray_temp_dir("bark-serve dataset")
    assert not base.exists()  # nothing made


def test_the_longest_accepted_dir_leaves_room_for_rays_socket(short_tmp, monkeypatch):
    """The bound is Ray's own: the socket path under the longest accepted RAY_TMPDIR is at most 107 bytes."""
    for extra in range(0, 100):
        base = short_tmp / ("y" * extra)
        monkeypatch.setenv("RAY_TMPDIR", str(base))
        try:
            made = ray_temp_dir("bark-serve up")
        except CliError:
            break
        socket = f"{made}/session_2026-12-04_18-29-05_123456_{os.getpid()}/sockets/plasma_store"
        assert len(socket) <= 107
    else:
        pytest.fail("no RAY_TMPDIR was refused")
