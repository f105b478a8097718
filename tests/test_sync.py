"""shmkit.sync in one process: API, errors, threads, placement, pickling, corrupt memory.

Cross-process behaviour (contention, SIGKILL of holders, SIGINT) is in test_sync_procs.py.
"""

from __future__ import annotations

import pickle
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmkit
from shmkit import (
    AtomicInt,
    AtomicU32,
    Barrier,
    BrokenBarrierError,
    Condition,
    CorruptSegmentError,
    Event,
    KindMismatchError,
    LockNotOwnedError,
    Mutex,
    ResourceLimitError,
    RWLock,
    Segment,
    SegmentBusyError,
    Semaphore,
    WaitTimeoutError,
    _native,
    layout,
    sync,
)

# Generous bounds for waits that must succeed; they only matter if something is broken.
LONG = 10.0


def in_thread(fn, *args):
    """Run fn in a thread; return (thread, result list) — join with a timeout."""
    out: list = []

    def run():
        try:
            out.append(fn(*args))
        except BaseException as exc:  # surfaced by the test
            out.append(exc)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def joined(t: threading.Thread, out: list):
    t.join(LONG)
    assert not t.is_alive(), "thread did not finish"
    return out[0]


@pytest.fixture
def user_seg(names, backend):
    """A plain 4 KiB segment to place objects in."""
    seg = Segment.create(names("user"), 4096, backend=backend)
    yield seg
    try:
        seg.close()
    except SegmentBusyError:
        pass
    seg.unlink()


# ---- Mutex ------------------------------------------------------------------------------------

def test_mutex_standalone_is_shared_between_objects(backend, seg_name):
    a = Mutex.create(seg_name, backend=backend)
    b = Mutex.open(seg_name, backend=backend)
    assert a.acquire()
    assert b.locked() and b.owner_pid == a.owner_pid != 0
    with pytest.raises(RuntimeError):  # same thread through another object: still a deadlock
        b.acquire(timeout=0.01)
    a.release()
    assert not b.locked() and b.owner_pid == 0
    with b:
        assert a.locked()
    assert not a.locked()
    b.close()
    a.unlink()
    a.close()


def test_mutex_relock_from_same_thread_raises_instead_of_deadlock(seg_name):
    m = Mutex.create(seg_name)
    with m:
        for call in (m.acquire, lambda: m.acquire(False), lambda: m.acquire(timeout=1)):
            with pytest.raises(RuntimeError, match="already holds"):
                call()
    m.close()


def test_mutex_release_by_other_thread_raises_lock_not_owned(seg_name):
    m = Mutex.create(seg_name)
    m.acquire()
    t, out = in_thread(m.release)
    err = joined(t, out)
    assert isinstance(err, LockNotOwnedError) and isinstance(err, RuntimeError)
    assert m.locked()
    m.release()
    with pytest.raises(LockNotOwnedError, match="does not hold"):
        m.release()
    m.close()


def test_mutex_timeouts_and_nonblocking_forms(seg_name):
    m = Mutex.create(seg_name)
    held, release = threading.Event(), threading.Event()

    def holder():
        with m:
            held.set()
            release.wait(LONG)
    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(LONG)
    assert m.acquire(False) is False
    assert m.acquire(blocking=False, timeout=-1) is False
    assert m.acquire(timeout=0) is False
    assert m.acquire(timeout=0.05) is False
    with pytest.raises(WaitTimeoutError, match="without waiting"):
        m.acquire_nowait()
    release.set()
    t.join(LONG)
    assert m.acquire(timeout=LONG)
    m.release()
    m.acquire_nowait()
    m.release()
    m.close()


def test_mutex_rejects_bad_acquire_arguments(seg_name):
    m = Mutex.create(seg_name)
    with pytest.raises(ValueError, match="non-blocking"):
        m.acquire(False, 1.0)
    with pytest.raises(ValueError, match="timeout"):
        m.acquire(timeout=-2)
    with pytest.raises(TypeError):
        m.acquire(timeout="soon")
    with pytest.raises(TypeError):
        m.acquire(bogus=1)
    assert not m.locked()
    m.close()


def test_with_block_releases_on_exception(seg_name):
    m = Mutex.create(seg_name)
    with pytest.raises(KeyError):
        with m:
            raise KeyError("x")
    assert not m.locked()
    m.close()


