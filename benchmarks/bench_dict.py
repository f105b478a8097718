"""SharedDict reads/s and writes/s against other shared dicts, 1 and 2 processes.

Every implementation does the same work: keys "k0".."k999" (str), values of 32 bytes. Each
measurement runs for a time budget and reports operations per second; the 2-process rows
run two spawned processes at once on disjoint keys and add up their rates.

Peers (skipped with a line saying why when missing; `pip install UltraDict atomics
shared-memory-dict`):
  multiprocessing.Manager().dict()   a server process, one round trip per operation
  UltraDict(shared_lock=True)        shared memory, a stream of pickled updates, spin lock
  shared-memory-dict                 re-pickles the whole dict on every write; its lock is
                                     per process only, so 2-process writes are not safe

Run: python benchmarks/bench_dict.py [--quick]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import uuid

NKEYS = 1000
VALUE = b"v" * 32


def keys_for(worker: int) -> list[str]:
    return [f"k{worker}-{i}" for i in range(NKEYS)]


# -- implementations: make(name) in the parent, attach(handle) in a worker -----------------------

class ShmkitImpl:
    label = "shmkit.SharedDict"

    def make(self, name):
        from shmkit.dict import SharedDict
        self.d = SharedDict.create(name, capacity_bytes=16 << 20, max_keys=4 * NKEYS)
        return name

    @staticmethod
    def attach(handle):
        from shmkit.dict import SharedDict
        return SharedDict.open(handle)

    def cleanup(self):
        self.d.unlink()
        self.d.close()


class ManagerImpl:
    label = "multiprocessing.Manager().dict()"

    def make(self, name):
        self.manager = mp.get_context("spawn").Manager()
        return self.manager.dict()

    @staticmethod
    def attach(handle):
        return handle

    def cleanup(self):
        self.manager.shutdown()


class UltraDictImpl:
    label = "UltraDict(shared_lock=True)"

    def make(self, name):
        from UltraDict import UltraDict
        self.d = UltraDict(name=name, create=True, shared_lock=True, buffer_size=4 << 20,
                           full_dump_size=4 << 20)
        return name

    @staticmethod
    def attach(handle):
        from UltraDict import UltraDict
        return UltraDict(name=handle, create=False, shared_lock=True)

    def cleanup(self):
        self.d.unlink()


class SharedMemoryDictImpl:
    label = "shared-memory-dict"

    def make(self, name):
        from shared_memory_dict import SharedMemoryDict
        self.d = SharedMemoryDict(name=name, size=4 << 20)
        return name

    @staticmethod
    def attach(handle):
        from multiprocessing import resource_tracker
        from shared_memory_dict import SharedMemoryDict
        d = SharedMemoryDict(name=handle, size=4 << 20)
        if mp.parent_process() is not None:  # the parent removes it, not the worker's tracker
            resource_tracker.unregister(d.shm._name, "shared_memory")
        return d

    def cleanup(self):
        self.d.shm.close()
        self.d.shm.unlink()


IMPLS = [ShmkitImpl, ManagerImpl, UltraDictImpl, SharedMemoryDictImpl]


def missing_reason(impl) -> str | None:
    try:
        if impl is UltraDictImpl:
            import atomics  # noqa: F401  (UltraDict's shared_lock needs it)
            import UltraDict  # noqa: F401
        elif impl is SharedMemoryDictImpl:
            import shared_memory_dict  # noqa: F401
    except ImportError as exc:
        return f"not installed ({exc.name}); pip install UltraDict atomics shared-memory-dict"
    return None


# -- the measured loops --------------------------------------------------------------------------

def run_ops(d, op: str, keys: list[str], budget: float) -> tuple[int, float]:
    """Do `op` over `keys` repeatedly for about `budget` seconds; (operations, seconds)."""
    done = 0
    start = time.perf_counter()
    end = start + budget
    while True:
        if op == "write":
            for k in keys:
                d[k] = VALUE
        else:
            for k in keys:
                d[k]
        done += len(keys)
        now = time.perf_counter()
        if now >= end:
            return done, now - start


def prefill(d, keys):
    for k in keys:
        d[k] = VALUE


def worker(impl_name, handle, op, index, budget, ready, go, results):
    impl = next(i for i in IMPLS if i.__name__ == impl_name)
    try:
        d = impl.attach(handle)
        keys = keys_for(index)
        prefill(d, keys)
        ready.put(index)
        go.wait(60)
        results.put(run_ops(d, op, keys, budget))
    except Exception as exc:  # reported by the parent as this cell's failure
        ready.put(index)
        results.put(f"{type(exc).__name__}: {exc}")


def measure(impl, procs: int, op: str, budget: float) -> float:
    inst = impl()
    name = f"bench-dict-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    handle = inst.make(name)
    try:
        if procs == 1:
            d = impl.attach(handle)
            keys = keys_for(0)
            prefill(d, keys)
            ops, secs = run_ops(d, op, keys, budget)
            return ops / secs
        ctx = mp.get_context("spawn")
        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        workers = [ctx.Process(target=worker, args=(impl.__name__, handle, op, i, budget, ready,
                                                    go, results)) for i in range(procs)]
        for w in workers:
            w.start()
        for _ in workers:
            ready.get(timeout=120)
        go.set()
        outcomes = [results.get(timeout=120 + budget) for _ in workers]
        for w in workers:
            w.join(30)
        for outcome in outcomes:
            if isinstance(outcome, str):
                raise RuntimeError(f"a worker failed: {outcome}")
        return sum(ops / secs for ops, secs in outcomes)
    finally:
        inst.cleanup()


def fmt_rate(r: float | None) -> str:
    if r is None:
        return "-"
    if r >= 1e6:
        return f"{r / 1e6:.2f} M/s"
    return f"{r / 1e3:.1f} k/s"


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    budget = 0.3 if quick else 2.0
    columns = [("write", 1), ("read", 1), ("write", 2), ("read", 2)]
    print(f"SharedDict vs peers: {NKEYS} str keys per process, {len(VALUE)}-byte values, "
          f"{budget} s per cell{' (quick)' if quick else ''}")
    table = {}
    for impl in IMPLS:
        reason = missing_reason(impl)
        if reason:
            print(f"skipping {impl.label}: {reason}")
            continue
        row = {}
        for op, procs in columns:
            try:
                row[(op, procs)] = measure(impl, procs, op, budget)
            except Exception as exc:  # a peer failing must not hide the others
                print(f"{impl.label} {op} x{procs} failed: {type(exc).__name__}: {exc}")
                row[(op, procs)] = None
        table[impl.label] = row
    base = table.get(ShmkitImpl.label, {})
    head = f"{'implementation':34}" + "".join(f"{op + ' ' + str(p) + 'p':>24}" for op, p in columns)
    print("\n" + head)
    for label, row in table.items():
        cells = []
        for col in columns:
            r, b = row.get(col), base.get(col)
            ratio = f" ({b / r:6.1f}x)" if r and b and label != ShmkitImpl.label else ""
            cells.append(f"{fmt_rate(r) + ratio:>24}")
        print(f"{label:34}" + "".join(cells))
    print("\n(x) = how many times faster shmkit.SharedDict is in the same run")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
