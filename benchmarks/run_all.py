"""Run every benchmark scenario (benchmarks/bench_*.py) in one go: what `make bench` does.

Each scenario compares shmkit with its peers in the same run and prints ratios; this runner
prints the machine first so that figures are never read without it. Pass --quick for a short
smoke run. A scenario that fails is reported and the others still run; the exit code is 1 if
any failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from shmkit.bench import machine

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    print(f"machine: {machine()}")
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"\n=== {script.stem} ===", flush=True)
        started = time.monotonic()
        rc = subprocess.call([sys.executable, str(script), *argv])
        print(f"({script.stem}: {time.monotonic() - started:.0f} s, exit {rc})", flush=True)
        if rc != 0:
            failed.append(script.stem)
    if failed:
        print(f"\nfailed scenarios: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
