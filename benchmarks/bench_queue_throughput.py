"""Queue throughput: shmkit.Queue against other IPC mechanisms, producer and consumer in two processes.

Scenarios (issue 4): 64 B one put/get per message; 64 B with put_many/get_many (peers with a
batch API only); 4 KiB; 1 MiB with one copy in and one copy out (compared with this machine's
single-core memcpy speed, the ceiling of a copying queue); 1 MiB zero copy (reserve/get_view,
iceoryx2 loans; only the 16-byte sequence stamps are written and checked, as a producer that
generates data in place would).

Every message is checked by the consumer (content, or sequence stamps at both ends for 1 MiB):
a lost, duplicated or corrupted message fails the row. Repetitions are interleaved across
mechanisms; medians are printed. Peers that are not installed are skipped with a line.

Run: python benchmarks/bench_queue_throughput.py [--quick] [--reps N] [--plot FILE.png]
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
    parser.add_argument("--plot", help="also draw the results into this PNG")
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    print(f"machine: {bench.machine()}")
    print(f"memcpy, one core, 1 MiB buffers: {bench.memcpy_gb_per_s():.1f} GB/s "
          f"(the ceiling of a copy-in/copy-out queue at 1 MiB)")
    selected = [s for s in bench.scenarios(args.quick) if s.mode != "pingpong"]
    rows = bench.run(selected, repetitions=reps,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(bench.format_table(rows))
    if args.plot:
        bench.plot_rows(rows, args.plot)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
