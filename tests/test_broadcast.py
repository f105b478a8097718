"""Broadcast in one process: API, ordering, policies, zero copy, numpy, roles, stats, threads.

Multi-process and crash tests are in test_broadcast_procs.py, corruption fuzzing in
test_broadcast_fuzz.py, the Latest class in test_broadcast_latest.py.
"""

from __future__ import annotations

import errno
import pickle
import struct
import threading
import zlib

import numpy as np
import pytest

import shmkit
from shmkit import layout, registry
from shmkit.broadcast import Broadcast, Publisher, Subscriber, describe_state
from shmkit.errors import (
    CorruptSegmentError,
    Empty,
    EvictedError,
    Full,
    KindMismatchError,
    LaggedError,
    MessageTooLargeError,
    PublisherExistsError,
    QueueClosed,
    ResourceLimitError,
    SegmentBusyError,
    SegmentExistsError,
    SegmentNotFoundError,
)


@pytest.fixture
def make(names):
    """Create broadcasts with unique names; close them all afterwards."""
    made: list[Broadcast] = []

    def create(capacity: int = 4096, **kwargs) -> Broadcast:
        b = Broadcast.create(names("bc"), capacity, **kwargs)
        made.append(b)
        return b
    yield create
    for b in made:
        try:
            b.close()
        except Exception:
            pass


def frame(i: int, size: int) -> bytes:
    """A self-checking message: index, crc of the body, body."""
    body = bytes((i + k) & 0xFF for k in range(size))
    return i.to_bytes(8, "little") + zlib.crc32(body).to_bytes(4, "little") + body


def check(msg: bytes) -> int:
    i = int.from_bytes(msg[:8], "little")
    assert zlib.crc32(msg[12:]) == int.from_bytes(msg[8:12], "little"), f"message {i} is torn"
    return i


# -- creation, opening, arguments --------------------------------------------------------------


def test_create_open_roundtrip_on_both_backends(backend, seg_name):
    b = Broadcast.create(seg_name, 1000, backend=backend, max_subscribers=3)
    try:
        assert b.capacity == 1024  # rounded up to 64
        assert b.max_message == 1024 // 2 - 16
        assert b.max_subscribers == 3 and b.policy == "overwrite" and b.grace == 5.0
        other = Broadcast.open(seg_name, backend=backend)
        sub = other.subscribe()
        pub = b.publisher()
        pub.publish(b"hello")
        assert sub.receive(timeout=5) == b"hello"
        other.close()
    finally:
        b.close()
        b.unlink()


def test_create_existing_name_raises_exists(make):
    b = make()
    with pytest.raises(SegmentExistsError):
        Broadcast.create(b.name, 4096)


def test_open_missing_raises_not_found(seg_name):
    with pytest.raises(SegmentNotFoundError):
        Broadcast.open(seg_name)


def test_open_other_kind_raises_kind_mismatch(seg_name):
    seg, _ = layout.create_typed(seg_name, layout.Kind.ARRAY, 64)
    seg.close()
    with pytest.raises(KindMismatchError, match="SharedArray"):
        Broadcast.open(seg_name)


@pytest.mark.parametrize("kwargs, exc", [
    ({"capacity": 64}, ValueError),
    ({"capacity": "big"}, TypeError),
    ({"capacity": 4096, "max_message": 4096}, ValueError),
    ({"capacity": 4096, "max_message": -1}, ValueError),
    ({"capacity": 4096, "max_subscribers": 0}, ValueError),
    ({"capacity": 4096, "max_subscribers": 5000}, ValueError),
    ({"capacity": 4096, "policy": "drop"}, ValueError),
    ({"capacity": 4096, "grace": -1}, ValueError),
    ({"capacity": 4096, "grace": "1"}, TypeError),
])
def test_bad_create_arguments_raise_before_creating(seg_name, kwargs, exc):
    with pytest.raises(exc):
        Broadcast.create(seg_name, **kwargs)
    assert not shmkit.segment.exists(seg_name)


def test_bad_subscribe_arguments(make):
    b = make()
    with pytest.raises(ValueError):
        b.subscribe("newest")
    with pytest.raises(ValueError):
        b.subscribe(on_lag="ignore")


