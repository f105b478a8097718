"""Fixtures shared by the whole suite, and the session-wide leak check.

The suite must leave nothing in /dev/shm or System V: `pytest_sessionfinish` compares what
exists at the end with what existed at the start and fails the run on any difference.
"""

from __future__ import annotations

import os
import re
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from shmkit import _proc  # noqa: E402

NAME_PREFIX = "shmkit-test-"
_before: tuple[set[str], set[int]] = (set(), set())


def _snapshot() -> tuple[set[str], set[int]]:
    posix = {n for n in os.listdir(_proc.SHM_DIR) if not n.startswith("sem.")}
    sysv = {row["shmid"] for row in _proc.sysv_segments()}
    return posix, sysv


def pytest_sessionstart(session):
    global _before
    _before = _snapshot()


def pytest_sessionfinish(session, exitstatus):
    posix, sysv = _snapshot()
    # Names made by another concurrent test run (another pytest pid) are not ours to report.
    leaked_posix = sorted(n for n in posix - _before[0]
                          if not n.startswith(NAME_PREFIX) or _made_by_this_run(n))
    leaked_sysv = sorted(sysv - _before[1])
    if leaked_posix or leaked_sysv:
        sys.stderr.write(f"\nLEAK: the test run left shared memory behind: /dev/shm "
                         f"{leaked_posix}, System V shmids {leaked_sysv}\n")
        session.exitstatus = 1


def _made_by_this_run(name: str) -> bool:
    """Whether a test-prefixed name came from this pytest process (see `unique_name`)."""
    match = re.match(rf"{NAME_PREFIX}\D*(\d+)-", name)
    return match is not None and int(match.group(1)) == os.getpid()


def unique_name(tag: str = "") -> str:
    """A segment name no other test (or concurrent run) uses."""
    return f"{NAME_PREFIX}{tag}{os.getpid()}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def seg_name() -> str:
    """A unique segment name; whatever the test leaves under it is removed afterwards."""
    name = unique_name()
    yield name
    _remove_everywhere(name)


@pytest.fixture
def names():
    """A factory of unique names, all cleaned up afterwards."""
    made: list[str] = []

    def make(tag: str = "") -> str:
        made.append(unique_name(tag))
        return made[-1]
    yield make
    for name in made:
        _remove_everywhere(name)


@pytest.fixture(params=["posix", "sysv"])
def backend(request) -> str:
    """Run the test on both segment backends."""
    return request.param


def _remove_everywhere(name: str) -> None:
    from shmkit import segment

    for backend in ("posix", "sysv"):
        try:
            segment.unlink(name, backend=backend)
        except OSError:
            pass


@pytest.fixture(scope="session")
def nobody() -> int:
    """An unprivileged uid to drop to in child processes (the suite runs as root in CI)."""
    import pwd

    if os.geteuid() != 0:
        pytest.skip("dropping to another uid needs root")
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534