def test_mutex_held_by_thread_that_ended_is_recovered(seg_name):
    m = Mutex.create(seg_name)
    t = threading.Thread(target=m.acquire)
    t.start()
    t.join(LONG)
    assert m.locked() and not m.recovered
    assert m.acquire(timeout=LONG)
    assert m.recovered
    m.mark_consistent()
    assert not m.recovered
    m.release()
    # the next release clears it too
    t = threading.Thread(target=m.acquire)
    t.start()
    t.join(LONG)
    assert m.acquire(timeout=LONG) and m.recovered
    m.release()
    assert not m.recovered
    m.close()


def test_mark_consistent_needs_the_lock(seg_name):
    m = Mutex.create(seg_name)
    with pytest.raises(LockNotOwnedError):
        m.mark_consistent()
    m.close()


def test_eight_threads_hammering_one_mutex_stay_exact(seg_name):
    m = Mutex.create(seg_name)
    seg = Segment.create(seg_name + "-data", 64)
    counter = struct.Struct("<q")
    n, threads = 3000, 8

    def work():
        for _ in range(n):
            with m:
                (v,) = counter.unpack_from(seg.buf, 0)
                counter.pack_into(seg.buf, 0, v + 1)
    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts)
    assert counter.unpack_from(seg.buf, 0)[0] == n * threads
    assert not m.locked()
    seg.close()
    seg.unlink()
    m.close()


def test_two_objects_on_same_memory_in_one_process_exclude_each_other(user_seg):
    a = Mutex.create_at(user_seg, 64)
    b = Mutex.at(user_seg, 64)
    ready = threading.Event()
    with a:
        t, out = in_thread(lambda: (ready.set(), b.acquire(timeout=0.05))[1])
        assert joined(t, out) is False
    assert b.acquire(timeout=LONG)
    b.release()
    a.close()
    b.close()


# ---- placement, lifetime, pickling, kinds -----------------------------------------------------

@pytest.mark.parametrize("cls,args", [
    (Mutex, ()), (Semaphore, (2,)), (Event, ()), (Condition, ()), (RWLock, ()),
    (Barrier, (2,)), (AtomicInt, (5,)), (AtomicU32, (5,)),
])
def test_every_kind_standalone_placed_and_pickled(cls, args, backend, seg_name, user_seg):
    obj = cls.create(seg_name, *args, backend=backend)
    assert obj.name == seg_name and obj.offset == layout.PAYLOAD_OFFSET
    seg, header = layout.open_typed(seg_name, cls.KIND, backend=backend)
    assert header.kind.label == cls.__name__
    state = sync.describe_state(seg, header)
    assert isinstance(state, dict) and state == obj.state()
    seg.close()
    clone = pickle.loads(pickle.dumps(obj))
    assert type(clone) is cls and clone.name == seg_name
    clone.close()

    offset = 256
    placed = cls.create_at(user_seg, offset, *args)
    again = pickle.loads(pickle.dumps(placed))
    assert again.segment.name == user_seg.name and again.offset == offset
    assert again.state() == placed.state()
    for o in (again, placed):
        o.close()
    with pytest.raises(ValueError, match="no name of its own"):
        cls.at(user_seg, offset).unlink()
    obj.unlink()
    obj.close()
    obj.close()  # twice is fine


def test_constructor_is_not_the_way_in():
    with pytest.raises(TypeError, match=r"Mutex.create\(name\)"):
        Mutex()


def test_open_wrong_kind_raises_kind_mismatch(seg_name, names):
    sem = Semaphore.create(seg_name)
    with pytest.raises(KindMismatchError, match="is a Semaphore, not a Mutex"):
        Mutex.open(seg_name)
    qname = names("q")
    seg, _ = layout.create_typed(qname, layout.Kind.QUEUE, 64)
    for cls in (Mutex, Event, RWLock, Barrier, AtomicInt):
        with pytest.raises(KindMismatchError, match="is a Queue"):
            cls.open(qname)
    with pytest.raises(ValueError, match="not a synchronisation primitive"):
        sync.describe_state(seg, layout.read(seg, None))
    seg.close()
    sem.close()


def test_open_foreign_segment_raises_corrupt(seg_name):
    seg = Segment.create(seg_name, 4096)
    seg.buf[:8] = b"garbage!"
    with pytest.raises(CorruptSegmentError):
        Mutex.open(seg_name)
    seg.close()


