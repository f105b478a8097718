"""Queue: API, edges, zero copy, numpy/pickle helpers, closing, threads, other processes."""

from __future__ import annotations

import pickle
import queue as stdlib_queue
import random
import threading

import numpy as np
import pytest

import shmkit
from shmkit import _native, layout
from shmkit.errors import (
    CorruptSegmentError,
    Empty,
    Full,
    KindMismatchError,
    MessageTooLargeError,
    QueueClosed,
    SegmentExistsError,
)
from shmkit.queue import Queue, describe_state
from procs import run_python


@pytest.fixture
def q(seg_name):
    queue = Queue.create(seg_name, capacity=4096)
    yield queue
    queue.detach()


def test_put_get_roundtrip_bytes_and_buffers(q):
    q.put(b"hello")
    q.put(bytearray(b"ba"))
    q.put(memoryview(b"mv"))
    q.put(np.arange(3, dtype=np.uint8))
    assert [q.get(), q.get(), q.get(), q.get()] == [b"hello", b"ba", b"mv", b"\x00\x01\x02"]


def test_zero_length_and_exactly_max_size_messages(seg_name):
    q = Queue.create(seg_name, capacity=1040, max_message=1000)
    try:
        q.put(b"")
        assert q.get_nowait() == b""
        big = bytes(range(256)) * 3 + b"x" * 232
        assert len(big) == 1000
        for _ in range(5):   # at several ring offsets, needing a wrap each time
            q.put(big, timeout=5)
            assert q.get(timeout=5) == big
            q.put(b"y" * 40)
            assert q.get() == b"y" * 40
    finally:
        q.detach()


def test_oversize_message_raises_message_too_large_naming_size_and_limit(seg_name):
    q = Queue.create(seg_name, capacity=4096, max_message=100)
    try:
        with pytest.raises(MessageTooLargeError, match=r"101 bytes.*100-byte limit") as info:
            q.put(b"x" * 101)
        assert isinstance(info.value, ValueError)
        with pytest.raises(MessageTooLargeError):
            q.reserve(101).__enter__()
        assert q.qsize() == 0
    finally:
        q.detach()


def test_create_rejects_bad_sizes_before_any_syscall(seg_name):
    with pytest.raises(TypeError, match="capacity"):
        Queue.create(seg_name, capacity="big")
    with pytest.raises(ValueError, match="capacity"):
        Queue.create(seg_name, capacity=10)
    with pytest.raises(ValueError, match="max_message"):
        Queue.create(seg_name, capacity=1024, max_message=1024)
    with pytest.raises(TypeError, match="max_message"):
        Queue.create(seg_name, capacity=1024, max_message=1.5)
    assert not shmkit.segment.exists(seg_name)


def test_wrong_types_raise_type_error(q):
    for bad in ("text", 42, None, [b"x"]):
        with pytest.raises(TypeError, match="bytes-like"):
            q.put(bad)
    with pytest.raises(TypeError):
        q.put_many([b"ok", "not bytes"])
    assert q.get_nowait() == b"ok"   # the messages before the bad one were put
    with pytest.raises(TypeError):
        q.get_many("3")
    with pytest.raises(ValueError):
        q.get_many(0)
    with pytest.raises(TypeError):
        q.put_array([1, 2, 3])
    with pytest.raises(TypeError):
        q.put_array(np.array([object()]))
    with pytest.raises(TypeError):
        Queue()


def test_full_and_empty_edges_without_waiting(q):
    with pytest.raises(Empty) as info:
        q.get_nowait()
    assert isinstance(info.value, stdlib_queue.Empty)
    count = 0
    with pytest.raises(Full) as full:
        while True:
            q.put_nowait(count.to_bytes(4, "little") * 25)   # 100 bytes -> 128-byte records
            count += 1
    assert isinstance(full.value, stdlib_queue.Full)
    assert count == (4096 - 16) // 128
    assert [int.from_bytes(q.get_nowait()[:4], "little") for _ in range(count)] == list(range(count))
    with pytest.raises(Empty):
        q.get_nowait()


def test_timeouts_raise_full_and_empty(q):
    with pytest.raises(Empty, match="after the timeout"):
        q.get(timeout=0.05)
    with pytest.raises(Empty):
        q.get_many(10, timeout=0.01)
    while True:
        try:
            q.put_nowait(b"z" * 500)
        except Full:
            break
    with pytest.raises(Full, match="after the timeout"):
        q.put(b"z" * 500, timeout=0.05)
    with pytest.raises(ValueError, match="timeout"):
        q.get(timeout=-1)


