"""Uncontended lock cost: acquire + release by one thread, nobody else wants the lock.

What it measures: the fast path every lock user pays on each critical section, in ns per
acquire+release pair (best of several runs, the loop's own cost included for every row alike).

Rows:
  shmkit.Mutex acquire()/release()      the goal: no slower than multiprocessing.Lock
  shmkit.Mutex `with`                   the same through the context manager protocol
  shmkit.Semaphore acquire()/release()
  shmkit.AtomicInt add(1)               one atomic op, for scale
  multiprocessing.Lock                  POSIX semaphore (sem_t) in shared memory
  posix_ipc.Semaphore                   a named POSIX semaphore (skipped if not installed)
  threading.Lock                        not shareable between processes: for scale only

Run: python benchmarks/bench_sync_uncontended.py [--quick]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import shmkit  # noqa: E402
from shmkit.bench import machine  # noqa: E402



def best_ns(loop, n: int, repeats: int) -> float:
    """Best time per iteration (ns) over `repeats` runs of loop(n)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        loop(n)
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def acquire_release(lock):
    acquire, release = lock.acquire, lock.release

    def loop(n):
        for _ in range(n):
            acquire()
            release()
    return loop


def with_block(lock):
    def loop(n):
        for _ in range(n):
            with lock:
                pass
    return loop


def atomic_add(a):
    add = a.add

    def loop(n):
        for _ in range(n):
            add(1)
    return loop


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    n, repeats = (50_000, 3) if quick else (1_000_000, 7)
    tag = uuid.uuid4().hex[:8]
    made = []
    rows: list[tuple[str, float | None, str]] = []

    def add(label, make_loop, note=""):
        rows.append((label, best_ns(make_loop, n, repeats), note))

    try:
        m = shmkit.Mutex.create(f"bench-mutex-{tag}")
        made.append(m)
        s = shmkit.Semaphore.create(f"bench-sem-{tag}", 1)
        made.append(s)
        a = shmkit.AtomicInt.create(f"bench-atomic-{tag}")
        made.append(a)
        add("shmkit.Mutex acquire/release", acquire_release(m))
        add("shmkit.Mutex with", with_block(m))
        add("shmkit.Semaphore acquire/release", acquire_release(s))
        add("shmkit.AtomicInt add", atomic_add(a))
        add("multiprocessing.Lock", acquire_release(mp.Lock()))
        add("multiprocessing.Lock with", with_block(mp.Lock()))
        try:
            import posix_ipc
        except ImportError:
            rows.append(("posix_ipc.Semaphore", None, "skipped: pip install posix_ipc"))
        else:
            ps = posix_ipc.Semaphore(f"/bench-{tag}", posix_ipc.O_CREX, initial_value=1)
            try:
                add("posix_ipc.Semaphore", acquire_release(ps))
            finally:
                ps.unlink()
                ps.close()
        add("threading.Lock (not shareable)", acquire_release(threading.Lock()))
    finally:
        for obj in made:
            obj.unlink()
            obj.close()

    base = rows[0][1]
    mp_lock = next(r[1] for r in rows if r[0] == "multiprocessing.Lock")
    print(f"machine: {machine()}")
    print(f"uncontended acquire+release, ns per pair, best of {repeats} x {n:,}")
    print(f"{'implementation':36s} {'ns':>8s} {'vs shmkit.Mutex':>16s}")
    for label, ns, note in rows:
        if ns is None:
            print(f"{label:36s} {'-':>8s} {'':>16s}  {note}")
        else:
            print(f"{label:36s} {ns:8.1f} {ns / base:15.2f}x")
    verdict = "meets" if base <= mp_lock else "MISSES"
    print(f"goal (shmkit.Mutex no slower than multiprocessing.Lock): {verdict} "
          f"({base:.0f} ns vs {mp_lock:.0f} ns)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