def test_at_checks_alignment_bounds_and_access(user_seg, backend):
    with pytest.raises(ValueError, match="ALIGNMENT"):
        Mutex.at(user_seg, 2)
    with pytest.raises(ValueError, match="ALIGNMENT"):
        AtomicInt.at(user_seg, 4)
    with pytest.raises(ValueError, match="needs 24 bytes"):
        Mutex.at(user_seg, 4096 - 8)
    with pytest.raises(TypeError):
        Mutex.at(bytearray(64), 0)
    ro = Segment.open(user_seg.name, backend=backend, readonly=True)
    with pytest.raises(ValueError, match="read-only"):
        Mutex.at(ro, 0)
    ro.close()


def test_segment_cannot_close_under_a_placed_object(user_seg):
    m = Mutex.create_at(user_seg, 0)
    with pytest.raises(SegmentBusyError):
        user_seg.close()
    m.close()
    with pytest.raises(ValueError, match="closed"):
        m.acquire()
    user_seg.close()


def test_close_while_a_thread_waits_inside_raises_busy(seg_name):
    ev = Event.create(seg_name)
    t, out = in_thread(ev.wait, LONG)
    _wait_until(lambda: ev.waiters == 1)
    with pytest.raises(SegmentBusyError, match="blocked"):
        ev.close()
    ev.set()
    assert joined(t, out) is True
    ev.close()
    ev.unlink()


def test_forked_child_can_close_what_a_parent_thread_waits_in(seg_name, names):
    # The parent thread blocked inside the call does not exist in the child: the child's
    # copy must not count it (before, close() raised SegmentBusyError there forever).
    import os
    ev = Event.create(seg_name)
    m = Mutex.create(names("m"))
    holder = m.acquire()
    t, out = in_thread(ev.wait, LONG)
    t2, out2 = in_thread(m.acquire, True, LONG)
    _wait_until(lambda: ev.waiters == 1 and m.waiters == 1)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 1
        try:
            ev.close()
            m.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with pytest.raises(SegmentBusyError):  # here the threads are still inside
        ev.close()
    ev.set()
    assert holder and joined(t, out) is True
    m.release()
    assert joined(t2, out2) is True
    ev.close()
    m.close()


def _wait_until(pred, timeout=LONG):
    import time
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def test_spin_budget_shrinks_when_spinning_does_not_pay(seg_name):
    ev = Event.create(seg_name, spin_ns=20_000)
    assert ev._spin_budget_ns == 20_000
    for _ in range(6):  # nobody sets it: every spin ends in a sleep
        assert ev.wait(0.002) is False
    assert ev._spin_budget_ns == 5_000  # halved after each three failed spins in a row
    ev.spin_ns = 20_000  # configuring starts over
    assert ev._spin_budget_ns == 20_000
    ev.close()


def test_bad_spin_ns_is_refused_and_leaves_nothing(seg_name):
    from shmkit import segment
    with pytest.raises(ValueError, match="spin_ns"):
        Mutex.create(seg_name, spin_ns=-5)
    with pytest.raises(TypeError, match="spin_ns"):
        Event.create(seg_name, spin_ns=1.5)
    assert not segment.exists(seg_name)


def test_spin_ns_is_configurable(seg_name):
    old = sync.get_default_spin_ns()
    try:
        sync.set_default_spin_ns(0)
        m = Mutex.create(seg_name)
        assert m.spin_ns == 0
        m.spin_ns = 5000
        assert m.spin_ns == 5000
        with pytest.raises(ValueError):
            m.spin_ns = -1
        m.close()
    finally:
        sync.set_default_spin_ns(old)


# ---- Semaphore --------------------------------------------------------------------------------

def test_semaphore_counts_and_bounds(seg_name):
    s = Semaphore.create(seg_name, 2, max_value=2)
    assert s.value == 2 and s.max_value == 2
    assert s.acquire() and s.acquire(timeout=0)
    assert s.acquire(False) is False and s.acquire(timeout=0.02) is False
    with pytest.raises(WaitTimeoutError):
        s.acquire_nowait()
    s.release(2)
    with pytest.raises(ValueError, match="exceed 2"):
        s.release()
    with pytest.raises(ValueError):
        s.release(0)
    with s:
        assert s.value == 1
    assert s.value == 2
    s.close()


def test_semaphore_validates_arguments(seg_name):
    with pytest.raises(ValueError):
        Semaphore.create(seg_name, -1)
    with pytest.raises(ValueError):
        Semaphore.create(seg_name, 3, max_value=2)
    with pytest.raises(TypeError):
        Semaphore.create(seg_name, 1.5)