@pytest.mark.parametrize("capacity", [1000, 4096, 777 * 16])
def test_wrap_around_keeps_order_and_content(seg_name, capacity):
    q = Queue.create(seg_name, capacity=capacity)
    rng = random.Random(capacity)
    sent = received = 0
    pending: list[bytes] = []
    try:
        for _ in range(3000):
            if rng.random() < 0.55:
                msg = bytes([sent % 251]) * rng.randrange(0, min(300, q.max_message))
                try:
                    q.put_nowait(msg)
                    pending.append(msg)
                    sent += 1
                except Full:
                    pass
            elif pending:
                assert q.get_nowait() == pending.pop(0)
                received += 1
        assert q.get_many(10_000) == pending if pending else True
        assert q.stats()["used_bytes"] <= capacity
    finally:
        q.detach()


def test_put_many_and_get_many_keep_order(q):
    msgs = [bytes([i]) * i for i in range(40)]
    q.put_many(msgs)
    got = q.get_many(25)
    assert got == msgs[:25]
    assert q.get_many(100) == msgs[25:]
    q.put_many(iter([b"a", b"b"]))
    assert q.get_many(5) == [b"a", b"b"]


def test_put_many_reports_how_many_went_in_when_full(q):
    with pytest.raises(Full) as info:
        q.put_many([b"x" * 1000] * 10, timeout=0.02)
    assert info.value.put_count == 3
    assert len(q.get_many(10)) == 3


def test_reserve_commits_on_success_and_aborts_on_exception(q):
    with q.reserve(5) as buf:
        buf[:] = b"first"
    with pytest.raises(RuntimeError):
        with q.reserve(6) as buf:
            buf[:] = b"broken"
            raise RuntimeError("producer failed half way")
    with q.reserve(0):
        pass
    q.put(b"after")
    assert [q.get_nowait(), q.get_nowait(), q.get_nowait()] == [b"first", b"", b"after"]
    with pytest.raises(Empty):
        q.get_nowait()
    assert q.stats()["aborted"] == 0   # an abort by its own producer is not a crash


def test_reserved_record_does_not_block_later_messages(q):
    with q.reserve(10) as buf:
        q.put(b"later")                      # another producer, in effect
        assert q.get_nowait() == b"later"    # consumers take it past the open reservation
        buf[:] = b"0123456789"
    assert q.get_nowait() == b"0123456789"


def test_get_view_reads_in_place_and_invalidates_the_view(q):
    q.put(b"in place")
    with q.get_view() as view:
        assert view.readonly
        assert bytes(view) == b"in place"
    with pytest.raises(ValueError):
        bytes(view)
    assert q.stats()["depth_messages"] == 0


def test_get_view_with_escaped_array_raises_buffer_error_and_still_frees(q):
    q.put(b"12345678")
    with pytest.raises(BufferError, match="copy what you need"):
        with q.get_view() as view:
            kept = np.frombuffer(view, dtype=np.uint8)
    del kept
    assert q.stats()["being_read"] == 0


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float64).reshape(2, 3, 4),
    np.arange(20, dtype=">i4")[::3],                       # non-contiguous, big-endian
    np.zeros((0, 5), dtype=np.int16),
    np.array(3.5, dtype=np.float32),                        # 0-d
    np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i2"), ("b", "<f8")]),
    np.ones((3, 3), dtype=np.complex64).T,
    np.array([b"ab", b"cde"]),
])
def test_arrays_roundtrip_with_dtype_and_shape(q, array):
    q.put_array(array)
    out = q.get_array(timeout=5)
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable


def test_get_array_on_a_plain_message_raises_value_error(q):
    q.put(b"not an array")
    with pytest.raises(ValueError, match="not a put_array"):
        q.get_array()


def test_put_obj_sends_buffers_out_of_band(q):
    big = np.arange(300, dtype=np.int64)
    obj = {"array": big, "text": "héllo", "raw": bytearray(b"xyz"), "n": [1, 2, 3]}
    q.put_obj(obj)
    inband = len(pickle.dumps(obj, protocol=5))
    assert q.stats()["depth_bytes"] < inband + 200   # the array is not also in the pickle
    out = q.get_obj()
    np.testing.assert_array_equal(out["array"], big)
    assert out["text"] == "héllo" and out["raw"] == bytearray(b"xyz") and out["n"] == [1, 2, 3]


def test_close_lets_consumers_drain_then_raises_queue_closed(seg_name):
    producer = Queue.create(seg_name, capacity=4096)
    consumer = Queue.open(seg_name)
    try:
        producer.put(b"one")
        producer.put(b"two")
        producer.close()
        assert consumer.closed
        with pytest.raises(QueueClosed):
            consumer.put(b"three")
        assert list(consumer) == [b"one", b"two"]
        with pytest.raises(QueueClosed):
            consumer.get_nowait()
        with pytest.raises(QueueClosed):
            consumer.get(timeout=1)
        producer.close()   # twice is fine
    finally:
        consumer.detach()


