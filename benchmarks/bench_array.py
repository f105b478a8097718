"""Handing a big numpy array to another process: SharedArray attach vs copying it.

Measured in a separate, already running process (interpreter start-up excluded):
  shmkit.SharedArray.open(name)          attach by name, zero copy
  pickle.loads(pickle.dumps(shared))     what a multiprocessing worker does with one
  SharedMemory(name) + np.ndarray(...)   the hand-rolled stdlib recipe (no dtype/shape travel)
  multiprocessing.Queue put -> get       the array pickled through a pipe (a full copy)

Attach times are medians of many repetitions at two sizes, to show they do not grow with
the array. Default size 1 GiB (needs ~3 GiB of RAM for the Queue copy); --quick uses 64 MiB.

Run: python benchmarks/bench_array.py [--quick]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
import uuid

import numpy as np

from shmkit.array import SharedArray

ATTACH_CHILD = r"""
import pickle, statistics, sys, time
import numpy as np
from multiprocessing import resource_tracker, shared_memory
from shmkit.array import SharedArray
name, shm_name, nbytes, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
blob = pickle.dumps(SharedArray.open(name))

def median_us(fn):
    fn()  # warm up imports and caches
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a = fn()
        a[0]  # the view is usable
        times.append(time.perf_counter() - t)
        del a
        keep.clear()
    return statistics.median(times) * 1e6

keep = []

def stdlib():
    shm = shared_memory.SharedMemory(shm_name)
    resource_tracker.unregister(shm._name, "shared_memory")  # the parent owns it
    keep.append(shm)  # the mapping must outlive the array (the usual recipe)
    return np.ndarray((nbytes,), np.uint8, buffer=shm.buf)

print(median_us(lambda: SharedArray.open(name)), median_us(lambda: pickle.loads(blob)),
      median_us(stdlib))
"""


def attach_times(nbytes: int, reps: int) -> tuple[float, float, float]:
    from multiprocessing import shared_memory

    name = f"bench-array-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    a = SharedArray.create(name, nbytes, np.uint8)
    shm = shared_memory.SharedMemory(create=True, size=nbytes)
    try:
        a[::4096] = 1
        out = subprocess.run([sys.executable, "-c", ATTACH_CHILD, name, shm.name, str(nbytes),
                              str(reps)], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        return tuple(float(x) for x in out.stdout.split())
    finally:
        a.unlink()
        del a
        shm.close()
        shm.unlink()


def _receiver(q, done):
    arr = q.get()
    done.put((time.perf_counter(), int(arr[-1])))


def queue_seconds(nbytes: int, reps: int) -> float:
    ctx = mp.get_context("spawn")
    arr = np.ones(nbytes, np.uint8)
    times = []
    for _ in range(reps):
        q, done = ctx.Queue(), ctx.Queue()
        p = ctx.Process(target=_receiver, args=(q, done))
        p.start()
        time.sleep(0.5)  # let the child start up and block in get()
        t = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        q.put(arr)
        received, last = done.get(timeout=600)
        p.join(60)
        assert last == 1
        times.append(received - t)
    return statistics.median(times)


def fmt_us(us: float) -> str:
    return f"{us:.0f} us" if us >= 10 else f"{us:.1f} us"


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    big = (64 << 20) if quick else (1 << 30)
    small = 1 << 20
    reps = 50 if quick else 200
    print(f"array hand-over: {big >> 20} MiB uint8 array{' (quick)' if quick else ''}; "
          f"attach = median of {reps} in a running process")
    rows = []
    for size in (small, big):
        shm_open, unpickle, stdlib = attach_times(size, reps)
        rows.append((size, shm_open, unpickle, stdlib))
    q = queue_seconds(big, 1 if quick else 3)
    print(f"\n{'size':>10} {'SharedArray.open':>18} {'unpickle (Pool)':>18} {'SharedMemory+ndarray':>22}")
    for size, shm_open, unpickle, stdlib in rows:
        print(f"{size >> 20:>7} MiB {fmt_us(shm_open):>18} {fmt_us(unpickle):>18} {fmt_us(stdlib):>22}")
    shm_big = rows[-1][1]
    print(f"\nmultiprocessing.Queue put->get of the {big >> 20} MiB array: {q * 1e3:.1f} ms "
          f"({q * 1e6 / shm_big:.0f}x the SharedArray attach)")
    print(f"SharedArray attach, {small >> 20} MiB vs {big >> 20} MiB: {fmt_us(rows[0][1])} vs "
          f"{fmt_us(shm_big)} (goal: independent of size, under 1 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