def test_semaphore_release_wakes_waiting_thread(seg_name):
    s = Semaphore.create(seg_name, 0)
    t, out = in_thread(s.acquire, True, LONG)
    _wait_until(lambda: s.waiters == 1)
    s.release()
    assert joined(t, out) is True
    assert s.value == 0
    s.close()


# ---- Event ------------------------------------------------------------------------------------

def test_event_set_wakes_all_waiting_threads(seg_name):
    ev = Event.create(seg_name)
    assert not ev.is_set() and ev.wait(0) is False and ev.wait(0.02) is False
    waiters = [in_thread(ev.wait, LONG) for _ in range(4)]
    _wait_until(lambda: ev.waiters == 4)
    ev.set()
    assert [joined(t, out) for t, out in waiters] == [True] * 4
    assert ev.is_set() and ev.wait() is True
    ev.clear()
    assert not ev.is_set()
    with pytest.raises(ValueError):
        ev.wait(-1)
    ev.close()


# ---- Condition --------------------------------------------------------------------------------

def test_condition_needs_its_lock(seg_name):
    c = Condition.create(seg_name)
    for call in (c.wait, c.notify, c.notify_all):
        with pytest.raises(RuntimeError, match="does not hold"):
            call()
    with c:
        assert c.wait(0.01) is False
        assert c.mutex._is_owned()
        assert c.wait_for(lambda: 42, timeout=0) == 42
        assert c.wait_for(lambda: 0, timeout=0.02) == 0
    assert not c.mutex.locked()
    c.close()


def test_condition_producer_consumer_threads(seg_name):
    c = Condition.create(seg_name)
    items: list[int] = []
    got: list[int] = []

    def consumer():
        for _ in range(200):
            with c:
                assert c.wait_for(lambda: items, timeout=LONG)
                got.append(items.pop(0))
                c.notify_all()
    t = threading.Thread(target=consumer)
    t.start()
    for i in range(200):
        with c:
            assert c.wait_for(lambda: len(items) < 4, timeout=LONG)
            items.append(i)
            c.notify()
    t.join(LONG)
    assert got == list(range(200))
    c.close()


def test_condition_with_external_mutex(seg_name, user_seg):
    m = Mutex.create_at(user_seg, 0)
    c = Condition.create_at(user_seg, 64, mutex=m)
    assert c.mutex is m
    with c:
        assert m._is_owned()
    again = pickle.loads(pickle.dumps(c))
    assert again.mutex.offset == 0
    for o in (again, again.mutex, c, m):
        o.close()


# ---- Barrier ----------------------------------------------------------------------------------

def test_barrier_releases_all_parties_in_rounds(seg_name):
    calls = []
    b = Barrier.create(seg_name, 3, action=lambda: calls.append(1))
    results = []
    for _ in range(3):  # three generations
        ts = [in_thread(b.wait, LONG) for _ in range(3)]
        results.append(sorted(joined(t, out) for t, out in ts))
    assert results == [[0, 1, 2]] * 3
    assert len(calls) == 3 and b.n_waiting == 0 and not b.broken
    b.close()


def test_barrier_timeout_breaks_it_for_everyone_until_reset(seg_name):
    b = Barrier.create(seg_name, 3)
    t, out = in_thread(b.wait, LONG)
    _wait_until(lambda: b.n_waiting == 1)
    with pytest.raises(BrokenBarrierError, match="timed out"):
        b.wait(0.05)
    err = joined(t, out)
    assert isinstance(err, BrokenBarrierError) and isinstance(err, threading.BrokenBarrierError)
    assert b.broken
    with pytest.raises(BrokenBarrierError, match="reset"):
        b.wait(LONG)
    b.reset()
    assert not b.broken and b.n_waiting == 0
    ts = [in_thread(b.wait, LONG) for _ in range(3)]
    assert sorted(joined(t, out) for t, out in ts) == [0, 1, 2]
    b.close()


def test_barrier_abort_and_reset_wake_waiters(seg_name):
    b = Barrier.create(seg_name, 2)
    t, out = in_thread(b.wait, LONG)
    _wait_until(lambda: b.n_waiting == 1)
    b.abort()
    assert isinstance(joined(t, out), BrokenBarrierError)
    b.reset()
    t, out = in_thread(b.wait, LONG)
    _wait_until(lambda: b.n_waiting == 1)
    b.reset()  # a waiter of the old generation is told it broke
    assert isinstance(joined(t, out), BrokenBarrierError)
    b.close()


