"""Queue on scribbled memory: random bytes over the control block and the ring, then use it.

DESIGN invariant 1: every outcome is success, a clean CorruptSegmentError, or the ordinary
Empty/Full/QueueClosed; never a crash, an out-of-bounds access or a hang (every call here is
non-blocking or has a short timeout, and pytest-timeout guards the rest).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmkit import _native, layout
from shmkit.errors import (
    CorruptSegmentError,
    Empty,
    Full,
    KindMismatchError,
    QueueClosed,
    ShmkitError,
)
from shmkit.queue import CTRL_OFFSET, RING_OFFSET, Queue, describe_state

CAPACITY = 2048
MAX_MESSAGE = 600
OK = (CorruptSegmentError, Empty, Full, QueueClosed)
SEGMENT_END = RING_OFFSET + CAPACITY


@pytest.fixture(scope="module")
def fuzz_queue():
    from conftest import _remove_everywhere, unique_name

    name = unique_name("fuzz")
    q = Queue.create(name, capacity=CAPACITY, max_message=MAX_MESSAGE)
    yield q
    q.detach()
    _remove_everywhere(name)


def _reset(q: Queue, messages: list[bytes]) -> None:
    buf = q.segment.buf
    slots = bytes(buf[CTRL_OFFSET + _native.RING_SLOTS_OFFSET:RING_OFFSET])
    _native.ring_init(buf, CTRL_OFFSET, RING_OFFSET, CAPACITY, MAX_MESSAGE)
    buf[CTRL_OFFSET + _native.RING_SLOTS_OFFSET:RING_OFFSET] = slots
    for m in messages:
        try:
            q.put_nowait(m)
        except Full:
            break


scribble = st.tuples(
    st.one_of(
        st.integers(CTRL_OFFSET, CTRL_OFFSET + 512),          # cursors, words, counters
        st.integers(RING_OFFSET, SEGMENT_END - 1),            # record headers and payloads
        st.integers(CTRL_OFFSET, SEGMENT_END - 1),
    ),
    st.binary(min_size=1, max_size=16),
)

operation = st.one_of(
    st.tuples(st.just("put"), st.integers(0, MAX_MESSAGE)),
    st.tuples(st.just("get"), st.just(0)),
    st.tuples(st.just("get_many"), st.integers(1, 8)),
    st.tuples(st.just("put_timeout"), st.integers(0, MAX_MESSAGE)),
    st.tuples(st.just("get_timeout"), st.just(0)),
    st.tuples(st.just("reserve"), st.integers(0, 100)),
    st.tuples(st.just("view"), st.just(0)),
    st.tuples(st.just("stats"), st.just(0)),
    st.tuples(st.just("recover"), st.just(0)),
)


def _apply(q: Queue, op: str, n: int) -> None:
    if op == "put":
        q.put_nowait(b"p" * n)
    elif op == "put_timeout":
        q.put(b"t" * n, timeout=0.002)
    elif op == "get":
        assert len(q.get_nowait()) <= MAX_MESSAGE
    elif op == "get_timeout":
        assert len(q.get(timeout=0.002)) <= MAX_MESSAGE
    elif op == "get_many":
        msgs = q.get_many(n, timeout=0.002)
        assert 1 <= len(msgs) <= n and all(len(m) <= MAX_MESSAGE for m in msgs)
    elif op == "reserve":
        with q.reserve(n, timeout=0.002) as buf:
            buf[:] = b"r" * n
    elif op == "view":
        with q.get_view(timeout=0.002) as view:
            assert len(view) <= MAX_MESSAGE
    elif op == "stats":
        q.stats()
    else:
        q._recover()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(scribble, min_size=1, max_size=6),
       st.lists(operation, min_size=1, max_size=12))
def test_scribbled_ring_raises_corrupt_or_works(fuzz_queue, messages, scribbles, operations):
    q = fuzz_queue
    _reset(q, messages)
    buf = q.segment.buf
    for offset, data in scribbles:
        data = data[:SEGMENT_END - offset]
        buf[offset:offset + len(data)] = data
    for op, n in operations:
        try:
            _apply(q, op, n)
        except OK:
            pass
    q.stats()


@settings(max_examples=100, deadline=None)
@given(st.integers(0, RING_OFFSET + 64 - 1), st.binary(min_size=1, max_size=16))
def test_scribbled_header_or_control_block_fails_cleanly_on_open(seg_name_factory, offset, data):
    name = seg_name_factory()
    q = Queue.create(name, capacity=256)
    q.put(b"hello")
    buf = q.segment.buf
    buf[offset:offset + len(data)] = data[:RING_OFFSET + 256 - offset]
    q.detach()
    try:
        other = Queue.open(name)
    except (CorruptSegmentError, KindMismatchError, ShmkitError):   # (the pid namespace field)
        return
    try:
        seg, header = layout.open_typed(name, layout.Kind.QUEUE, readonly=True)
        try:
            describe_state(seg, header)
        finally:
            seg.close()
        for _ in range(3):
            try:
                other.get_nowait()
                other.put_nowait(b"x" * 10)
            except OK:
                pass
    finally:
        other.detach()


@pytest.fixture(scope="module")
def seg_name_factory():
    from conftest import _remove_everywhere, unique_name

    made = []

    def make():
        if made:
            _remove_everywhere(made.pop())
        made.append(unique_name("fuzzopen"))
        return made[-1]
    yield make
    for name in made:
        _remove_everywhere(name)


# -- structured scribbles: well-formed header words with wrong contents ------------------------
#
# Random bytes almost never form a header with the right tag, so they stop at the first tag
# check. These write words with the right tag for a real record boundary but any state, owner
# and length, and cursors moved to nearby boundaries, so every later check in the C walk
# (states, lengths, owners, cursor order) gets exercised too.

def _word(pos: int, state: int, owner: int) -> int:
    return (((pos >> 4) & ((1 << 38) - 1)) << 26) | ((state & 15) << 22) | (owner & 0x3FFFFF)


def _boundaries(buf) -> list[int]:
    """Record positions from `free` to the VACANT end (fresh ring: no scribbles yet)."""
    free = _native.load_u64(buf, CTRL_OFFSET + 192)
    pos, out = free, []
    while pos - free <= CAPACITY:
        out.append(pos)
        off = pos % CAPACITY
        word = _native.load_u64(buf, RING_OFFSET + off)
        state = (word >> 22) & 15
        if state in (0, 1, 2):
            break
        length = _native.load_u64(buf, RING_OFFSET + off + 8)
        pos += CAPACITY - off if state == 8 else 16 + ((length + 15) & ~15)
    return out


@pytest.fixture(scope="module")
def dead_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


structured = st.one_of(
    st.tuples(st.just("header"), st.integers(0, 20), st.integers(0, 15),
              st.sampled_from(["none", "self", "dead", "init"]),
              st.sampled_from([None, 0, 1, 16, MAX_MESSAGE, MAX_MESSAGE + 1, CAPACITY - 16,
                               CAPACITY, 1 << 40, (1 << 64) - 1])),
    st.tuples(st.just("cursor"), st.integers(0, 20), st.sampled_from([64, 128, 192]),
              st.integers(-4, 4), st.sampled_from([0, 1, CAPACITY, -CAPACITY, 1 << 42, 8])),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(structured, min_size=1, max_size=4),
       st.lists(operation, min_size=1, max_size=12))
def test_well_formed_but_wrong_headers_and_cursors_raise_corrupt_or_work(
        fuzz_queue, dead_pid, messages, scribbles, operations):
    import os

    q = fuzz_queue
    _reset(q, messages)
    buf = q.segment.buf
    places = _boundaries(buf)
    owners = {"none": 0, "self": os.getpid(), "dead": dead_pid, "init": 1}
    for kind, index, a, b, c in scribbles:
        pos = places[index % len(places)]
        if kind == "header":
            _native.store_u64(buf, RING_OFFSET + pos % CAPACITY, _word(pos, a, owners[b]))
            if c is not None:
                _native.store_u64(buf, RING_OFFSET + pos % CAPACITY + 8, c)
        else:
            _native.store_u64(buf, CTRL_OFFSET + a, (pos + 16 * b + c) % (1 << 64))
    for op, n in operations:
        try:
            _apply(q, op, n)
        except OK:
            pass
    q.stats()
