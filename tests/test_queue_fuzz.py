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
from shmkit.errors import CorruptSegmentError, Empty, Full, KindMismatchError, QueueClosed
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
        q.put_nowait(m)


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
    except (CorruptSegmentError, KindMismatchError):
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