def test_barrier_default_timeout_is_shared_and_action_failure_breaks(seg_name):
    b = Barrier.create(seg_name, 2, timeout=0.05)
    other = Barrier.open(seg_name)
    assert other.timeout == pytest.approx(0.05)
    with pytest.raises(BrokenBarrierError):
        other.wait()
    other.close()
    b.reset()

    def boom():
        raise KeyError("action")
    b2 = Barrier.open(seg_name, action=boom)
    t, out = in_thread(b.wait, LONG)
    _wait_until(lambda: b.n_waiting == 1)
    with pytest.raises(KeyError):
        b2.wait()
    assert isinstance(joined(t, out), BrokenBarrierError)
    b2.close()
    b.close()


def test_barrier_with_more_threads_than_parties_runs_several_rounds(seg_name):
    started = threading.Event()

    def slow_action():
        started.set()
        threading.Event().wait(0.05)  # keep the round "completing" for a while
    b = Barrier.create(seg_name, 2, action=slow_action)
    ts = [in_thread(b.wait, LONG) for _ in range(4)]
    results = sorted(joined(t, out) for t, out in ts)
    assert results == [0, 0, 1, 1] and not b.broken
    b.close()


def test_barrier_validates_parties(seg_name):
    with pytest.raises(ValueError):
        Barrier.create(seg_name, 0)
    with pytest.raises(ValueError):
        Barrier.create(seg_name, Barrier.MAX_PARTIES + 1)
    with pytest.raises(TypeError):
        Barrier.create(seg_name, "3")


def test_barrier_slow_action_longer_than_a_sleep_slice_does_not_break_it(seg_name):
    # Waiters check the completer's liveness after each sleep slice: a live one that takes
    # its time must not be mistaken for a dead one.
    import time
    b = Barrier.create(seg_name, 2, action=lambda: time.sleep(0.3))
    ts = [in_thread(b.wait, LONG) for _ in range(2)]
    assert sorted(joined(t, out) for t, out in ts) == [0, 1]
    assert not b.broken
    b.close()


def test_barrier_completes_from_its_own_arrival_even_if_parties_changes(seg_name):
    # The last party completes the round from the exact state it made, not from `parties`
    # re-read from shared memory: a damaged count cannot leave the other parties waiting.
    b = Barrier.create(seg_name, 2)
    damage = lambda: _native.store_u32(b.segment.buf, b.offset, 3)  # noqa: E731
    b2 = Barrier.open(seg_name, action=damage)
    t, out = in_thread(b.wait, LONG)
    _wait_until(lambda: b.n_waiting == 1)
    assert b2.wait(LONG) == 1
    assert joined(t, out) == 0
    assert not b.broken
    b2.close()
    b.close()


# ---- RWLock -----------------------------------------------------------------------------------

def test_rwlock_readers_share_writers_exclude(seg_name):
    rw = RWLock.create(seg_name, max_readers=4)
    with rw.read():
        assert rw.readers == 1
        t, out = in_thread(lambda: rw.acquire_read(timeout=LONG) and (rw.release_read() or True))
        assert joined(t, out) is True  # a second reader gets in
        t, out = in_thread(rw.acquire_write, True, 0.05)
        assert joined(t, out) is False  # a writer does not
        with rw.read():  # recursive read in one thread
            assert rw.readers == 2
    assert rw.readers == 0
    with rw.write():
        assert rw.writer_pid != 0
        t, out = in_thread(rw.acquire_read, True, 0.05)
        assert joined(t, out) is False
        t, out = in_thread(rw.acquire_write, False)
        assert joined(t, out) is False
    assert rw.writer_pid == 0
    rw.close()


def test_rwlock_recursive_read_gets_in_while_a_writer_waits(seg_name):
    # The writer holds the mutex while it waits for readers to leave: a recursive read that
    # queued behind it would wait for itself (until its timeout, or forever).
    rw = RWLock.create(seg_name, max_readers=4)
    other = RWLock.open(seg_name)  # another object on the same memory: its own slot hint
    assert rw.acquire_read(timeout=LONG)
    t, out = in_thread(rw.acquire_write, True, LONG)
    _wait_until(lambda: rw.state()["writer_waiting"])
    assert rw.acquire_read(timeout=LONG) is True
    assert other.acquire_read(timeout=LONG) is True
    with rw.read(timeout=LONG):
        assert rw.readers == 4
    assert rw.acquire_read(blocking=False) is True
    for _ in range(4):
        rw.release_read()
    assert joined(t, out) is True  # the writer gets in once every read is gone
    assert rw.readers == 0
    t, out = in_thread(rw.release_write)
    assert isinstance(joined(t, out), LockNotOwnedError)  # held by the writer thread, not us
    other.close()
    rw.close()


