"""The typed-segment header: round trip, checks on open, half-made segments, fuzzing.

Shared memory is untrusted input: whatever bytes sit where the header should be, opening a
typed segment either succeeds with a consistent header or raises CorruptSegmentError /
KindMismatchError naming the segment. It never crashes or hangs.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import threading
import time
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import kill, run_python, spawn_python, stop, wait_for_line

from shmkit import (
    CorruptSegmentError,
    KindMismatchError,
    Segment,
    ShmkitError,
    _proc,
    layout,
    segment,
)
from shmkit.layout import HEADER_SIZE, PAYLOAD_OFFSET, Kind

FIXED = struct.Struct("<8sHHIQQQIIQQ")
PARAMS = struct.Struct("<8Q")


@pytest.fixture
def short_wait(monkeypatch):
    """Openers give a half-made segment 50 ms instead of seconds."""
    monkeypatch.setattr(layout, "INIT_WAIT_SECONDS", 0.05)


def header_bytes(size: int, **fields) -> bytes:
    """A header for a segment of `size` bytes, valid unless `fields` override something."""
    values = dict(magic=layout.MAGIC, version=layout.LAYOUT_VERSION, kind=int(Kind.QUEUE),
                  state=layout.STATE_READY, segment_size=size, payload_offset=PAYLOAD_OFFSET,
                  payload_size=size - PAYLOAD_OFFSET, pid=os.getpid(), reserved=0,
                  start=_proc.own_start_time(), created=time.time_ns(), params=(0,) * 8)
    values.update(fields)
    params = values.pop("params")
    return FIXED.pack(*values.values()) + PARAMS.pack(*params)


def plain(name: str, backend: str, size: int = HEADER_SIZE + 64, data: bytes = b"") -> Segment:
    seg = Segment.create(name, size, backend=backend)
    seg.buf[:len(data)] = data
    return seg


def open_queue(name: str, backend: str):
    seg, header = layout.open_typed(name, Kind.QUEUE, backend=backend, readonly=True)
    seg.close()
    return header


# -- round trip ---------------------------------------------------------------------------------

def test_create_and_open_typed_round_trip(backend, seg_name):
    def init(seg):
        seg.buf[PAYLOAD_OFFSET:PAYLOAD_OFFSET + 5] = b"hello"
    before = time.time_ns()
    seg, header = layout.create_typed(seg_name, Kind.QUEUE, 1000, (3, 2**64 - 1), init=init,
                                      backend=backend)
    try:
        assert seg.size == HEADER_SIZE + 1000
        assert header.kind is Kind.QUEUE and header.state == layout.STATE_READY
        assert (header.segment_size, header.payload_offset, header.payload_size) == \
            (HEADER_SIZE + 1000, PAYLOAD_OFFSET, 1000)
        assert header.params == (3, 2**64 - 1, 0, 0, 0, 0, 0, 0)
        assert header.creator_pid == os.getpid()
        assert header.creator_start == _proc.own_start_time()
        assert header.created_ns >= before
        other, again = layout.open_typed(seg_name, Kind.QUEUE, backend=backend)
        assert again == header
        assert bytes(other.buf[PAYLOAD_OFFSET:PAYLOAD_OFFSET + 5]) == b"hello"
        other.close()
        assert json.loads(json.dumps(header.as_dict()))["kind"] == "Queue"
    finally:
        seg.unlink()
        seg.close()


def test_header_bytes_follow_the_documented_table(backend, seg_name):
    seg, _ = layout.create_typed(seg_name, Kind.BARRIER, 8, (7,), backend=backend)
    raw = bytes(seg.buf[:HEADER_SIZE])
    seg.unlink()
    seg.close()
    assert raw[0:8] == b"\x89SHMKIT\n"
    assert struct.unpack_from("<HHI", raw, 8) == (1, int(Kind.BARRIER), 1)
    assert struct.unpack_from("<QQQ", raw, 16) == (HEADER_SIZE + 8, 128, 8)
    assert struct.unpack_from("<II", raw, 40) == (os.getpid(), 0)
    assert struct.unpack_from("<Q", raw, 64) == (7,)


def test_typed_segment_opens_in_an_unrelated_process(backend, seg_name):
    seg, header = layout.create_typed(seg_name, Kind.ARRAY, 64, (1, 2), backend=backend)
    try:
        out = run_python("import json, sys\n"
                         "from shmkit import layout\n"
                         "seg, h = layout.open_typed(sys.argv[1], layout.Kind.ARRAY,\n"
                         "                           backend=sys.argv[2])\n"
                         "print(json.dumps(h.as_dict()))\n"
                         "seg.close()",
                         seg_name, backend, timeout=30)
        assert json.loads(out.stdout) == header.as_dict()
    finally:
        seg.unlink()
        seg.close()


def test_kind_mismatch_names_both_kinds(backend, seg_name):
    seg, _ = layout.create_typed(seg_name, Kind.BROADCAST, 64, backend=backend)
    try:
        with pytest.raises(KindMismatchError) as info:
            layout.open_typed(seg_name, Kind.QUEUE, backend=backend)
        e = info.value
        assert isinstance(e, TypeError) and isinstance(e, ShmkitError)
        assert str(e) == (f"segment '{seg_name}' ({backend}) is a Broadcast, not a Queue; "
                          f"open it with shmkit.Broadcast")
    finally:
        seg.unlink()
        seg.close()


# -- foreign and damaged segments ---------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (b"", "is not a shmkit object (its header is still empty"),
    (bytes(range(256)) * 2, "is not a shmkit object (no shmkit magic"),
    (b"\x89SHMKIT", "is not a shmkit object (no shmkit magic"),
])
def test_foreign_segment_opened_as_typed_is_corrupt(backend, seg_name, short_wait, content,
                                                     message):
    seg = plain(seg_name, backend, size=512, data=content)
    with pytest.raises(CorruptSegmentError) as info:
        layout.open_typed(seg_name, Kind.QUEUE, backend=backend)
    assert message in str(info.value)
    assert f"'{seg_name}' ({backend})" in str(info.value)
    assert f"shmkit rm {seg_name}" in str(info.value)
    seg.unlink()
    seg.close()


def test_segment_smaller_than_a_header_is_corrupt(backend, seg_name):
    seg = plain(seg_name, backend, size=64, data=b"\x89SHMKIT\n")
    with pytest.raises(CorruptSegmentError, match="too small \\(64 bytes\\)"):
        layout.open_typed(seg_name, Kind.QUEUE, backend=backend)
    seg.unlink()
    seg.close()


def test_newer_layout_version_is_refused(backend, seg_name):
    size = HEADER_SIZE + 64
    seg = plain(seg_name, backend, size, header_bytes(size, version=2))
    with pytest.raises(CorruptSegmentError, match="layout version 2, newer than this shmkit "
                                                  "understands \\(1\\); upgrade shmkit"):
        layout.open_typed(seg_name, Kind.QUEUE, backend=backend)
    seg.unlink()
    seg.close()


@pytest.mark.parametrize("fields, message", [
    ({"version": 0}, "layout version 0"),
    ({"kind": 999}, "unknown kind 999"),
    ({"segment_size": HEADER_SIZE + 65}, "claims 193 bytes but is 192 bytes long"),
    ({"segment_size": 2**64 - 1}, "bytes but is 192 bytes long"),
    ({"payload_offset": 64}, "impossible payload (64 bytes at 64)"),
    ({"payload_size": 65}, "impossible payload (65 bytes at 128)"),
    ({"payload_size": 2**64 - 1}, "impossible payload"),
    ({"state": 2}, "invalid state word 2"),
    ({"state": 2**32 - 1}, "invalid state word"),
    ({"pid": 0}, "impossible creator pid 0"),
    ({"pid": 2**32 - 1}, "impossible creator pid"),
])
def test_impossible_header_fields_are_corrupt(backend, seg_name, fields, message):
    size = HEADER_SIZE + 64
    seg = plain(seg_name, backend, size, header_bytes(size, **fields))
    with pytest.raises(CorruptSegmentError) as info:
        layout.open_typed(seg_name, Kind.QUEUE, backend=backend)
    assert message in str(info.value) and f"'{seg_name}' ({backend})" in str(info.value)
    seg.unlink()
    seg.close()


# -- creators that die or are slow --------------------------------------------------------------

CREATOR = """
import sys
from shmkit import Segment, layout
seg = Segment.create(sys.argv[1], layout.HEADER_SIZE + 64, backend=sys.argv[2])
layout.write(seg, layout.Kind.QUEUE, (5,))
print("ready", flush=True)
sys.stdin.readline()
layout.publish(seg)
print("published", flush=True)
sys.stdin.readline()
seg.close()
"""


def test_creator_killed_during_initialisation_is_reported(backend, seg_name):
    creator = spawn_python(CREATOR, seg_name, backend, stdin=subprocess.PIPE)
    try:
        wait_for_line(creator, "ready", timeout=30)
    finally:
        kill(creator)  # SIGKILL while the segment is in state 'initialising'
    with pytest.raises(CorruptSegmentError) as info:
        layout.open_typed(seg_name, Kind.QUEUE, backend=backend)
    message = str(info.value)
    assert f"its creator (pid {creator.pid}) died while initialising it" in message
    assert f"'{seg_name}' ({backend})" in message and f"shmkit rm {seg_name}" in message
    segment.unlink(seg_name, backend=backend)


def test_live_slow_creator_is_waited_for_then_reported(backend, seg_name, short_wait):
    creator = spawn_python(CREATOR, seg_name, backend, stdin=subprocess.PIPE)
    try:
        wait_for_line(creator, "ready", timeout=30)
        with pytest.raises(CorruptSegmentError) as info:
            layout.open_typed(seg_name, Kind.QUEUE, backend=backend)
        assert f"still being initialised by pid {creator.pid} after 0.05 s" in str(info.value)
        creator.stdin.write("publish\n")
        creator.stdin.flush()
        wait_for_line(creator, "published", timeout=30)
        header = open_queue(seg_name, backend)
        assert header.params[0] == 5 and header.creator_pid == creator.pid
        creator.stdin.write("exit\n")
        creator.stdin.flush()
        stop(creator, timeout=30)
    finally:
        if creator.poll() is None:
            kill(creator)
    segment.unlink(seg_name, backend=backend)


@pytest.mark.parametrize("stage", ["nothing written", "header written"])
def test_opener_waits_for_a_creator_that_finishes(backend, seg_name, monkeypatch, stage):
    seg = plain(seg_name, backend)
    if stage == "header written":
        layout.write(seg, Kind.EVENT)
    waiting = threading.Event()

    def sleep(seconds):  # the opener is waiting now: let the creator finish
        waiting.set()
        time.sleep(seconds)
    monkeypatch.setattr(layout, "time", types.SimpleNamespace(
        monotonic=time.monotonic, sleep=sleep, time_ns=time.time_ns))
    monkeypatch.setattr(layout, "INIT_WAIT_SECONDS", 60.0)
    result = {}
    opener = threading.Thread(target=lambda: result.update(
        header=layout.open_typed(seg_name, Kind.EVENT, backend=backend)))
    opener.start()
    assert waiting.wait(timeout=30)
    if stage == "nothing written":
        layout.write(seg, Kind.EVENT)
    layout.publish(seg)
    opener.join(timeout=30)
    other, header = result["header"]
    assert header.kind is Kind.EVENT and header.state == layout.STATE_READY
    other.close()
    seg.unlink()
    seg.close()


def test_reused_creator_pid_counts_as_dead(backend, seg_name):
    size = HEADER_SIZE + 64
    # our pid, but another start time: the creator that had this pid is gone
    stale = header_bytes(size, state=layout.STATE_INITIALISING,
                         start=_proc.own_start_time() + 12345)
    seg = plain(seg_name, backend, size, stale)
    with pytest.raises(CorruptSegmentError, match=f"creator \\(pid {os.getpid()}\\) died"):
        layout.open_typed(seg_name, Kind.QUEUE, backend=backend)
    seg.unlink()
    seg.close()


def test_creator_that_died_before_publishing_the_magic_is_corrupt(backend, seg_name, short_wait):
    size = HEADER_SIZE + 64
    unpublished = header_bytes(size, magic=bytes(8), state=layout.STATE_INITIALISING,
                               start=_proc.own_start_time() + 12345)
    seg = plain(seg_name, backend, size, unpublished)
    with pytest.raises(CorruptSegmentError, match="no shmkit magic"):
        layout.open_typed(seg_name, Kind.QUEUE, backend=backend)
    seg.unlink()
    seg.close()


def test_failed_init_removes_the_segment(backend, seg_name):
    def init(seg):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        layout.create_typed(seg_name, Kind.MUTEX, 64, init=init, backend=backend)
    assert not segment.exists(seg_name, backend=backend)


@pytest.mark.parametrize("kwargs, error", [
    ({"payload_size": -1}, ValueError),
    ({"payload_size": "64"}, TypeError),
    ({"kind": 999}, ValueError),
    ({"kind": "Queue"}, TypeError),
    ({"params": (1,) * 9}, ValueError),
    ({"params": (-1,)}, ValueError),
    ({"params": (2**64,)}, ValueError),
    ({"params": (1.5,)}, TypeError),
    ({"params": 5}, TypeError),
    ({"init": "not callable"}, TypeError),
])
def test_create_typed_checks_arguments_before_creating(backend, seg_name, kwargs, error):
    args = {"kind": Kind.QUEUE, "payload_size": 64, **kwargs}
    with pytest.raises(error):
        layout.create_typed(seg_name, backend=backend, **args)
    assert not segment.exists(seg_name, backend=backend)


def test_readonly_open_typed_cannot_write(backend, seg_name):
    seg, _ = layout.create_typed(seg_name, Kind.DICT, 64, backend=backend)
    ro, header = layout.open_typed(seg_name, Kind.DICT, backend=backend, readonly=True)
    assert header.kind is Kind.DICT
    with pytest.raises(TypeError):
        ro.buf[PAYLOAD_OFFSET] = 1
    ro.close()
    seg.unlink()
    seg.close()


# -- fuzzing: whatever the header bytes, opening never crashes ----------------------------------

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SIZE = HEADER_SIZE + 64


def _check_open_is_safe(seg: Segment, name: str, backend: str, raw: bytes) -> str:
    """Write `raw` over the header, open it as a Queue: succeed consistently or refuse."""
    seg.buf[:HEADER_SIZE] = raw
    try:
        header = open_queue(name, backend)
    except (CorruptSegmentError, KindMismatchError) as e:
        assert f"'{name}' ({backend})" in str(e)
        return type(e).__name__
    assert header.kind is Kind.QUEUE and header.state == layout.STATE_READY
    assert 1 <= header.version <= layout.LAYOUT_VERSION
    assert header.segment_size == SIZE and header.payload_offset == PAYLOAD_OFFSET
    assert 0 <= header.payload_size <= SIZE - PAYLOAD_OFFSET
    assert 0 < header.creator_pid <= _proc.pid_max() and len(header.params) == 8
    assert open_queue(name, backend) == header  # the same bytes give the same answer
    return "ok"


def _fuzz(backend: str, name: str, strategy) -> set[str]:
    outcomes: set[str] = set()
    seg = Segment.create(name, SIZE, backend=backend)
    try:
        @FUZZ
        @given(strategy)
        def run(raw):
            outcomes.add(_check_open_is_safe(seg, name, backend, raw))
        run()
    finally:
        seg.unlink()
        seg.close()
    return outcomes


def test_random_bytes_over_the_header_never_crash(backend, seg_name, short_wait):
    outcomes = _fuzz(backend, seg_name, st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
    assert "CorruptSegmentError" in outcomes


def test_random_bytes_after_a_valid_magic_never_crash(backend, seg_name, short_wait):
    rest = st.binary(min_size=HEADER_SIZE - 8, max_size=HEADER_SIZE - 8)
    outcomes = _fuzz(backend, seg_name, rest.map(lambda tail: layout.MAGIC + tail))
    assert "CorruptSegmentError" in outcomes


def _u(bits: int):
    return st.integers(0, 2**bits - 1)


def _near(value: int, bits: int):
    """Values around a meaningful one, plus anything that fits."""
    return st.one_of(st.sampled_from([value, value - 1, value + 1, 0, 2**bits - 1]), _u(bits))


# A valid header with a few fields replaced: most examples get past the magic and the
# version, so every later check (and success) is exercised.
MUTATIONS = {
    "magic": st.binary(min_size=8, max_size=8),
    "version": _near(layout.LAYOUT_VERSION, 16),
    "kind": st.one_of(st.sampled_from([int(k) for k in Kind]), _u(16)),
    "state": _near(layout.STATE_READY, 32),
    "segment_size": _near(SIZE, 64),
    "payload_offset": _near(PAYLOAD_OFFSET, 64),
    "payload_size": _near(SIZE - PAYLOAD_OFFSET, 64),
    "pid": st.one_of(st.just(1), _near(_proc.pid_max(), 32)),
    "reserved": _u(32),
    "start": _u(64),
    "created": _u(64),
    "params": st.tuples(*[_u(64)] * 8),
}
MUTATED_HEADERS = (st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=3, unique=True)
                   .flatmap(lambda keys: st.fixed_dictionaries({k: MUTATIONS[k] for k in keys}))
                   .map(lambda fields: header_bytes(SIZE, **fields)))


def _flip(flips: list[tuple[int, int]]) -> bytes:
    raw = bytearray(header_bytes(SIZE))
    for index, mask in flips:
        raw[index] ^= mask
    return bytes(raw)


FLIPPED_HEADERS = st.lists(st.tuples(st.integers(0, HEADER_SIZE - 1), st.integers(1, 255)),
                           min_size=1, max_size=4).map(_flip)


def test_random_header_fields_never_crash(backend, seg_name, short_wait):
    outcomes = _fuzz(backend, seg_name, MUTATED_HEADERS)
    assert {"ok", "CorruptSegmentError", "KindMismatchError"} <= outcomes


def test_bit_flips_in_a_valid_header_never_crash(backend, seg_name, short_wait):
    outcomes = _fuzz(backend, seg_name, FLIPPED_HEADERS)
    assert "CorruptSegmentError" in outcomes


def test_every_kind_opens_as_itself_and_no_other(seg_name):
    kinds = list(Kind)
    for kind in kinds:
        seg, _ = layout.create_typed(seg_name, kind, 8)
        try:
            other, header = layout.open_typed(seg_name, kind)
            other.close()
            assert header.kind is kind and kind.label
            wrong = kinds[(kinds.index(kind) + 1) % len(kinds)]
            with pytest.raises(KindMismatchError,
                               match=f"is an? {kind.label}, not an? {wrong.label};"):
                layout.open_typed(seg_name, wrong)
        finally:
            seg.unlink()
            seg.close()


def test_header_errors_carry_no_errno_but_name_the_segment(seg_name, short_wait):
    seg = plain(seg_name, "posix", data=b"not a header")
    with pytest.raises(CorruptSegmentError) as info:
        layout.open_typed(seg_name, Kind.QUEUE)
    assert not isinstance(info.value, OSError) and seg_name in str(info.value)
    seg.unlink()
    seg.close()
