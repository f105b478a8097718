"""shmkit.sync between real, unrelated interpreters: contention, SIGKILL of holders, SIGINT.

Every child is a fresh `python -c` (tests/procs.py); crash tests kill with SIGKILL after the
child says it holds the lock, then check that the survivors carry on and see `recovered`.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading

import pytest
from procs import kill, run_python, spawn_python, stop, wait_for_line

from shmkit import (
    AtomicInt,
    Barrier,
    BrokenBarrierError,
    Condition,
    Event,
    Mutex,
    RWLock,
    Segment,
    Semaphore,
)

LONG = 30.0

PRELUDE = "import os, sys, time, signal, struct\nimport shmkit\nfrom shmkit import *\n"


def run_all(code: str, *argsets, timeout: float = 120) -> list[str]:
    """Start one child per argument tuple at once, wait for all, return their stdouts."""
    procs = [spawn_python(PRELUDE + code, *args) for args in argsets]
    outs = []
    for p in procs:
        out, err = stop(p, timeout=timeout)
        assert p.returncode == 0, f"child failed ({p.returncode}):\n{err}"
        outs.append(out)
    return outs


# ---- contention: 4 processes x 20,000 ----------------------------------------------------------

def test_four_processes_increment_under_mutex_exactly(backend, names):
    name = names("mtx")
    m = Mutex.create(name, backend=backend)
    data = Segment.create(names("data"), 64, backend=backend)
    code = (
        "m = Mutex.open(sys.argv[1], backend=sys.argv[3])\n"
        "seg = Segment.open(sys.argv[2], backend=sys.argv[3])\n"
        "c = struct.Struct('<q'); buf = seg.buf\n"
        "for _ in range(20000):\n"
        "    with m:\n"
        "        c.pack_into(buf, 0, c.unpack_from(buf, 0)[0] + 1)\n"
        "del buf; m.close(); seg.close()\n")
    run_all(code, *[(name, data.name, backend)] * 4)
    assert struct.unpack_from("<q", data.buf, 0)[0] == 80000
    assert not m.locked()
    data.close()
    m.close()


def test_four_processes_atomic_add_without_lock(backend, names):
    a = AtomicInt.create(names("atom"), backend=backend)
    code = ("a = AtomicInt.open(sys.argv[1], backend=sys.argv[2])\n"
            "for _ in range(20000):\n"
            "    a.add(1)\n")
    run_all(code, *[(a.name, backend)] * 4)
    assert a.load() == 80000
    a.close()


# ---- SIGKILL of the holder ---------------------------------------------------------------------

# A host interpreter that, for each line on stdin, forks a child which takes the lock, writes
# "half-done" into the protected data, reports its pid, and then hangs until killed.
FORK_HOLDER = PRELUDE + """
kind, name, data_name, backend = sys.argv[1:5]
data = Segment.open(data_name, backend=backend)
while True:
    line = sys.stdin.readline()
    if not line:
        break
    pid = os.fork()
    if pid == 0:
        lock = Mutex.open(name, backend=backend) if kind == "mutex" else RWLock.open(name, backend=backend)
        (lock.acquire if kind == "mutex" else lock.acquire_write)()
        struct.pack_into("<q", data.buf, 0, -int(line))   # the half-done update
        print("holder", os.getpid(), flush=True)
        while True:
            time.sleep(100)
    os.waitpid(pid, 0)   # returns once the test has killed it
