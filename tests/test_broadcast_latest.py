"""Latest: the newest value for readers that poll. API, read-only readers, waiting, numpy, and
torn-read freedom under writers hammering it from other processes (and being SIGKILLed)."""

from __future__ import annotations

import pickle
import random
import threading

import numpy as np
import pytest

from procs import kill, spawn_python, stop, wait_for_line
from shmkit.broadcast import Broadcast, Latest
from shmkit.errors import (
    Empty,
    KindMismatchError,
    MessageTooLargeError,
    SegmentExistsError,
    WaitTimeoutError,
)


@pytest.fixture
def latest(seg_name):
    lt = Latest.create(seg_name, 256)
    yield lt
    lt.close()
    lt.unlink()


def test_get_before_any_set_raises_empty(latest):
    assert latest.version == 0
    with pytest.raises(Empty, match="has not been set yet"):
        latest.get()
    with pytest.raises(Empty):
        latest.get_versioned()


def test_set_then_get_returns_the_newest_value(latest):
    latest.set(b"one")
    latest.set(bytearray(b"two"))
    latest.set(memoryview(b"three"))
    assert latest.get() == b"three"
    assert latest.get_versioned() == (3, b"three")
    assert latest.version == 3
    latest.set(b"")
    assert latest.get() == b""


def test_too_large_and_wrong_type(latest):
    latest.set(b"x" * 256)
    with pytest.raises(MessageTooLargeError, match="257 bytes exceeds max_size"):
        latest.set(b"x" * 257)
    with pytest.raises(TypeError):
        latest.set("text")


def test_create_validation_and_kind_checks(seg_name, names):
    with pytest.raises(ValueError):
        Latest.create(seg_name, 10, slots=1)
    with pytest.raises(ValueError):
        Latest.create(seg_name, -1)
    with pytest.raises(TypeError):
        Latest.create(seg_name, "10")
    lt = Latest.create(seg_name, 10, slots=5)
    try:
        assert lt.slots == 5 and lt.max_size == 10
        with pytest.raises(SegmentExistsError):
            Latest.create(seg_name, 10)
        b = Broadcast.create(names("b"), 1024)
        with pytest.raises(KindMismatchError):
            Latest.open(b.name)
        with pytest.raises(KindMismatchError):
            Broadcast.open(seg_name)
        b.close()
    finally:
        lt.close()
        lt.unlink()


def test_readonly_reader_and_pickling(latest):
    latest.set(b"state")
    reader = Latest.open(latest.name, readonly=True)
    try:
        assert reader.get() == b"state"
        with pytest.raises(PermissionError, match="read-only"):
            reader.set(b"no")
        clone = pickle.loads(pickle.dumps(reader))
        assert clone.get() == b"state" and clone.segment.readonly
        clone.close()
        with pytest.raises(WaitTimeoutError):
            reader.wait(reader.version, timeout=0.02)
    finally:
        reader.close()


def test_wait_returns_when_a_newer_value_is_set(latest):
    v = latest.version

    def later():
        threading.Event().wait(0.05)
        latest.set(b"new")
    t = threading.Thread(target=later)
    t.start()
    assert latest.wait(v, timeout=30) == v + 1
    t.join(30)
    assert latest.wait(0, timeout=0) == v + 1  # already newer: no wait
    with pytest.raises(WaitTimeoutError, match="no value newer"):
        latest.wait(latest.version, timeout=0.01)


def test_readonly_waiter_sees_new_values(latest):
    reader = Latest.open(latest.name, readonly=True)
    try:
        t = threading.Timer(0.05, latest.set, args=(b"tick",))
        t.start()
        assert reader.wait(0, timeout=30) >= 1
        t.join(30)
    finally:
        reader.close()


def test_numpy_values(latest):
    arr = np.arange(10, dtype=np.float32).reshape(2, 5)
    latest.set_array(arr)
    out = latest.get_array()
    assert out.dtype == arr.dtype and out.shape == (2, 5) and np.array_equal(out, arr)
    out[0, 0] = 99  # a private, writable copy
    assert latest.get_array()[0, 0] == 0


def test_stats(latest):
    latest.set(b"12345")
    st = latest.stats()
    assert st["version"] == 1 and st["size"] == 5 and st["slots"] == 3
    assert st["writer_pid"] is None and st["steals"] == 0 and st["written_ns"] > 0


# -- many processes ---------------------------------------------------------------------------

VALUE = r'''
import zlib
def value(v, size):
    body = (v.to_bytes(8, "little") * (size // 8 + 1))[:size]
    return v.to_bytes(8, "little") + zlib.crc32(body).to_bytes(4, "little") + body
def check(raw):
    v = int.from_bytes(raw[:8], "little")
    body = raw[12:]
    assert zlib.crc32(body) == int.from_bytes(raw[8:12], "little"), "torn value %d" % v
    assert body == (v.to_bytes(8, "little") * (len(body) // 8 + 1))[:len(body)], "torn %d" % v
    return v
'''

_ns: dict = {}
exec(VALUE, _ns)  # the same value()/check() as the children
value, check_value = _ns["value"], _ns["check"]

WRITER = VALUE + r'''
import sys, random
from shmkit.broadcast import Latest
lt = Latest.open(sys.argv[1]); n = int(sys.argv[2]); tag = int(sys.argv[3])
rnd = random.Random(tag)
print("ready", flush=True)
i = 0
while n == 0 or i < n:
    lt.set(value(tag * 10**9 + i, rnd.randint(0, 4000)), timeout=30)
    i += 1
print("done", flush=True)
'''