def test_close_wakes_a_blocked_consumer_and_producer(seg_name):
    q = Queue.create(seg_name, capacity=1024)
    other = Queue.open(seg_name)
    results = []

    def consume():
        try:
            q.get(timeout=20)
        except QueueClosed:
            results.append("closed")

    try:
        thread = threading.Thread(target=consume)
        thread.start()
        while q.stats()["waiting_consumers"] == 0:
            threading.Event().wait(0.001)
        other.close()
        thread.join(20)
        assert results == ["closed"]
    finally:
        q.detach()


def test_detach_while_threads_wait_is_refused(q):
    thread = threading.Thread(target=lambda: pytest.raises(Empty, q.get, timeout=0.5))
    thread.start()
    while q.stats()["waiting_consumers"] == 0 and thread.is_alive():
        threading.Event().wait(0.001)
    if thread.is_alive():
        with pytest.raises(BufferError, match="blocked"):
            q.detach()
    thread.join(5)


def test_threads_share_one_queue_exactly_once(seg_name):
    q = Queue.create(seg_name, capacity=8192)
    per_thread, producers, consumers = 3000, 4, 3
    got: list[list[bytes]] = [[] for _ in range(consumers)]

    def produce(i):
        for n in range(per_thread):
            q.put(b"%d:%d" % (i, n), timeout=20)

    def consume(i):
        try:
            while True:
                got[i].extend(q.get_many(16, timeout=20))
        except QueueClosed:
            pass

    try:
        cons = [threading.Thread(target=consume, args=(i,)) for i in range(consumers)]
        prods = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
        for t in cons + prods:
            t.start()
        for t in prods:
            t.join(60)
        Queue.open(seg_name).close()
        for t in cons:
            t.join(60)
        everything = [m for part in got for m in part]
        assert len(everything) == len(set(everything)) == per_thread * producers
        for part in got:   # each consumer sees each producer's messages in order
            last = {}
            for m in part:
                i, n = map(int, m.split(b":"))
                assert n > last.get(i, -1)
                last[i] = n
    finally:
        q.detach()


def test_unrelated_process_opens_by_name_and_sees_messages(seg_name):
    q = Queue.create(seg_name, capacity=4096)
    try:
        q.put(b"from parent")
        out = run_python(
            "import sys\nfrom shmkit.queue import Queue\n"
            "q = Queue.open(sys.argv[1])\n"
            "print(q.get(timeout=5).decode())\n"
            "q.put(b'from child')\n", seg_name, timeout=30)
        assert out.stdout.strip() == "from parent"
        assert q.get(timeout=5) == b"from child"
        stats = q.stats()
        assert stats["total_put"] == 2 and stats["total_got"] == 2
    finally:
        q.detach()


def test_pickles_by_name(q):
    clone = pickle.loads(pickle.dumps(q))
    try:
        clone.put(b"via clone")
        assert q.get_nowait() == b"via clone"
        assert clone.name == q.name and clone.capacity == q.capacity
    finally:
        clone.detach()


def _child_put(q):
    q.put(b"from worker", timeout=10)


def test_anonymous_queue_reaches_spawned_worker():
    import multiprocessing

    q = Queue.anonymous(4096)
    try:
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=_child_put, args=(q,))
        proc.start()
        assert q.get(timeout=30) == b"from worker"
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        q.detach()


def test_stats_and_describe_state_from_another_handle(seg_name):
    q = Queue.create(seg_name, capacity=4096)
    try:
        q.put_many([b"a" * 10, b"b" * 20])
        seg, header = layout.open_typed(seg_name, layout.Kind.QUEUE, readonly=True)
        try:
            state = describe_state(seg, header)
        finally:
            seg.close()
        assert state["depth_messages"] == 2 and state["depth_bytes"] == 30
        assert state["capacity"] == 4096 and state["producers"] == 1 and state["consumers"] == 0
        assert state["total_put"] == 2 and state["closed"] is False
        assert q.qsize() == 2 and not q.empty()
    finally:
        q.detach()


def test_open_rejects_other_kinds_and_existing_names(seg_name):
    seg, _ = layout.create_typed(seg_name, layout.Kind.MUTEX, 64)
    seg.close()
    with pytest.raises(KindMismatchError, match="Mutex"):
        Queue.open(seg_name)
    with pytest.raises(SegmentExistsError):
        Queue.create(seg_name, capacity=4096)