"""


def _kill_holder_loop(kind: str, lock, data: Segment, iterations: int, backend: str) -> None:
    host = spawn_python(FORK_HOLDER, kind, lock.name, data.name, backend,
                        stdin=subprocess.PIPE)
    try:
        for i in range(1, iterations + 1):
            host.stdin.write(f"{i}\n")
            host.stdin.flush()
            pid = int(_read_line(host, LONG).split()[1])
            # a waiter already asleep when the holder dies, on every other round
            waiter = None
            if i % 2:
                got: list = []
                take = lock.acquire if kind == "mutex" else lock.acquire_write
                waiter = threading.Thread(target=lambda: got.append(take(timeout=LONG)))
                waiter.start()
            os.kill(pid, signal.SIGKILL)
            if waiter is not None:
                waiter.join(LONG + 5)
                assert got == [True]
                # the thread that recovered it is gone: take it over from that thread too
            take = lock.acquire if kind == "mutex" else lock.acquire_write
            assert take(timeout=LONG)
            assert lock.recovered
            assert struct.unpack_from("<q", data.buf, 0)[0] == -i  # sees the torn update
            struct.pack_into("<q", data.buf, 0, i)  # repair
            lock.mark_consistent()
            assert not lock.recovered
            (lock.release if kind == "mutex" else lock.release_write)()
    finally:
        host.stdin.close()
        host.kill()
        host.wait(LONG)
        host.stdout.close()
        host.stderr.close()


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    import selectors
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), f"child printed nothing within {timeout} s"
    line = proc.stdout.readline()
    assert line, f"child exited: {proc.stderr.read() if proc.poll() is not None else ''}"
    return line


@pytest.mark.parametrize("kind", ["mutex", "rwlock"])
def test_sigkill_holder_repeatedly_is_recovered(kind, backend, names):
    lock = (Mutex if kind == "mutex" else RWLock).create(names(kind), backend=backend)
    data = Segment.create(names("data"), 64, backend=backend)
    _kill_holder_loop(kind, lock, data, 12, backend)
    data.close()
    lock.close()


@pytest.mark.soak
@pytest.mark.parametrize("kind", ["mutex", "rwlock"])
def test_sigkill_holder_soak(kind, names):
    lock = (Mutex if kind == "mutex" else RWLock).create(names(kind))
    data = Segment.create(names("data"), 64)
    _kill_holder_loop(kind, lock, data, 500, "posix")
    data.close()
    lock.close()


def test_holder_in_unrelated_interpreter_killed_waiter_in_another_recovers(names, backend):
    m = Mutex.create(names("m"), backend=backend)
    holder = spawn_python(PRELUDE + "m = Mutex.open(sys.argv[1], backend=sys.argv[2])\n"
                          "m.acquire(); print('held', flush=True); time.sleep(600)\n",
                          m.name, backend)
    wait_for_line(holder, "held", timeout=LONG)
    waiter = spawn_python(PRELUDE + "m = Mutex.open(sys.argv[1], backend=sys.argv[2])\n"
                          "print('waiting', flush=True)\n"
                          "ok = m.acquire(timeout=30)\n"
                          "print(ok, m.recovered, flush=True)\n"
                          "m.release(); print(m.recovered, flush=True)\n",
                          m.name, backend)
    wait_for_line(waiter, "waiting", timeout=LONG)
    holder.kill()
    holder.wait(LONG)
    out, err = stop(waiter, timeout=LONG)
    assert out.split() == ["True", "True", "False"], err
    assert not m.locked() and not m.recovered
    for p in (holder,):
        p.stdout.close()
        p.stderr.close()
    m.close()


# ---- Semaphore, Condition, Event, Barrier, RWLock across processes ----------------------------

def test_semaphore_bounds_holders_across_processes(backend, names):
    seg = Segment.create(names("sem"), 4096, backend=backend)
    sem = Semaphore.create_at(seg, 0, 2)
    holders = AtomicInt.create_at(seg, 64)
    peak = AtomicInt.create_at(seg, 72)
    code = ("seg = Segment.open(sys.argv[1], backend=sys.argv[2])\n"
            "sem = Semaphore.at(seg, 0); holders = AtomicInt.at(seg, 64); peak = AtomicInt.at(seg, 72)\n"
            "for _ in range(2000):\n"
            "    with sem:\n"
            "        now = holders.add(1) + 1\n"
            "        assert now <= 2, now\n"
            "        seen = peak.load()\n"
            "        while now > seen and not peak.compare_exchange(seen, now)[0]:\n"
            "            seen = peak.load()\n"
            "        holders.add(-1)\n")
    run_all(code, *[(seg.name, backend)] * 4)
    assert holders.load() == 0 and sem.value == 2
    assert 1 <= peak.load() <= 2
    for o in (sem, holders, peak):
        o.close()
    seg.close()


def test_condition_producer_consumer_across_processes(backend, names):
    seg = Segment.create(names("cond"), 4096, backend=backend)
    Condition.create_at(seg, 0).close()
    # after the condition: [count u32, head u32, tail u32, ...] and 8 slots of i64 at 128
    code = ("seg = Segment.open(sys.argv[1], backend=sys.argv[2]); role = sys.argv[3]\n"
            "c = Condition.at(seg, 0); buf = seg.buf\n"
            "u = struct.Struct('<III'); q = struct.Struct('<q')\n"
            "total = 0\n"
            "for i in range(1, 3001):\n"
            "    with c:\n"
            "        if role == 'put':\n"
            "            assert c.wait_for(lambda: u.unpack_from(buf, 64)[0] < 8, timeout=30)\n"
            "            n, h, t = u.unpack_from(buf, 64)\n"
            "            q.pack_into(buf, 128 + 8 * (t % 8), i); u.pack_into(buf, 64, n + 1, h, t + 1)\n"
            "        else:\n"
            "            assert c.wait_for(lambda: u.unpack_from(buf, 64)[0] > 0, timeout=30)\n"
            "            n, h, t = u.unpack_from(buf, 64)\n"
            "            total += q.unpack_from(buf, 128 + 8 * (h % 8))[0]; u.pack_into(buf, 64, n - 1, h + 1, t)\n"
            "        c.notify_all()\n"
            "print(total)\n")
    put, get = run_all(code, (seg.name, backend, "put"), (seg.name, backend, "get"))
    assert int(get) == sum(range(1, 3001))
    seg.close()


def test_event_wakes_all_waiting_processes(names):
    ev = Event.create(names("ev"))
    code = "ev = Event.open(sys.argv[1])\nprint(ev.wait(60))\n"
    procs = [spawn_python(PRELUDE + code, ev.name) for _ in range(3)]
    deadline_ok = _wait_for(lambda: ev.waiters == 3)
    ev.set()
    outs = [stop(p, timeout=LONG)[0].strip() for p in procs]
    assert deadline_ok and outs == ["True"] * 3
    ev.close()


def _wait_for(pred, timeout=LONG) -> bool:
    import time
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def test_barrier_releases_parties_in_three_processes(names):
    b = Barrier.create(names("bar"), 3, timeout=LONG)
    code = ("b = Barrier.open(sys.argv[1])\n"
            "print(' '.join(str(b.wait()) for _ in range(20)))\n")
    outs = run_all(code, *[(b.name,)] * 3)
    rounds = list(zip(*[[int(x) for x in o.split()] for o in outs]))
    assert len(rounds) == 20 and all(sorted(r) == [0, 1, 2] for r in rounds)
    b.close()


def test_barrier_party_that_never_arrives_breaks_it_by_timeout(names):
    b = Barrier.create(names("bar"), 3, timeout=0.3)
    code = ("b = Barrier.open(sys.argv[1])\n"
            "try:\n    b.wait()\nexcept BrokenBarrierError:\n    print('broken')\n")
    # two parties come; the third "died" before arriving
    outs = run_all(code, (b.name,), (b.name,))
    assert [o.strip() for o in outs] == ["broken", "broken"]
    assert b.broken
    with pytest.raises(BrokenBarrierError):
        b.wait(LONG)
    b.close()


def test_barrier_last_party_killed_in_action_breaks_it_for_the_others(names):
    # No timeout anywhere: before, the survivors waited for the dead completer forever.
    b = Barrier.create(names("bar"), 3)
    early = _start_waiters(b, 2)
    _until(lambda: b.n_waiting == 2)
    child = spawn_python(PRELUDE + "def act():\n    print('in action', flush=True)\n"
                         "    time.sleep(60)\n"
                         "b = Barrier.open(sys.argv[1], action=act)\nb.wait()\n", b.name)
    try:
        wait_for_line(child, "in action", timeout=LONG)
    finally:
        kill(child)
    assert [type(r) for r in _results(early)] == [BrokenBarrierError] * 2
    assert b.broken
    b.reset()  # usable again
    assert sorted(_results(_start_waiters(b, 3))) == [0, 1, 2]
    b.close()


def _start_waiters(b, n: int) -> list:
    """n threads calling b.wait(); pair with `_results`."""
    runs = []
    for _ in range(n):
        outs: list = []

        def run(outs=outs):
            try:
                outs.append(b.wait())
            except BaseException as exc:  # checked by the test
                outs.append(exc)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        runs.append((t, outs))
    return runs


def _results(runs) -> list:
    for t, _outs in runs:
        t.join(LONG)
        assert not t.is_alive(), "a party still waits at the barrier"
    return [outs[0] for _t, outs in runs]


def _until(pred, timeout: float = LONG) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def test_rwlock_readers_concurrent_writer_excluded_across_processes(names):
    rw = RWLock.create(names("rw"))
    reader = spawn_python(PRELUDE + "rw = RWLock.open(sys.argv[1])\n"
                          "rw.acquire_read(); print('reading', flush=True)\n"
                          "sys.stdin.readline(); rw.release_read(); print('done', flush=True)\n",
                          rw.name, stdin=subprocess.PIPE)
    wait_for_line(reader, "reading", timeout=LONG)
    # another process can read at the same time, a writer cannot get in
    out = run_python(PRELUDE + "rw = RWLock.open(sys.argv[1])\n"
                     "print(rw.acquire_read(timeout=30)); rw.release_read()\n"
                     "print(rw.acquire_write(timeout=0.1))\n", rw.name, timeout=LONG).stdout
    assert out.split() == ["True", "False"]
    reader.stdin.write("\n")
    reader.stdin.flush()
    stop(reader, timeout=LONG)
    assert rw.acquire_write(timeout=LONG)
    rw.release_write()
    rw.close()


def test_rwlock_consistency_under_mixed_load(names):
    seg = Segment.create(names("rwdata"), 4096)
    RWLock.create_at(seg, 0, max_readers=16).close()
    # a writer keeps a == b (written one after the other); readers must never see them differ
    code = ("seg = Segment.open(sys.argv[1]); rw = RWLock.at(seg, 0); role = sys.argv[2]\n"
            "p = struct.Struct('<q'); buf = seg.buf; bad = 0\n"
            "for i in range(3000):\n"
            "    if role == 'w':\n"
            "        with rw.write(30):\n"
            "            v = p.unpack_from(buf, 1024)[0] + 1\n"
            "            p.pack_into(buf, 1024, v); p.pack_into(buf, 1032, v)\n"
            "    else:\n"
            "        with rw.read(30):\n"
            "            bad += p.unpack_from(buf, 1024)[0] != p.unpack_from(buf, 1032)[0]\n"
            "print(bad)\n")
    outs = run_all(code, (seg.name, "w"), (seg.name, "r"), (seg.name, "r"), (seg.name, "w"))
    assert [int(o) for o in outs] == [0, 0, 0, 0]
    assert struct.unpack_from("<qq", seg.buf, 1024) == (6000, 6000)
    seg.close()


def test_rwlock_recursive_readers_and_writers_stay_exclusive_across_processes(names):
    # Threads of two processes mix writes, nested reads (which pass waiting writers without
    # the mutex) and release_read() calls by threads that hold no read (which must raise and
    # must not take another thread's read away, even as that thread reuses their old slot).
    _rwlock_exclusion_run(names, rounds=20000)


@pytest.mark.soak
def test_rwlock_exclusion_soak(names):
    # The slot hand-over races need many rounds to show (a few per million operations).
    _rwlock_exclusion_run(names, rounds=600000)


def _rwlock_exclusion_run(names, rounds: int) -> None:
    seg = Segment.create(names("rwdata"), 4096)
    # Fewer slots than threads: slots change hands all the time, which is where the races
    # were (a read that finds every slot busy raises ResourceLimitError and is skipped).
    RWLock.create_at(seg, 0, max_readers=3).close()
    code = ("import random, threading\n"
            "seg = Segment.open(sys.argv[1]); rw = RWLock.at(seg, 0)\n"
            "a = AtomicInt.at(seg, 1024)  # +1000 while a writer is inside, +1 per read\n"
            "bad = []\n"
            "def run(seed):\n"
            "    r = random.Random(seed)\n"
            "    for _ in range(int(sys.argv[3])):\n"
            "        x = r.random()\n"
            "        if x < 0.2:\n"
            "            assert rw.acquire_write(timeout=30)\n"
            "            if a.add(1000) != 0: bad.append('writer with others inside')\n"
            "            a.add(-1000); rw.release_write()\n"
            "        elif x < 0.3:\n"
            "            try:\n"
            "                rw.release_read(); bad.append('released a read it did not hold')\n"
            "            except shmkit.LockNotOwnedError:\n"
            "                pass\n"
            "        else:\n"
            "            try:\n"
            "                rw.acquire_read(timeout=30) or bad.append('read timed out')\n"
            "            except shmkit.ResourceLimitError:\n"
            "                continue\n"
            "            depth = r.choice((1, 2, 3))\n"
            "            for _ in range(depth - 1):\n"
            "                rw.acquire_read(timeout=30) or bad.append('read timed out')\n"
            "            if a.add(depth) >= 1000: bad.append('reader with a writer inside')\n"
            "            a.add(-depth)\n"
            "            for _ in range(depth):\n"
            "                rw.release_read()\n"
            "ts = [threading.Thread(target=run, args=(i + 10 * int(sys.argv[2]),)) for i in range(3)]\n"
            "for t in ts: t.start()\n"
            "for t in ts: t.join()\n"
            "print(len(bad), bad[:3])\n")
    outs = run_all(code, (seg.name, 1, rounds), (seg.name, 2, rounds), timeout=600)
    assert [o.strip() for o in outs] == ["0 []", "0 []"]
    assert struct.unpack_from("<q", seg.buf, 1024) == (0,)
    rw = RWLock.at(seg, 0)
    assert rw.readers == 0 and rw.writer_pid == 0
    rw.close()
    seg.close()


def test_rwlock_killed_reader_does_not_block_writer(names):
    rw = RWLock.create(names("rw"))
    reader = spawn_python(PRELUDE + "rw = RWLock.open(sys.argv[1])\n"
                          "rw.acquire_read(); print('reading', flush=True); time.sleep(600)\n",
                          rw.name)
    wait_for_line(reader, "reading", timeout=LONG)
    assert rw.readers == 1 and rw.acquire_write(timeout=0.05) is False
    reader.kill()
    reader.wait(LONG)
    assert rw.acquire_write(timeout=LONG)
    assert rw.readers == 0 and not rw.recovered  # a dead reader changed nothing
    rw.release_write()
    reader.stdout.close()
    reader.stderr.close()
    rw.close()


def test_condition_dead_waiter_blocks_nobody(names):
    c = Condition.create(names("cond"))
    dead = spawn_python(PRELUDE + "c = Condition.open(sys.argv[1])\n"
                        "c.acquire(); print('waiting', flush=True); c.wait(600)\n", c.name)
    wait_for_line(dead, "waiting", timeout=LONG)
    assert _wait_for(lambda: c.waiters == 1)
    dead.kill()
    dead.wait(LONG)
    live = spawn_python(PRELUDE + "c = Condition.open(sys.argv[1])\n"
                        "with c:\n    print('waiting', flush=True); print(c.wait(30))\n", c.name)
    wait_for_line(live, "waiting", timeout=LONG)
    assert _wait_for(lambda: c.waiters >= 1 and not c.mutex.locked())
    with c:  # the lock is free (the dead waiter did not hold it) and notify still works
        c.notify_all()
    assert stop(live, timeout=LONG)[0].strip() == "True"
    dead.stdout.close()
    dead.stderr.close()
    c.close()


# ---- SIGINT interrupts every kind of blocking wait --------------------------------------------

BLOCKERS = {
    "mutex": ("m = Mutex.open(sys.argv[1])", "m.acquire()"),
    "semaphore": ("s = Semaphore.open(sys.argv[1])", "s.acquire()"),
    "event": ("e = Event.open(sys.argv[1])", "e.wait()"),
    "condition": ("c = Condition.open(sys.argv[1]); c.acquire()", "c.wait()"),
    "barrier": ("b = Barrier.open(sys.argv[1])", "b.wait()"),
    "rwlock": ("rw = RWLock.open(sys.argv[1])", "rw.acquire_write()"),
}


@pytest.mark.parametrize("kind", sorted(BLOCKERS))
def test_sigint_interrupts_blocked_call_with_keyboard_interrupt(kind, names):
    name = names(kind)
    obj = {"mutex": lambda: Mutex.create(name), "semaphore": lambda: Semaphore.create(name, 0),
           "event": lambda: Event.create(name), "condition": lambda: Condition.create(name),
           "barrier": lambda: Barrier.create(name, 2), "rwlock": lambda: RWLock.create(name)}[kind]()
    if kind == "mutex":
        obj.acquire()
    if kind == "rwlock":
        obj.acquire_read()
    setup, call = BLOCKERS[kind]
    child = spawn_python(PRELUDE + setup + "\nprint('blocking', flush=True)\n"
                         "try:\n    " + call + "\n"
                         "except KeyboardInterrupt:\n    print('interrupted', flush=True)\n"
                         "    sys.exit(3)\n", name)
    wait_for_line(child, "blocking", timeout=LONG)
    # blocked in the call (the waiter count or state shows it), then Ctrl-C
    _wait_for(lambda: _is_blocked(kind, obj), timeout=LONG)
    child.send_signal(signal.SIGINT)
    out, err = stop(child, timeout=LONG)
    assert child.returncode == 3 and "interrupted" in out, err
    if kind == "mutex":
        obj.release()
    if kind == "rwlock":
        obj.release_read()
    obj.close()


def _is_blocked(kind: str, obj) -> bool:
    if kind == "barrier":
        return obj.n_waiting == 1
    if kind == "rwlock":
        return obj.writer_pid != 0
    return obj.waiters >= 1


def test_sigint_in_main_thread_while_another_thread_runs(names):
    """Ctrl-C reaches a main thread blocked in acquire even when other threads exist."""
    m = Mutex.create(names("m"))
    m.acquire()
    child = spawn_python(PRELUDE + "import threading\n"
                         "m = Mutex.open(sys.argv[1])\n"
                         "threading.Thread(target=lambda: time.sleep(600), daemon=True).start()\n"
                         "print('blocking', flush=True)\n"
                         "try:\n    m.acquire()\nexcept KeyboardInterrupt:\n    sys.exit(3)\n",
                         m.name)
    wait_for_line(child, "blocking", timeout=LONG)
    _wait_for(lambda: m.waiters >= 1)
    child.send_signal(signal.SIGINT)
    stop(child, timeout=LONG)
    assert child.returncode == 3
    m.release()
    m.close()


def test_pickled_mutex_works_in_multiprocessing_worker(names, tmp_path):
    """Objects pickle by name, so they can be handed to multiprocessing workers."""
    m = Mutex.create(names("m"))
    a = AtomicInt.create(names("a"))
    code = (
        "import multiprocessing as mp, sys\n"
        "from shmkit import Mutex, AtomicInt\n"
        "def work(m, a):\n"
        "    for _ in range(500):\n"
        "        with m:\n"
        "            a.add(1)\n"
        "if __name__ == '__main__':\n"
        "    m = Mutex.open(sys.argv[1]); a = AtomicInt.open(sys.argv[2])\n"
        "    ctx = mp.get_context('spawn')\n"
        "    ps = [ctx.Process(target=work, args=(m, a)) for _ in range(2)]\n"
        "    [p.start() for p in ps]; [p.join(60) for p in ps]\n"
        "    print(a.load(), [p.exitcode for p in ps])\n")
    script = tmp_path / "workers.py"  # spawn re-imports __main__, which needs a file
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script), m.name, a.name], capture_output=True,
                         text=True, timeout=120).stdout
    assert out.strip() == "1000 [0, 0]"
    m.close()
    a.close()


def test_child_interpreter_sees_python_version():
    # guards the assumption above that children run this interpreter
    assert run_python("import sys; print(sys.version_info[:2])").stdout.strip() == \
        str(sys.version_info[:2])
