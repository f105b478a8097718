"""Hand-off latency between two processes: ping-pong through two signals, p50 and p99.

What it measures: the time from "process A signals B" to "A sees B's answer", i.e. one round
trip of two hand-offs, measured in A for every round. Each implementation runs A in this
process and B in a spawned one; both spin briefly before sleeping where the primitive does.

Rows:
  shmkit.Event                 two Events; the waiter clears its event (default spin)
  shmkit.Event, spin_ns=0      the same, sleeping in futex(2) at once: the kernel wake-up cost
  shmkit.AtomicU32             a futex word each way: store + notify / wait
  multiprocessing.Event        a Condition over POSIX semaphores (the issue's baseline)
  posix_ipc.Semaphore          two named POSIX semaphores (skipped if not installed)

The goals (issue 3): p50 within 5x of a raw C spin-then-futex round trip (about 0.4 us on
the reference machine) and at least 10x better than multiprocessing.Event. Two cores are
needed for the spinning rows to mean anything; on a loaded machine the numbers are noisy.

Run: python benchmarks/bench_sync_pingpong.py [--quick]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import shmkit  # noqa: E402
from shmkit.bench import machine  # noqa: E402

WAIT = 10.0  # every wait has a timeout: a lost hand-off fails the run instead of hanging it
RAW_C_ROUND_TRIP_US = 0.4



def _check(ok: bool) -> None:
    if not ok:
        raise TimeoutError("the other process did not answer within the timeout")


# -- the B side of each implementation (runs in a spawned process) -------------------------------

def echo_events(ready, ping_name: str, pong_name: str, rounds: int, spin_ns: int | None) -> None:
    ping = shmkit.Event.open(ping_name, spin_ns=spin_ns)
    pong = shmkit.Event.open(pong_name, spin_ns=spin_ns)
    ready.set()
    for _ in range(rounds):
        _check(ping.wait(WAIT))
        ping.clear()
        pong.set()


def echo_words(ready, ping_name: str, pong_name: str, rounds: int) -> None:
    ping = shmkit.AtomicU32.open(ping_name)
    pong = shmkit.AtomicU32.open(pong_name)
    ready.set()
    for i in range(1, rounds + 1):
        while ping.load() != i:
            _check(ping.wait(i - 1, WAIT))
        pong.store(i)
        pong.notify()


def echo_mp(ready, ping, pong, rounds: int) -> None:
    ready.set()
    for _ in range(rounds):
        _check(ping.wait(WAIT))
        ping.clear()
        pong.set()


def echo_posix(ready, ping_name: str, pong_name: str, rounds: int) -> None:
    import posix_ipc
    ping, pong = posix_ipc.Semaphore(ping_name), posix_ipc.Semaphore(pong_name)
    ready.set()
    for _ in range(rounds):
        ping.acquire(WAIT)
        pong.release()


# -- the A side ----------------------------------------------------------------------------------

def run(target, args, one_round, rounds: int) -> list[int]:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=target, args=(ready, *args))
    child.start()
    try:
        # Time only once the echo process has started and opened everything: while it is
        # still importing, it competes for the CPUs and nobody answers.
        _check(ready.wait(60))
        time.sleep(0.1)
        times = []
        clock = time.perf_counter_ns
        for i in range(1, rounds + 1):
            t0 = clock()
            one_round(i)
            times.append(clock() - t0)
        child.join(WAIT * 3)
        if child.exitcode != 0:
            raise RuntimeError(f"echo process failed with exit code {child.exitcode}")
        return times
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def bench_events(tag: str, rounds: int, spin_ns: int | None) -> list[int]:
    ping = shmkit.Event.create(f"bench-ping-{tag}", spin_ns=spin_ns)
    pong = shmkit.Event.create(f"bench-pong-{tag}", spin_ns=spin_ns)
    try:
        def one_round(_i):
            ping.set()
            _check(pong.wait(WAIT))
            pong.clear()
        return run(echo_events, (ping.name, pong.name, rounds, spin_ns), one_round, rounds)
    finally:
        for e in (ping, pong):
            e.unlink()
            e.close()


def bench_words(tag: str, rounds: int) -> list[int]:
    ping = shmkit.AtomicU32.create(f"bench-wping-{tag}")
    pong = shmkit.AtomicU32.create(f"bench-wpong-{tag}")
    try:
        def one_round(i):
            ping.store(i)
            ping.notify()
            while pong.load() != i:
                _check(pong.wait(i - 1, WAIT))
        return run(echo_words, (ping.name, pong.name, rounds), one_round, rounds)
    finally:
        for w in (ping, pong):
            w.unlink()
            w.close()


def bench_mp(rounds: int) -> list[int]:
    ctx = mp.get_context("spawn")
    ping, pong = ctx.Event(), ctx.Event()

    def one_round(_i):
        ping.set()
        _check(pong.wait(WAIT))
        pong.clear()
    return run(echo_mp, (ping, pong, rounds), one_round, rounds)


def bench_posix(tag: str, rounds: int) -> list[int]:
    import posix_ipc
    ping = posix_ipc.Semaphore(f"/bench-ping-{tag}", posix_ipc.O_CREX)
    pong = posix_ipc.Semaphore(f"/bench-pong-{tag}", posix_ipc.O_CREX)
    try:
        def one_round(_i):
            ping.release()
            pong.acquire(WAIT)
        return run(echo_posix, (ping.name, pong.name, rounds), one_round, rounds)
    finally:
        for s in (ping, pong):
            s.unlink()
            s.close()


def percentile(sorted_values: list[int], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    rounds = 2_000 if quick else 50_000
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()  # spawn starts it on first use: not during a measurement
    warmup = rounds // 10
    tag = uuid.uuid4().hex[:8]
    cases = [
        ("shmkit.Event", lambda: bench_events(tag, rounds, None)),
        ("shmkit.Event, spin_ns=0", lambda: bench_events(tag + "s", rounds, 0)),
        ("shmkit.AtomicU32 wait/notify", lambda: bench_words(tag, rounds)),
        ("multiprocessing.Event", lambda: bench_mp(rounds)),
    ]
    try:
        import posix_ipc  # noqa: F401
        cases.append(("posix_ipc.Semaphore", lambda: bench_posix(tag, rounds)))
    except ImportError:
        cases.append(("posix_ipc.Semaphore", None))

    print(f"machine: {machine()}")
    print(f"ping-pong round trip between two processes, {rounds:,} rounds "
          f"(first {warmup:,} dropped), microseconds")
    print(f"{'implementation':30s} {'p50':>8s} {'p99':>8s} {'p50 vs shmkit.Event':>20s}")
    base = None
    results = {}
    for label, fn in cases:
        if fn is None:
            print(f"{label:30s} {'-':>8s} {'-':>8s}  skipped: pip install posix_ipc")
            continue
        times = sorted(fn()[warmup:])
        p50, p99 = percentile(times, 50) / 1000, percentile(times, 99) / 1000
        results[label] = p50
        base = base or p50
        print(f"{label:30s} {p50:8.2f} {p99:8.2f} {p50 / base:19.2f}x")
    shm = results["shmkit.Event"]
    print(f"goal p50 <= 5 x {RAW_C_ROUND_TRIP_US} us raw C round trip: "
          f"{'meets' if shm <= 5 * RAW_C_ROUND_TRIP_US else 'misses'} ({shm:.2f} us); "
          f"vs multiprocessing.Event: {results['multiprocessing.Event'] / shm:.1f}x better "
          f"(goal >= 10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