def test_detached_queue_refuses_use(q):
    q.detach()
    with pytest.raises(ValueError, match="closed in this process"):
        q.put(b"x")
    q.detach()


def test_sysv_backend_works(names):
    name = names()
    q = Queue.create(name, capacity=4096, backend="sysv")
    try:
        q.put(b"sysv")
        other = Queue.open(name, backend="sysv")
        assert other.get(timeout=5) == b"sysv"
        other.detach()
    finally:
        q.unlink()
        q.detach()


def test_corrupt_control_block_is_detected_on_open(seg_name):
    q = Queue.create(seg_name, capacity=4096)
    q.segment.buf[128:136] = b"garbage!"   # the ring magic
    q.detach()
    with pytest.raises(CorruptSegmentError, match="shmkit rm"):
        Queue.open(seg_name)


def test_ring_type_is_the_hot_path():
    # put/get must be C methods of the type, not Python wrappers (one call per message).
    assert type(Queue.put).__name__ == "method_descriptor"
    assert type(Queue.get).__name__ == "method_descriptor"
    assert issubclass(Queue, _native.Ring)


# -- review regressions: C-API and ownership ----------------------------------------------------

def test_put_many_copies_messages_another_thread_drops_from_the_list(seg_name):
    """put_many waits without the GIL; meanwhile the caller's list may be cleared and its bytes
    objects freed. What goes into the ring must still be the messages as they were passed."""
    q = Queue.create(seg_name, capacity=1 << 16)
    try:
        q.put(b"f" * 65000)   # no room for the batch below until this one is taken
        items = [bytes([65 + i]) * 600 for i in range(10)]
        expected = [bytes([65 + i]) * 600 for i in range(10)]
        errors = []
        thread = threading.Thread(target=lambda: _catch(errors, q.put_many, items, timeout=30))
        thread.start()
        while q.stats()["waiting_producers"] == 0 and thread.is_alive():
            threading.Event().wait(0.001)
        items.clear()                                            # frees the bytes objects...
        reuse = [bytes([90]) * 600 for _ in range(50)]           # ...and reuses their memory
        assert q.get(timeout=10) == b"f" * 65000
        thread.join(30)
        assert not errors
        assert q.get_many(100, timeout=10) == expected
        del reuse
    finally:
        q.detach()


def _catch(errors, func, *args, **kwargs):
    try:
        func(*args, **kwargs)
    except Exception as exc:   # reported by the test
        errors.append(exc)


def test_put_many_puts_every_message_before_a_bad_item_even_when_a_batch_is_cut(seg_name):
    # 4 records of 1040 bytes in a 4096-byte ring: the claim for the batch stops at the ring's
    # end, so the messages before the bad item need more than one reservation.
    q = Queue.create(seg_name, capacity=4096)
    try:
        q.put(b"w" * 1000)
        assert q.get() == b"w" * 1000
        with pytest.raises(TypeError) as info:
            q.put_many([b"a" * 1000, b"b" * 1000, b"c" * 1000, "bad", b"d"])
        assert info.value.put_count == 3
        assert q.get_many(10) == [b"a" * 1000, b"b" * 1000, b"c" * 1000]
    finally:
        q.detach()


def test_out_of_memory_in_a_get_gives_the_message_back(q):
    """A MemoryError inside get/get_many/get_view must not lose (or strand) a message."""
    _testcapi = pytest.importorskip("_testcapi")
    for name in ("get", "get_many", "get_view"):
        for start in range(0, 30):
            msgs = [b"%s-%d-%d" % (name.encode(), start, i) * 3 for i in range(4)]
            q.put_many(msgs)
            block = q.get_view(timeout=0)
            result = None
            _testcapi.set_nomemory(start, 0)   # allocations fail from the start-th on
            try:
                if name == "get":
                    result = q.get_nowait()
                elif name == "get_many":
                    result = q.get_many(10, timeout=0)
                else:
                    result = block.__enter__()
            except MemoryError:
                pass
            finally:
                _testcapi.remove_mem_hooks()
            if name == "get":
                first = [] if result is None else [result]
            elif name == "get_many":
                first = result or []
            else:
                first = [] if result is None else [bytes(result)]
                if result is not None:
                    block.__exit__(None, None, None)
            rest = []
            while True:
                try:
                    rest.extend(q.get_many(10, timeout=0))
                except Empty:
                    break
            assert first + rest == msgs, (name, start)
            assert q.stats()["being_read"] == 0