def test_broadcast_pickles_by_name(make):
    b = make()
    clone = pickle.loads(pickle.dumps(b))
    try:
        assert clone.name == b.name and clone.capacity == b.capacity
        sub = clone.subscribe()
        b.publisher().publish(b"x")
        assert sub.receive(timeout=5) == b"x"
    finally:
        clone.close()


def test_publisher_and_subscriber_refuse_pickling(make):
    b = make()
    with pytest.raises(TypeError, match="pickle the Broadcast"):
        pickle.dumps(b.publisher())
    with pytest.raises(TypeError, match="pickle the Broadcast"):
        pickle.dumps(b.subscribe())


# -- messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["overwrite", "block"])
def test_messages_arrive_in_order_across_many_wraps(make, policy):
    b = make(4096, policy=policy)
    sub = b.subscribe()
    pub = b.publisher()
    sizes = [0, 1, 15, 16, 17, 100, 500, 1000, b.max_message]
    for i in range(600):
        pub.publish(frame(i, sizes[i % len(sizes)] // 2))
        assert check(sub.receive(timeout=5)) == i
    assert pub.next_seq == 600 and sub.next_seq == 600


@pytest.mark.parametrize("policy", ["overwrite", "block"])
def test_largest_messages_wrap_with_padding(make, policy):
    b = make(1024, policy=policy)  # max_message = 496: two largest records fill the ring
    sub = b.subscribe()
    pub = b.publisher()
    for i in range(400):
        size = b.max_message - 12 if i % 3 else (i * 7) % 100
        pub.publish(frame(i, size))
        assert check(sub.receive(timeout=5)) == i
    assert b.stats()["retained_bytes"] <= b.capacity


def test_bytes_like_inputs_are_accepted(make):
    b = make()
    sub = b.subscribe()
    pub = b.publisher()
    pub.publish(bytearray(b"ab"))
    pub.publish(memoryview(b"cd"))
    pub.publish(np.frombuffer(b"ef", dtype=np.uint8))
    pub.publish(b"")
    assert [sub.receive(timeout=5) for _ in range(4)] == [b"ab", b"cd", b"ef", b""]


def test_wrong_type_raises_type_error(make):
    pub = make().publisher()
    with pytest.raises(TypeError, match="bytes-like"):
        pub.publish("text")
    with pytest.raises(TypeError):
        pub.publish(12)


def test_message_of_exactly_max_message_fits_and_one_more_raises(make):
    b = make(4096, max_message=1000)
    sub = b.subscribe()
    pub = b.publisher()
    pub.publish(b"m" * 1000)
    assert sub.receive(timeout=5) == b"m" * 1000
    with pytest.raises(MessageTooLargeError, match="1001 bytes exceeds max_message"):
        pub.publish(b"m" * 1001)
    with pytest.raises(ValueError):  # MessageTooLargeError is also a ValueError
        pub.publish(b"m" * 1001)


def test_receive_timeouts_raise_empty(make):
    sub = make().subscribe()
    with pytest.raises(Empty):
        sub.receive_nowait()
    with pytest.raises(Empty):
        sub.receive(timeout=0.01)
    with pytest.raises(Empty):
        sub.receive_many(10, timeout=0.01)
    import queue
    with pytest.raises(queue.Empty):
        sub.receive(0)


def test_receive_many_takes_what_is_there(make):
    b = make(1 << 16)
    sub = b.subscribe()
    pub = b.publisher()
    assert pub.publish_many(frame(i, 10) for i in range(100)) == 100
    got = sub.receive_many(30, timeout=5)
    assert [check(m) for m in got] == list(range(30))
    got = sub.receive_many(1000, timeout=5)
    assert [check(m) for m in got] == list(range(30, 100))
    with pytest.raises(ValueError):
        sub.receive_many(0)


def test_publish_many_reports_partial_batch(make):
    b = make(4096, max_message=100)
    sub = b.subscribe()
    pub = b.publisher()
    with pytest.raises(MessageTooLargeError) as info:
        pub.publish_many([b"a", b"b", b"c" * 101, b"d"])
    assert "2 messages of the batch were published" in str(info.value.__notes__)
    assert sub.receive_many(10, timeout=5) == [b"a", b"b"]


def test_start_next_and_oldest(make):
    b = make(1 << 16)
    pub = b.publisher()
    for i in range(10):
        pub.publish(frame(i, 4))
    late = b.subscribe("next")
    oldest = b.subscribe("oldest")
    pub.publish(frame(10, 4))
    assert check(late.receive(timeout=5)) == 10
    assert [check(m) for m in oldest.receive_many(100, timeout=5)] == list(range(11))


# -- overwrite policy: lag detection ------------------------------------------------------------


def test_lag_count_equals_the_gap_exactly(make):
    b = make(4096)
    sub = b.subscribe()
    pub = b.publisher()
    expected = 0
    for burst in (5, 80, 200, 3, 1000):
        for _ in range(burst):
            pub.publish(frame(pub.next_seq, 40))
        while True:
            try:
                i = check(sub.receive_nowait())
            except LaggedError as exc:
                assert exc.missed > 0
                expected += exc.missed
                continue
            except Empty:
                break
            assert i == expected
            expected += 1
    assert expected == pub.next_seq
    assert sub.missed == b.stats()["subscribers"][0]["drops"] > 0


def test_lagged_error_is_picklable_with_count():
    exc = LaggedError("fell behind", 7)
    again = pickle.loads(pickle.dumps(exc))
    assert again.missed == 7 and str(again) == "fell behind"


def test_on_lag_skip_continues_silently_and_counts(make):
    b = make(4096)
    sub = b.subscribe(on_lag="skip")
    pub = b.publisher()
    for i in range(500):
        pub.publish(frame(i, 40))
    got = [check(m) for m in sub.receive_many(1000, timeout=5)]
    assert got == list(range(500 - len(got), 500))
    assert sub.missed == 500 - len(got)


def test_lag_in_the_middle_of_a_batch_is_raised_by_the_next_call(make):
    b = make(4096)
    sub = b.subscribe()
    pub = b.publisher()
    for i in range(10):
        pub.publish(frame(i, 40))
    with sub.receive_view() as view:  # hold the cursor, then let the publisher lap it
        assert check(bytes(view)) == 0
    for i in range(10, 300):
        pub.publish(frame(i, 40))
    with pytest.raises(LaggedError) as info:
        sub.receive_many(1000)
    retained = b.stats()["retained"]
    assert info.value.missed == 300 - 1 - retained
    assert [check(m) for m in sub.receive_many(1000)] == list(range(300 - retained, 300))


# -- zero copy ----------------------------------------------------------------------------------


def test_reserve_commits_on_exit_and_aborts_on_exception(make):
    b = make()
    sub = b.subscribe()
    pub = b.publisher()
    with pub.reserve(5) as buf:
        assert isinstance(buf, memoryview) and len(buf) == 5 and not buf.readonly
        buf[:] = b"12345"
    with pytest.raises(KeyError):
        with pub.reserve(3) as buf:
            buf[:] = b"abc"
            raise KeyError("abandon")
    pub.publish(b"after")
    assert sub.receive_many(10, timeout=5) == [b"12345", b"after"]
    with pytest.raises(MessageTooLargeError):
        with pub.reserve(b.max_message + 1):
            pass


def test_publish_inside_reserve_block_raises(make):
    pub = make().publisher()
    with pytest.raises(RuntimeError, match="reservation is open"):
        with pub.reserve(4) as buf:
            buf[:] = b"1234"
            pub.publish(b"no")


def test_receive_view_is_read_only_and_ends_with_its_block(make):
    b = make()
    sub = b.subscribe()
    pub = b.publisher()
    pub.publish(b"zero-copy")
    with sub.receive_view(timeout=5) as view:
        assert view.readonly and bytes(view) == b"zero-copy"
        with pytest.raises(TypeError):
            view[0] = 1
    with pytest.raises(ValueError):
        bytes(view)  # released


def test_view_kept_past_its_block_is_reported_and_blocks_close(make):
    b = make()
    sub = b.subscribe()
    b.publisher().publish(b"kept")
    with pytest.raises(BufferError, match="outlived"):
        with sub.receive_view(timeout=5) as view:
            kept = view[1:]
    with pytest.raises(SegmentBusyError):
        sub.close()
    assert bytes(kept) == b"ept"  # still mapped: the subscriber kept the mapping alive
    del kept, view
    sub.close()


def test_overwritten_view_raises_lagged_at_exit(make):
    b = make(4096)
    sub = b.subscribe()
    pub = b.publisher()
    pub.publish(frame(0, 40))
    with pytest.raises(LaggedError) as info:
        with sub.receive_view(timeout=5) as view:
            assert check(bytes(view)) == 0
            for i in range(1, 200):  # the publisher laps the reader meanwhile
                pub.publish(frame(i, 40))
    retained = b.stats()["retained"]
    assert info.value.missed == 200 - retained  # the viewed message counts as missed
    assert check(sub.receive(timeout=5)) == 200 - retained


def test_numpy_arrays_roundtrip_with_dtype_and_shape(make):
    b = make(1 << 16)
    sub = b.subscribe()
    pub = b.publisher()
    arrays = [
        np.arange(12.0).reshape(3, 4),
        np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        np.array(3.5),
        np.zeros((0, 4), dtype=np.uint8),
        np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
        np.array([True, False]),
    ]
    for arr in arrays:
        pub.publish_array(arr)
    for arr in arrays:
        out = sub.receive_array(timeout=5)
        assert out.dtype == arr.dtype and out.shape == arr.shape
        assert np.array_equal(out, arr)
        assert out.flags.writeable
    with pytest.raises(TypeError):
        pub.publish_array(np.array([object()]))
    pub.publish(b"not an array")
    with pytest.raises(ValueError, match="not an array message"):
        sub.receive_array(timeout=5)


# -- roles --------------------------------------------------------------------------------------


def test_second_publisher_raises_until_the_first_closes(make):
    b = make()
    first = b.publisher()
    assert isinstance(first, Publisher) and not first.took_over
    with pytest.raises(PublisherExistsError, match="already has a live publisher"):
        b.publisher()
    first.publish(b"1")
    first.close()
    with pytest.raises(ValueError, match="closed"):
        first.publish(b"x")
    second = b.publisher()
    assert second.next_seq == 1  # sequence numbers continue


def test_end_stream_lets_subscribers_drain_then_stop(make):
    b = make()
    sub = b.subscribe()
    pub = b.publisher()
    pub.publish_many([b"a", b"b"])
    pub.close(end_stream=True)
    assert list(sub) == [b"a", b"b"]
    with pytest.raises(QueueClosed):
        sub.receive(timeout=5)
    again = b.publisher()  # a new publisher reopens the stream
    again.publish(b"c")
    assert sub.receive(timeout=5) == b"c"


def test_publisher_alive_reports_the_role(make):
    b = make()
    sub = b.subscribe()
    assert not sub.publisher_alive() and not b.publisher_alive()
    pub = b.publisher()
    assert sub.publisher_alive() and b.publisher_alive()
    pub.close()
    assert not sub.publisher_alive()


# -- block policy -------------------------------------------------------------------------------


def test_block_publisher_times_out_with_full_when_nobody_reads(make):
    b = make(1024, policy="block", grace=None)
    sub = b.subscribe()
    pub = b.publisher()
    sent = 0
    with pytest.raises(Full):
        while True:
            pub.publish(b"x" * 100, timeout=0.05)
            sent += 1
    assert sent == 1024 // 128
    import queue
    with pytest.raises(queue.Full):
        pub.publish_nowait(b"x" * 100)
    assert sub.receive(timeout=5) == b"x" * 100
    pub.publish(b"x" * 100, timeout=5)  # room again


def test_block_never_loses_messages_for_a_reader_following_along(make):
    b = make(2048, policy="block")
    sub = b.subscribe()
    pub = b.publisher()
    got = []
    for i in range(3000):
        try:
            pub.publish_nowait(frame(i, i % 200))
        except Full:
            got.extend(check(m) for m in sub.receive_many(1000, timeout=5))
            pub.publish(frame(i, i % 200), timeout=5)
    got.extend(check(m) for m in sub.receive_many(1000, timeout=5))
    assert got == list(range(3000))


def test_stalled_subscriber_is_evicted_after_the_grace_period(make):
    b = make(1024, policy="block", grace=0.05)
    stalled = b.subscribe()
    pub = b.publisher()
    for i in range(50):  # far more than fits: the stalled reader is evicted on the way
        pub.publish(frame(i, 50), timeout=30)
    stats = b.stats()
    assert stats["evictions"] == 1
    assert [s["state"] for s in stats["subscribers"]] == ["evicted"]
    with pytest.raises(EvictedError, match="evicted"):
        stalled.receive(timeout=5)
    with pytest.raises(EvictedError):
        stalled.receive_nowait()
    assert b.stats()["subscribers"] == []  # the evicted subscriber freed its slot
    stalled.close()


def test_closing_a_subscriber_unblocks_the_publisher(make):
    b = make(1024, policy="block", grace=None)
    sub = b.subscribe()
    pub = b.publisher()
    while True:
        try:
            pub.publish_nowait(b"y" * 100)
        except Full:
            break
    done = threading.Event()

    def publish_one():
        pub.publish(b"z", timeout=30)
        done.set()
    t = threading.Thread(target=publish_one)
    t.start()
    sub.close()
    t.join(30)
    assert done.is_set()


def test_subscriber_limit_raises_resource_limit_and_slots_are_reused(make):
    b = make(max_subscribers=2)
    first, second = b.subscribe(), b.subscribe()
    with pytest.raises(ResourceLimitError, match="all 2 subscriber slots") as info:
        b.subscribe()
    assert info.value.errno == errno.EUSERS
    first.close()
    third = b.subscribe()
    assert third.slot == 0 and second.slot == 1


# -- statistics ---------------------------------------------------------------------------------


def test_stats_report_publisher_subscribers_lag_and_drops(make):
    b = make(4096)
    a, c = b.subscribe(), b.subscribe()
    pub = b.publisher()
    assert (a.slot, c.slot) == (0, 1)
    for i in range(5):
        pub.publish(b"s" * 10)
    a.receive_many(3)
    st = b.stats()
    assert st["published"] == 5 and st["published_bytes"] == 50 and st["retained"] == 5
    assert st["publisher"]["alive"] and not st["ended"]
    lags = {s["slot"]: (s["position"], s["lag"], s["received"]) for s in st["subscribers"]}
    assert lags == {0: (3, 2, 3), 1: (0, 5, 0)}
    assert all(s["alive"] and s["state"] == "active" for s in st["subscribers"])


def test_describe_state_works_on_a_read_only_mapping_and_through_the_registry(make):
    b = make()
    sub = b.subscribe()
    b.publisher().publish(b"1")  # the publisher is dropped at once: the role is released
    seg = shmkit.Segment.open(b.name, readonly=True)
    try:
        header = layout.read(seg, layout.Kind.BROADCAST)
        state = describe_state(seg, header)
        assert state["published"] == 1 and len(state["subscribers"]) == 1
        assert state["publisher"] is None and state["subscribers"][0]["slot"] == sub.slot
        assert registry.state_function(layout.Kind.BROADCAST) is describe_state
        assert registry.state_function(layout.Kind.LATEST) is describe_state
    finally:
        seg.close()


def test_damaged_header_params_raise_corrupt_on_open(make):
    b = make()
    import struct
    struct.pack_into("<Q", b.segment.buf, 64, 12345)  # params[0] = capacity
    with pytest.raises(CorruptSegmentError, match="impossible sizes"):
        Broadcast.open(b.name)


# -- threads and lifetime -------------------------------------------------------------------------


def test_threads_each_with_their_own_subscriber_see_every_message(make):
    b = make(1 << 14, policy="block")
    subs = [b.subscribe() for _ in range(4)]
    results: list[list[int]] = [[] for _ in subs]

    def read(k):
        while len(results[k]) < 2000:
            results[k].extend(check(m) for m in subs[k].receive_many(100, timeout=30))
    threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    pub = b.publisher()
    for i in range(2000):
        pub.publish(frame(i, i % 64), timeout=30)
    for t in threads:
        t.join(60)
    assert all(r == list(range(2000)) for r in results)


def test_threads_sharing_one_subscriber_split_the_messages(make):
    b = make(1 << 14, policy="block")
    sub = b.subscribe()
    seen: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def read():
        while not stop.is_set():
            try:
                got = [check(m) for m in sub.receive_many(7, timeout=0.05)]
            except Empty:
                continue
            with lock:
                seen.extend(got)
    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    pub = b.publisher()
    for i in range(3000):
        pub.publish(frame(i, 8), timeout=30)
    import time
    give_up = time.monotonic() + 60  # a bound, not a timing assertion
    while len(seen) < 3000 and all(t.is_alive() for t in threads) and time.monotonic() < give_up:
        threading.Event().wait(0.01)
    stop.set()
    for t in threads:
        t.join(30)
    assert sorted(seen) == list(range(3000))


def test_closing_a_subscriber_wakes_its_waiting_thread(make):
    b = make()
    sub = b.subscribe()
    errors = []

    def wait():
        try:
            sub.receive(timeout=30)
        except Exception as exc:  # noqa: BLE001 - we assert on it
            errors.append(exc)
    t = threading.Thread(target=wait)
    t.start()
    threading.Event().wait(0.05)
    sub.close()
    t.join(30)
    assert not t.is_alive() and errors and isinstance(errors[0], (ValueError, RuntimeError))
    assert sub.closed


def test_broadcast_close_closes_its_children_and_frees_roles(make, names):
    b = make()
    sub = b.subscribe()
    pub = b.publisher()
    other = Broadcast.open(b.name)
    b.close()
    b.close()  # twice is fine
    assert sub.closed and pub.closed
    assert other.stats()["subscribers"] == [] and other.stats()["publisher"] is None
    other.publisher().publish(b"ok")
    other.close()
    with pytest.raises(ValueError, match="closed"):
        b.subscribe()


def test_reentrant_use_from_an_iterator_is_refused(make):
    b = make()
    pub = b.publisher()

    def messages():
        yield b"a"
        pub.publish(b"inner")
        yield b"b"
    with pytest.raises(RuntimeError, match="re-entrantly"):
        pub.publish_many(messages())
    assert isinstance(b.subscribe(), Subscriber)


# -- review regressions ---------------------------------------------------------------------------
# Offsets of control words (see the layout table in broadcast.py): these tests play the part of
# a publisher killed at a chosen instruction, or of a process scribbling on the segment.
PUB_WORD, PUB_START = 192, 200
HEAD_POS, HEAD_PAIR = 256, 272
TAIL_POS, TAIL_PAIR = 320, 328
INTENT = 384


def write_pair(buf, offset: int, seq: int, pos: int) -> None:
    """Store {seq, pos} as the current value of the double-buffered pair at `offset`."""
    struct.pack_into("<QQQ", buf, offset, 0, seq, pos)


def read_pair(buf, offset: int) -> tuple[int, int]:
    idx = struct.unpack_from("<Q", buf, offset)[0]
    return struct.unpack_from("<QQ", buf, offset + 8 + 16 * (idx & 1))


def test_oldest_joiner_with_block_policy_starts_at_the_oldest_retained_message(make):
    # The publisher's "how far the tail may go" intent used to stay up after each round, so
    # start="oldest" silently started at the newest message once the ring had wrapped.
    b = make(1024, policy="block")
    pub = b.publisher()
    reader = b.subscribe()
    for i in range(200):  # many rounds of waiting for room
        pub.publish(frame(i, 40), timeout=5)
        assert check(reader.receive(timeout=5)) == i
    oldest = b.stats()["oldest_seq"]
    assert 0 < oldest < 199
    late = b.subscribe("oldest")
    assert late.next_seq == oldest
    assert check(late.receive(timeout=5)) == oldest


def test_claiming_the_role_resets_an_intent_left_by_a_killed_publisher(make):
    b = make(1024, policy="block")
    pub = b.publisher()
    for i in range(5):
        pub.publish(frame(i, 40), timeout=5)
    pub.close()
    buf = b.segment.buf
    # a publisher killed in the middle of a round leaves its intent above the tail
    struct.pack_into("<Q", buf, INTENT, struct.unpack_from("<Q", buf, HEAD_POS)[0])
    assert b.subscribe("oldest").next_seq == 5  # cannot be sure of the oldest: the head
    b.publisher()  # the next holder resets the intent
    assert b.subscribe("oldest").next_seq == 0


def test_aborted_reservation_leaves_its_padding_published(make):
    # Joining block-policy subscribers rely on the published head never lagging behind the
    # publisher's own head (where the intent may reach) outside a commit.
    b = make(1024, policy="block")
    pub = b.publisher()
    pub.publish(b"x" * 400)
    pub.publish(b"x" * 400)  # 2 * 416 bytes: 192 left before the end of the ring
    with pytest.raises(KeyError):
        with pub.reserve(300):  # does not fit before the end of the ring: padding first
            raise KeyError
    _, head = read_pair(b.segment.buf, HEAD_PAIR)
    assert head == 1024 and struct.unpack_from("<Q", b.segment.buf, HEAD_POS)[0] == 1024
    sub = b.subscribe()
    pub.publish(b"after")
    assert sub.receive(timeout=5) == b"after"


def test_view_still_exported_at_the_end_of_its_block_does_not_wedge_the_subscriber(make):
    b = make()
    sub = b.subscribe()
    pub = b.publisher()
    pub.publish(b"abcd")
    pub.publish(b"efgh")
    with pytest.raises(BufferError, match="outlived"):
        with sub.receive_view(timeout=5) as view:
            it = struct.iter_unpack("<I", view)  # holds a buffer of the view itself
    assert sub.receive(timeout=5) == b"efgh"  # used to raise "a receive_view is open"
    with pytest.raises(SegmentBusyError):
        sub.close()  # the escaped view still points into the mapping
    del it, view
    sub.close()


def test_reservation_still_exported_at_the_end_of_its_block_is_published_and_does_not_wedge(make):
    b = make()
    sub = b.subscribe()
    pub = b.publisher()
    with pytest.raises(BufferError, match="outlived"):
        with pub.reserve(4) as buf:
            buf[:] = b"wxyz"
            it = struct.iter_unpack("<I", buf)
    del it, buf
    pub.publish(b"next")  # used to raise "a reservation is open"
    assert sub.receive_many(5, timeout=5) == [b"wxyz", b"next"]


def test_tail_cursor_past_the_head_raises_corrupt_instead_of_stalling(make):
    b = make()
    sub = b.subscribe()
    pub = b.publisher()
    for i in range(3):
        pub.publish(frame(i, 40))
    buf = b.segment.buf
    head = struct.unpack_from("<Q", buf, HEAD_POS)[0]
    write_pair(buf, TAIL_PAIR, 3, head + 4096)
    struct.pack_into("<Q", buf, TAIL_POS, head + 4096)
    with pytest.raises(CorruptSegmentError, match="tail cursor"):
        sub.receive_nowait()


@pytest.mark.parametrize("pos", [2**62 + 16, 2**64 - 1024])
def test_positions_that_would_overflow_are_corrupt(make, pos):
    b = make(1024)
    buf = b.segment.buf
    for pair, word in ((HEAD_PAIR, HEAD_POS), (TAIL_PAIR, TAIL_POS)):
        write_pair(buf, pair, 0, pos)
        struct.pack_into("<Q", buf, word, pos)
    with pytest.raises(CorruptSegmentError):
        b.publisher()
    with pytest.raises(CorruptSegmentError):
        b.subscribe()


def test_role_held_under_our_own_pid_by_an_earlier_process_is_taken_over(make):
    import os

    b = make()
    buf = b.segment.buf
    # a killed publisher whose pid this process now has: same pid, other start time
    struct.pack_into("<QQ", buf, PUB_WORD, os.getpid() << 32 | 7, 1)
    pub = b.publisher()
    assert pub.took_over and pub.previous_pid == os.getpid()
    with pytest.raises(PublisherExistsError, match="this process"):
        b.publisher()  # while this process really holds it


def test_forked_child_can_close_what_a_parent_thread_was_waiting_on(make):
    # The per-object busy flag of a thread sleeping in receive() was inherited by the child,
    # where that thread does not exist: close() there waited forever.
    import os
    import signal
    import time

    b = make()
    sub = b.subscribe()
    started = threading.Event()
    got = []

    def wait():
        started.set()
        got.append(sub.receive(timeout=30))
    t = threading.Thread(target=wait)
    t.start()
    started.wait(10)
    time.sleep(0.1)  # let it reach the sleep (not a correctness wait)
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)  # a hang fails the test instead of blocking it
        code = 1
        try:
            with pytest.raises(RuntimeError, match="parent process"):
                sub.receive_nowait()
            sub.close()
            code = 0 if sub.closed else 1
        finally:
            os._exit(code)
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        status = -1
    b.publisher().publish(b"still mine")
    t.join(30)
    assert os.waitstatus_to_exitcode(status) == 0
    # the child's close left the parent's subscriber alone
    assert got == [b"still mine"] and not sub.closed
    assert [s["pid"] for s in b.stats()["subscribers"]] == [os.getpid()]


def test_nowait_twins_raise_instead_of_waiting(make):
    b = make(1024, policy="block")
    sub = b.subscribe()
    pub = b.publisher()
    with pytest.raises(Empty):
        sub.receive_many_nowait(5)
    with pytest.raises(Empty):
        sub.receive_array_nowait()
    with pytest.raises(Full) as info:
        pub.publish_many_nowait([b"z" * 200] * 10)
    assert info.value.__notes__ == ["4 messages of the batch were published"]
    with pytest.raises(Full):
        pub.publish_array_nowait(np.zeros(20))  # 128 bytes left, unread messages in the rest
    assert len(sub.receive_many_nowait(100)) == 4
    pub.publish_array_nowait(np.arange(3))
    assert np.array_equal(sub.receive_array_nowait(), np.arange(3))


def test_array_frames_with_field_names_beyond_ascii_roundtrip(make):
    b = make(1 << 14)
    sub = b.subscribe()
    pub = b.publisher()
    dtype = np.dtype([(("titre", "é"), "<f8"), ("we'ird\"\\\n\u2603", "<i2", (2,))])
    arr = np.zeros(3, dtype)
    arr["é"] = [1.5, 2.5, 3.5]
    pub.publish_array(arr)
    out = sub.receive_array(timeout=5)
    assert out.dtype == dtype and np.array_equal(out, arr)


@pytest.mark.parametrize("text", [
    "(" * 150 + ")" * 150,            # too many nested parentheses for Python's parser
    "[" * 100 + "]" * 100,
    "-" * 60000 + "1",                # MemoryError inside ast.literal_eval
    "1" + "+1" * 30000,               # RecursionError inside ast.literal_eval
    "()",                             # IndexError inside numpy's descr_to_dtype
    "[()]", "[1]", "'\\x'", "f()", "[('a', '<f8')] junk", "\udcff",
])
def test_hostile_dtype_text_in_an_array_frame_raises_value_error(make, text):
    from shmkit.broadcast import _ARRAY_HEAD, _ARRAY_MAGIC

    b = make(1 << 18)
    sub = b.subscribe()
    pub = b.publisher()
    raw = text.encode("utf-8", "surrogateescape")
    head = _ARRAY_HEAD.pack(_ARRAY_MAGIC, 1, 1, len(raw), 8) + struct.pack("<Q", 1) + raw
    pub.publish(head + b"\0" * (-len(head) % 16) + b"\0" * 8)
    with pytest.raises(ValueError, match="not an array message"):
        sub.receive_array(timeout=5)
    pub.publish(b"next")
    assert sub.receive(timeout=5) == b"next"
