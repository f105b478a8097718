"""Contended lock throughput: two processes take turns on one lock as fast as they can.

What it measures: total acquire+release pairs per second over both processes, each doing
`n` critical sections that increment a counter in a shared segment (the same work for every
row, and the total is checked for every row: a lost update fails the run). Both start
together on an Event. With 2 cores and 2 busy processes, spinning before sleeping is
what keeps the lock from bouncing through the kernel on every hand-off.

Rows:
  shmkit.Mutex                    default spin before sleeping
  shmkit.Mutex, spin_ns=0         straight to futex(2) when contended
  multiprocessing.Lock            POSIX semaphore in shared memory
  posix_ipc.Semaphore             named POSIX semaphore (skipped if not installed)

Run: python benchmarks/bench_sync_contended.py [--quick]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import struct
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import shmkit  # noqa: E402
from shmkit.bench import machine  # noqa: E402

WAIT = 60.0
PROCS = 2



def critical_sections(acquire, release, counter_name: str, go_name: str, n: int) -> None:
    counter = shmkit.Segment.open(counter_name)
    go = shmkit.Event.open(go_name)
    cell, buf = struct.Struct("<q"), counter.buf
    if not go.wait(WAIT):
        raise TimeoutError("no start signal")
    for _ in range(n):
        acquire()
        cell.pack_into(buf, 0, cell.unpack_from(buf, 0)[0] + 1)
        release()


def worker_shmkit(lock_name: str, counter_name: str, go_name: str, n: int, spin_ns) -> None:
    lock = shmkit.Mutex.open(lock_name, spin_ns=spin_ns)
    critical_sections(lock.acquire, lock.release, counter_name, go_name, n)


def worker_mp(lock, counter_name: str, go_name: str, n: int) -> None:
    critical_sections(lock.acquire, lock.release, counter_name, go_name, n)


def worker_posix(sem_name: str, counter_name: str, go_name: str, n: int) -> None:
    import posix_ipc
    sem = posix_ipc.Semaphore(sem_name)
    critical_sections(sem.acquire, sem.release, counter_name, go_name, n)


def timed(targets_args, start) -> float:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=t, args=a) for t, a in targets_args]
    for p in procs:
        p.start()
    time.sleep(0.5)  # let both reach the start line (they wait on the Event)
    t0 = time.perf_counter()
    start()
    for p in procs:
        p.join(WAIT * 5)
    elapsed = time.perf_counter() - t0
    for p in procs:
        if p.exitcode != 0:
            raise RuntimeError(f"worker failed with exit code {p.exitcode}")
    return elapsed


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    n = 20_000 if quick else 500_000
    tag = uuid.uuid4().hex[:8]
    rows = []

    go = shmkit.Event.create(f"bench-go-{tag}")
    counter = shmkit.Segment.create(f"bench-count-{tag}", 64)

    def measure(label, workers) -> None:
        go.clear()
        counter.buf[:8] = bytes(8)
        seconds = timed(workers, go.set)
        total = struct.unpack_from("<q", counter.buf, 0)[0]
        if total != PROCS * n:
            raise AssertionError(f"{label}: lost updates, {total} != {PROCS * n}")
        rows.append((label, PROCS * n / seconds))

    try:
        for label, spin in (("shmkit.Mutex", None), ("shmkit.Mutex, spin_ns=0", 0)):
            lock = shmkit.Mutex.create(f"bench-lock-{tag}")
            try:
                measure(label, [(worker_shmkit, (lock.name, counter.name, go.name, n, spin))] * PROCS)
            finally:
                lock.unlink()
                lock.close()
        mp_lock = mp.get_context("spawn").Lock()
        measure("multiprocessing.Lock", [(worker_mp, (mp_lock, counter.name, go.name, n))] * PROCS)
        try:
            import posix_ipc
        except ImportError:
            rows.append(("posix_ipc.Semaphore", None))
        else:
            sem = posix_ipc.Semaphore(f"/bench-sem-{tag}", posix_ipc.O_CREX, initial_value=1)
            try:
                measure("posix_ipc.Semaphore",
                        [(worker_posix, (sem.name, counter.name, go.name, n))] * PROCS)
            finally:
                sem.unlink()
                sem.close()
    finally:
        for obj in (go, counter):
            obj.unlink()
            obj.close()

    base = rows[0][1]
    print(f"machine: {machine()}")
    print(f"contended lock, {PROCS} processes x {n:,} critical sections, total pairs per second")
    print(f"{'implementation':30s} {'ops/s':>12s} {'vs shmkit.Mutex':>16s}")
    for label, rate in rows:
        if rate is None:
            print(f"{label:30s} {'-':>12s}  skipped: pip install posix_ipc")
        else:
            print(f"{label:30s} {rate:12,.0f} {rate / base:15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