@pytest.mark.parametrize("kind", ["reserve", "get_view"])
def test_zero_copy_block_finishes_its_record_when_something_pins_the_view(q, kind):
    """pickle.PickleBuffer holds a buffer of the memoryview itself, so releasing the view
    fails; the record must still be committed / freed, or the ring's space is held forever."""
    if kind == "reserve":
        with pytest.raises(BufferError):
            with q.reserve(8) as buf:
                buf[:] = b"pinned!!"
                pin = pickle.PickleBuffer(buf)
        assert q.stats()["being_written"] == 0
        assert q.get_nowait() == b"pinned!!"
    else:
        q.put(b"pinned")
        with pytest.raises(BufferError):
            with q.get_view() as view:
                pin = pickle.PickleBuffer(view)
        assert q.stats()["being_read"] == 0 and q.stats()["depth_messages"] == 0
    del pin
    for _ in range(3):   # the whole ring is usable again
        q.put_many([b"z" * 400] * 9, timeout=5)
        assert len(q.get_many(100, timeout=5)) == 9


def test_reservation_made_by_a_thread_that_exited_is_not_recovered(seg_name):
    """Records belong to the process: a thread may reserve, exit, and another commit."""
    q = Queue.create(seg_name, capacity=4096)
    other = Queue.open(seg_name)
    try:
        held = {}

        def enter():
            held["block"] = q.reserve(8)
            held["buf"] = held["block"].__enter__()
            held["view_block"] = q.get_view()
            held["view"] = held["view_block"].__enter__()

        q.put(b"read me")
        thread = threading.Thread(target=enter)
        thread.start()
        thread.join(10)
        assert not other._recover()            # the process lives: nothing to recover
        assert run_python("import sys\nfrom shmkit.queue import Queue\n"
                          "print(Queue.open(sys.argv[1])._recover())", seg_name).stdout.split() == ["False"]
        held["buf"][:] = b"12345678"
        assert bytes(held["view"]) == b"read me"
        held.pop("buf"), held.pop("view")
        held["block"].__exit__(None, None, None)
        held["view_block"].__exit__(None, None, None)
        assert q.get_nowait() == b"12345678"
        assert q.stats()["lost"] == q.stats()["aborted"] == 0
    finally:
        other.detach()
        q.detach()


def _fork_child(q, what):
    import os
    if what == "put_detach":
        q.put(b"from the child")
        q.detach()
    elif what == "detach":
        q.detach()
    os._exit(0)


def test_forked_child_leaves_the_parents_attachment_slot_alone(q):
    import multiprocessing

    q.put(b"from the parent")
    child = multiprocessing.get_context("fork").Process(target=_fork_child, args=(q, "put_detach"))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    stats = q.stats()
    assert stats["attached"] == 1 and stats["producers"] == 1 and stats["total_put"] == 2


def test_forked_child_can_detach_while_a_parent_thread_waits(q):
    import multiprocessing

    waiter = threading.Thread(target=lambda: pytest.raises(QueueClosed, q.get, timeout=30))
    waiter.start()
    try:
        while q.stats()["waiting_consumers"] == 0:
            threading.Event().wait(0.001)
        child = multiprocessing.get_context("fork").Process(target=_fork_child, args=(q, "detach"))
        child.start()
        child.join(30)
        assert child.exitcode == 0   # an exception in the child would exit 1
    finally:
        other = Queue.open(q.name)
        other.close()
        waiter.join(30)


@pytest.mark.parametrize("capacity", [4096, 1000])
def test_positions_across_the_tag_wrap(seg_name, capacity):
    """Tags are pos >> 4 on 38 bits: they wrap at 2^42 bytes of traffic. Start the ring just
    before that and move 3 capacities' worth of messages across the wrap."""
    q = Queue.create(seg_name, capacity=capacity)
    try:
        buf = q.segment.buf
        cap = q.capacity
        start = (1 << 42) - cap - (1 << 42) % 16 - 160
        start -= start % 16
        for cursor in (64, 128, 192):                 # tail, head, free
            _native.store_u64(buf, 128 + cursor, start)
        vacant = (((start >> 4) & ((1 << 38) - 1)) << 26) | (1 << 22)
        _native.store_u64(buf, 4096 + start % cap, vacant)
        rng = random.Random(7)
        sent = []
        for i in range(200):
            msg = bytes([i % 256]) * rng.randrange(0, 200)
            q.put(msg, timeout=5)
            sent.append(msg)
            if len(sent) > 3 or rng.random() < 0.5:
                assert q.get(timeout=5) == sent.pop(0)
        while sent:
            assert q.get(timeout=5) == sent.pop(0)
        assert _native.load_u64(buf, 128 + 192) > 1 << 42
        assert "problem" not in q.stats()
    finally:
        q.detach()