def test_rwlock_first_read_still_waits_for_a_waiting_writer(seg_name):
    # Writers stay preferred: only a thread that already reads passes a waiting writer.
    rw = RWLock.create(seg_name, max_readers=4)
    assert rw.acquire_read(timeout=LONG)
    t, out = in_thread(rw.acquire_write, True, LONG)
    _wait_until(lambda: rw.state()["writer_waiting"])
    t2, out2 = in_thread(rw.acquire_read, True, 0.05)
    assert joined(t2, out2) is False
    rw.release_read()
    assert joined(t, out) is True
    rw.close()


def test_rwlock_nowait_forms_raise_wait_timeout(seg_name):
    rw = RWLock.create(seg_name)
    rw.acquire_read_nowait()
    t, out = in_thread(rw.acquire_write_nowait)
    err = joined(t, out)
    assert isinstance(err, WaitTimeoutError) and "write-lock" in str(err)
    rw.release_read()
    rw.acquire_write_nowait()
    t, out = in_thread(rw.acquire_read_nowait)
    assert isinstance(joined(t, out), WaitTimeoutError)
    rw.release_write()
    rw.close()


def test_rwlock_misuse_raises(seg_name):
    rw = RWLock.create(seg_name)
    with pytest.raises(LockNotOwnedError):
        rw.release_read()
    with pytest.raises(LockNotOwnedError):
        rw.release_write()
    with rw.read():
        with pytest.raises(RuntimeError, match="upgrading"):
            rw.acquire_write(timeout=LONG)
    with rw.write():
        with pytest.raises(RuntimeError, match="holds its write lock"):
            rw.acquire_read(timeout=LONG)
        with pytest.raises(RuntimeError, match="holds its write lock"):
            rw.acquire_write(timeout=LONG)
    with pytest.raises(ValueError):
        RWLock.create(seg_name + "x", max_readers=0)
    rw.close()


def test_rwlock_timeouts_raise_in_context_managers(seg_name):
    rw = RWLock.create(seg_name)
    rw.acquire_write()
    t, out = in_thread(lambda: rw.read(timeout=0.02).__enter__())
    assert isinstance(joined(t, out), WaitTimeoutError)
    rw.release_write()
    rw.acquire_read()
    t, out = in_thread(lambda: rw.write(timeout=0.02).__enter__())
    assert isinstance(joined(t, out), WaitTimeoutError)
    rw.release_read()
    with rw.write(timeout=0):
        pass
    rw.close()


def test_rwlock_reader_slots_full_then_dead_reader_reclaimed(seg_name):
    rw = RWLock.create(seg_name, max_readers=2)
    hold = threading.Event()

    def reader():
        rw.acquire_read()
        hold.wait(LONG)
        rw.release_read()
    ts = [threading.Thread(target=reader) for _ in range(2)]
    for t in ts:
        t.start()
    _wait_until(lambda: rw.readers == 2)
    with pytest.raises(ResourceLimitError, match="max_readers"):
        rw.acquire_read(timeout=LONG)
    hold.set()
    for t in ts:
        t.join(LONG)
    # a thread that ends while reading: its slot is reclaimed by a writer
    t = threading.Thread(target=rw.acquire_read)
    t.start()
    t.join(LONG)
    assert rw.readers == 1
    assert rw.acquire_write(timeout=LONG)
    assert rw.readers == 0
    rw.release_write()
    rw.close()


def test_rwlock_writer_thread_that_ended_leaves_recovered_for_readers(seg_name):
    rw = RWLock.create(seg_name)
    t = threading.Thread(target=rw.acquire_write)
    t.start()
    t.join(LONG)
    assert rw.acquire_read(timeout=LONG)
    assert rw.recovered  # a reader is told, but does not repair
    rw.release_read()
    assert rw.recovered
    assert rw.acquire_write(timeout=LONG) and rw.recovered
    rw.mark_consistent()
    assert not rw.recovered
    rw.release_write()
    rw.close()


# ---- Atomics ----------------------------------------------------------------------------------

