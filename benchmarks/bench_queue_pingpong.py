"""Queue round-trip latency: a 64-byte ping-pong between two processes, p50 and p99.

Process A puts a message into one channel; process B takes it and puts it back through a
second channel; A measures each round trip. shmkit uses its default wait policy (a short
poll, then a futex sleep). Goal (issue 4): p50 <= 2 us, p99 <= 10 us, and at least 20x
better than multiprocessing.Queue. Peers that are not installed are skipped with a line.

Run: python benchmarks/bench_queue_pingpong.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from shmkit import bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions")
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    print(f"machine: {bench.machine()}")
    selected = [s for s in bench.scenarios(args.quick) if s.mode == "pingpong"]
    rows = bench.run(selected, repetitions=reps,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(bench.format_table(rows))
    for row in rows:
        if row["mechanism"] == bench.SHMKIT and "vs_mp_queue" in row:
            print(f"shmkit p50 is {row['vs_mp_queue']:.0f}x better than multiprocessing.Queue")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