READER = VALUE + r'''
import sys
from shmkit.broadcast import Latest
lt = Latest.open(sys.argv[1], readonly=True); n = int(sys.argv[2])
print("ready", flush=True)
last_version, distinct, seen = 0, 0, None
for _ in range(n):
    version, raw = lt.get_versioned()
    assert version >= last_version, (version, last_version)
    v = check(raw)
    if v != seen:
        distinct, seen = distinct + 1, v
    last_version = version
print("ok", distinct, flush=True)
'''


def test_readers_never_see_a_torn_value_under_a_hammering_writer(seg_name):
    lt = Latest.create(seg_name, 4012 + 12, slots=2)  # two buffers: the hardest case
    children = []
    try:
        lt.set(value(0, 100))
        writers = [spawn_python(WRITER, seg_name, 0, tag) for tag in (1, 2)]
        children += writers
        for w in writers:
            wait_for_line(w, "ready", timeout=60)
        readers = [spawn_python(READER, seg_name, 30_000) for _ in range(2)]
        children += readers
        for r in readers:
            out, err = stop(r, timeout=120)
            assert r.returncode == 0, err
            assert int(out.split()[-1]) > 10  # it saw the value change many times
    finally:
        for c in children:
            kill(c)
        lt.close()
        lt.unlink()


def test_killed_writers_never_tear_values_nor_wedge_the_lock(seg_name):
    lt = Latest.create(seg_name, 4012 + 12, slots=3)
    rnd = random.Random(9)
    reader = None
    try:
        lt.set(value(0, 100))
        reader = spawn_python(READER.replace("for _ in range(n):", "while True:"), seg_name, 0)
        wait_for_line(reader, "ready", timeout=60)
        for k in range(10):
            w = spawn_python(WRITER, seg_name, 0, k + 1)
            wait_for_line(w, "ready", timeout=60)
            try:
                w.wait(timeout=rnd.random() * 0.03)
            except Exception:
                pass
            kill(w)
        final = spawn_python(WRITER, seg_name, 200, 99)
        out, err = stop(final, timeout=120)
        assert final.returncode == 0, err
        assert check_value(lt.get()) == 99 * 10**9 + 199
        assert reader.poll() is None, reader.stderr.read()  # still reading, nothing torn
    finally:
        if reader is not None:
            kill(reader)
        lt.close()
        lt.unlink()


# -- review regressions ---------------------------------------------------------------------------

# Run in a child interpreter: before the fix, closing while another thread was inside a call
# unmapped the memory under it and the process died of SIGSEGV.
CLOSE_WHILE_BUSY = r'''
import os, struct, sys, threading
from shmkit import _native
from shmkit.broadcast import Latest
lt = Latest.open(sys.argv[1])
what = sys.argv[2]
inside = threading.Event()
errors = []

def call():
    inside.set()
    try:
        if what == "wait":
            lt.wait(lt.version, timeout=20)
        else:
            lt.set(b"v", timeout=20)
    except ValueError as exc:
        errors.append(str(exc))

if what == "set":
    # a live writer holds the lock: this thread's own id, so the lock is never taken over
    struct.pack_into("<I", lt.segment.buf, 128 + 40, _native.gettid())
t = threading.Thread(target=call)
t.start()
inside.wait(10)
threading.Event().wait(0.1)  # let it go to sleep inside the call (not a correctness wait)
lt.close()
t.join(20)
assert not t.is_alive() and len(errors) == 1 and "closed" in errors[0], errors
print("ok", flush=True)
'''


@pytest.mark.parametrize("what", ["wait", "set"])
def test_closing_while_another_thread_is_inside_a_call_wakes_it_instead_of_crashing(seg_name,
                                                                                     what):
    from procs import run_python

    lt = Latest.create(seg_name, 64)
    try:
        proc = run_python(CLOSE_WHILE_BUSY, seg_name, what, timeout=60, check=False)
        assert proc.returncode == 0 and proc.stdout.split() == ["ok"], (proc.returncode,
                                                                        proc.stderr)
    finally:
        lt.close()
        lt.unlink()


def test_forked_child_can_close_a_latest_a_parent_thread_was_waiting_on(latest):
    import os
    import signal
    import time

    started = threading.Event()

    def wait():
        started.set()
        latest.wait(0, timeout=30)
    t = threading.Thread(target=wait)
    t.start()
    started.wait(10)
    time.sleep(0.1)  # let it reach the sleep (not a correctness wait)
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)  # a hang fails the test instead of blocking it
        code = 1
        try:
            latest.set(b"from the child")
            latest.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    t.join(30)
    assert os.waitstatus_to_exitcode(status) == 0 and not t.is_alive()
    assert latest.get() == b"from the child"


def test_set_nowait_raises_while_another_writer_holds_the_lock(latest):
    import struct

    from shmkit import _native

    latest.set_nowait(b"a")
    latest.set_array_nowait(np.arange(4))
    assert np.array_equal(latest.get_array(), np.arange(4))
    # a live writer holds the lock: this thread (so only other threads wait for it)
    struct.pack_into("<I", latest.segment.buf, 128 + 40, _native.gettid())
    other = []
    t = threading.Thread(target=lambda: other.append(pytest.raises(WaitTimeoutError,
                                                                  latest.set_nowait, b"b")))
    t.start()
    t.join(30)
    struct.pack_into("<I", latest.segment.buf, 128 + 40, 0)
    assert other and latest.get_array().tolist() == [0, 1, 2, 3]