def test_atomic_int_operations(seg_name):
    a = AtomicInt.create(seg_name, 5)
    assert a.load() == 5 and a.value == 5
    assert a.add(3) == 5 and a.add() == 8 and a.load() == 9
    assert a.exchange(-7) == 9
    assert a.compare_exchange(-7, 1) == (True, -7)
    assert a.compare_exchange(99, 2) == (False, 1)
    a.store(2**63 - 1)
    assert a.add(1) == 2**63 - 1 and a.load() == -2**63  # wraps
    a.value = 0
    with pytest.raises(OverflowError):
        a.store(2**63)
    a.close()


def test_atomic_int_threads_add_exactly(seg_name):
    a = AtomicInt.create(seg_name)
    ts = [threading.Thread(target=lambda: [a.add(1) for _ in range(5000)]) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(LONG)
    assert a.load() == 20000
    a.close()


def test_atomic_u32_wait_and_notify(seg_name):
    w = AtomicU32.create(seg_name, 1)
    assert w.wait(0) is True  # already differs from 0
    assert w.wait(1, 0) is False and w.wait(1, 0.02) is False
    assert w.add(-2) == 1 and w.load() == 2**32 - 1
    assert w.compare_exchange(2**32 - 1, 7) == (True, 2**32 - 1)
    t, out = in_thread(w.wait, 7, LONG)
    _wait_until(lambda: w.waiters == 1)
    w.store(8)
    assert w.notify(5) in (0, 1)  # 0 if it saw the change while spinning
    assert joined(t, out) is True
    assert w.notify() == 0  # nobody waits: no syscall
    # A notify without a change wakes a sleeper (one that is not asleep yet misses it, as
    # with any futex: hence notify until it returns).
    t, out = in_thread(w.wait, 8, LONG)
    _wait_until(lambda: w.waiters == 1)
    _wait_until(lambda: w.notify() == 1 or not t.is_alive())
    assert joined(t, out) is True
    with pytest.raises(OverflowError):
        w.store(-1)
    w.close()


# ---- corrupt shared memory: an error or a recovery, never a crash or a hang ------------------

def _word(seg: Segment, offset: int, value: int) -> None:
    _native.store_u32(seg.buf, offset, value)


@settings(max_examples=60, deadline=None)
@given(word=st.integers(0, 2**32 - 1), extra=st.lists(st.integers(0, 2**32 - 1),
                                                      min_size=5, max_size=5))
def test_mutex_with_any_garbage_acquires_recovers_or_times_out(word, extra):
    seg = Segment.anonymous(64)
    m = Mutex.at(seg, 0)
    for i, v in enumerate([word, *extra]):
        _word(seg, 4 * i, v)
    try:
        got = m.acquire(timeout=0.05)
    except RuntimeError:  # the word names this very thread
        got = None
        assert word & 0x7FFFFFFF == _native.gettid()
    if got:
        m.release()
        assert not m.locked()
    m.close()
    seg.close()


def test_mutex_garbage_owner_is_treated_as_dead(user_seg):
    m = Mutex.at(user_seg, 0)
    for garbage in (0xFFFFFFFF, 0x7FFFFFFF, 0x40000001, 1 << 31, 999_999_999):
        _word(user_seg, 0, garbage)
        assert m.acquire(timeout=LONG)
        assert m.recovered == (garbage & 0x7FFFFFFF != 0)
        m.release()
    m.close()


def test_mutex_owned_by_unrelated_live_process_times_out(user_seg):
    m = Mutex.at(user_seg, 0)
    _word(user_seg, 0, 1)  # pid 1 is alive and will not release
    assert m.acquire(timeout=0.05) is False
    assert m.acquire(False) is False
    _word(user_seg, 0, 0)
    m.close()


def _start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rfind(b")") + 2:].split()[19]) & 0xFFFFFFFF or 1


def test_mutex_whose_owner_id_was_reused_is_recovered(user_seg):
    """The owner died and its thread id now belongs to another task: not the owner any more."""
    m = Mutex.at(user_seg, 0)
    _word(user_seg, 0, 1)  # pid 1 runs...
    _word(user_seg, 16, _start_time(1) ^ 0x5A5A)  # ...but is not the task that took the lock
    assert m.acquire(timeout=LONG)
    assert m.recovered
    m.release()
    # the right incarnation is left alone
    _word(user_seg, 0, 1)
    _word(user_seg, 16, _start_time(1))
    assert m.acquire(timeout=0.1) is False
    _word(user_seg, 0, 0)
    m.close()


