"""Helpers to run real, unrelated Python interpreters from tests.

Every call has a timeout: a hung child is a failed test, not a hung suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

PYTHON = sys.executable


def run_python(code: str, *args: object, timeout: float = 30, check: bool = True,
               user: int | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with `args` as sys.argv[1:] and wait for it.

    With `user=UID` the child drops to that uid (and its primary gid) before running `code`,
    to test permissions as an unprivileged user while the suite runs as root.
    """
    cmd = [PYTHON, "-c", _as_user(code, user), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed with {proc.returncode}\n--- stdout\n{proc.stdout}"
                             f"\n--- stderr\n{proc.stderr}")
    return proc


def spawn_python(code: str, *args: object, user: int | None = None,
                 stdin=None) -> subprocess.Popen:
    """Start `code` in a fresh interpreter without waiting; pair with `wait_for_line`/`stop`."""
    cmd = [PYTHON, "-c", _as_user(code, user), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=stdin)


def wait_for_line(proc: subprocess.Popen, expected: str, timeout: float = 30) -> str:
    """Read the child's stdout until a line equal to `expected` arrives (its readiness signal)."""
    import selectors

    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"child did not print {expected!r} within {timeout} s")
            line = proc.stdout.readline()
            if not line:
                err = proc.stderr.read() if proc.poll() is not None else ""
                raise AssertionError(f"child exited before printing {expected!r}\n{err}")
            if line.rstrip("\n") == expected:
                return line
    finally:
        sel.close()


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 10) -> int:
    """Send `sig` to the child and reap it."""
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def stop(proc: subprocess.Popen, timeout: float = 30) -> tuple[str, str]:
    """Wait for the child to finish; kill it if it overstays. Returns (stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"child did not finish within {timeout} s\n{err}")
    return out, err


# Modules a child may need after dropping privileges: the interpreter can live under a
# directory (/root/.pyenv) that the unprivileged user cannot read, so import them first.
_PRELOAD = "errno, json, mmap, pickle, signal, struct, threading, time, numpy, shmkit, shmkit.layout"


def _as_user(code: str, uid: int | None) -> str:
    """`code` preceded by a privilege drop to `uid` (nothing when uid is None)."""
    if uid is None:
        return code
    return (f"import os as _os, pwd as _pwd, {_PRELOAD}\n"
            f"_gid = _pwd.getpwuid({uid}).pw_gid\n"
            f"_os.setgroups([]); _os.setgid(_gid); _os.setuid({uid})\n" + code)