def test_rwlock_reader_slot_of_reused_thread_id_is_reclaimed(user_seg):
    rw = RWLock.create_at(user_seg, 0, max_readers=2)
    _word(user_seg, 40, 1)  # slot 0: "pid 1 reads", recorded with another start time
    _word(user_seg, 44, 1)
    _word(user_seg, 48, _start_time(1) ^ 0x5A5A)
    assert rw.acquire_write(timeout=LONG)
    assert rw.readers == 0
    rw.release_write()
    _word(user_seg, 44, 1)  # same, with pid 1's real start time: a live reader
    _word(user_seg, 48, _start_time(1))
    assert rw.acquire_write(timeout=0.1) is False
    _word(user_seg, 44, 0)
    rw.close()


def test_semaphore_event_atomic_garbage_is_harmless(user_seg):
    s = Semaphore.create_at(user_seg, 0, 1)
    _word(user_seg, 0, 0xFFFFFFFF)
    assert s.acquire(timeout=0)  # a huge count: permits
    with pytest.raises(ValueError):
        s.release(2**31 - 1)
    _word(user_seg, 8, 0xFFFFFFF0)  # max_value out of range: treated as none
    assert s.max_value is None
    e = Event.create_at(user_seg, 64)
    _word(user_seg, 64, 0xDEAD)
    assert e.is_set() and e.wait(0)
    for o in (s, e):
        o.close()


def test_barrier_garbage_raises_instead_of_hanging(user_seg):
    b = Barrier.create_at(user_seg, 0, 2)
    _word(user_seg, 0, 0)  # parties 0
    with pytest.raises(CorruptSegmentError):
        b.wait(LONG)
    _word(user_seg, 0, 2)
    _word(user_seg, 4, 0xFFFF)  # count far beyond parties
    with pytest.raises((CorruptSegmentError, BrokenBarrierError)):
        b.wait(LONG)
    b.reset()
    assert not b.broken
    b.close()


def test_rwlock_garbage_slots_are_refused_or_reclaimed(user_seg):
    RWLock.create_at(user_seg, 0, max_readers=4).close()
    slots_at, header, size = 24, 40, 16
    _word(user_seg, slots_at, 10_000_000)
    with pytest.raises(CorruptSegmentError, match="reader slots"):
        RWLock.at(user_seg, 0)
    _word(user_seg, slots_at, 4)
    rw = RWLock.at(user_seg, 0)
    for i in range(4):  # every slot "held" by impossible threads
        _word(user_seg, header + size * i, 0x7FFFFFF0 + i)
        _word(user_seg, header + size * i + 4, 12345)
    assert rw.acquire_read(timeout=LONG)  # reclaims a dead slot
    rw.release_read()
    assert rw.acquire_write(timeout=LONG)  # drops the dead readers
    assert rw.readers == 0
    rw.release_write()
    rw.close()


def test_describe_state_shows_owner_and_waiters(seg_name):
    m = Mutex.create(seg_name)
    m.acquire()
    seg, header = layout.open_typed(seg_name, layout.Kind.MUTEX)
    st_ = sync.describe_state(seg, header)
    assert st_["locked"] and st_["owner_alive"] and st_["owner_tid"] == _native.gettid()
    import os
    assert st_["owner_pid"] == os.getpid()
    m.release()
    assert sync.describe_state(seg, header)["locked"] is False
    seg.close()
    m.close()


def test_public_names_are_exported():
    for name in ("Mutex", "Semaphore", "Condition", "Event", "RWLock", "Barrier", "AtomicInt",
                 "AtomicU32", "BrokenBarrierError"):
        assert name in shmkit.__all__ and getattr(shmkit, name) is getattr(sync, name)


def test_argument_conversion_that_closes_the_object_is_safe(seg_name):
    """Converting an argument may run Python code; if that closes the object, no crash."""
    m = Mutex.create(seg_name)
    ev = Event.at(Segment.anonymous(64), 0)

    class Sneaky:
        def __init__(self, victim):
            self.victim = victim

        def __float__(self):
            self.victim.close()
            return 0.01

        def __index__(self):
            self.victim.close()
            return 1
    with pytest.raises(ValueError, match="closed"):
        m.acquire(timeout=Sneaky(m))
    with pytest.raises(ValueError, match="closed"):
        ev.wait(Sneaky(ev))
    a = AtomicInt.at(Segment.anonymous(64), 0)
    with pytest.raises(ValueError, match="closed"):
        a.add(Sneaky(a))
