"""Linux process facts read from /proc: liveness, start times, mappings (lowest layer).

Every read of /proc lives here so that a macOS backend has one module to replace. A process
is identified by (pid, start time) because pids are reused: a segment whose creator pid now
belongs to another program must still count as orphaned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SHM_DIR = "/dev/shm"


def start_time(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, started: int | None = None) -> bool:
    """Whether `pid` runs and, when `started` is given, is the same process that started then."""
    if pid <= 0:
        return False
    now = start_time(pid)
    if now is None:
        return False
    return started is None or started == 0 or now == started


def own_start_time() -> int:
    """This process's start time in clock ticks since boot."""
    return start_time(os.getpid()) or 0


def boot_time() -> float:
    """Seconds since the epoch at which the machine booted (/proc/stat btime)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def pid_max() -> int:
    """The largest pid the kernel hands out."""
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except OSError:
        return 4194304


def read_limit(name: str) -> int | None:
    """A kernel.shm* limit from /proc/sys/kernel (shmmax, shmall, shmmni), or None."""
    try:
        with open(f"/proc/sys/kernel/{name}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Mapping:
    """One mapping of a segment in one process, from /proc/PID/maps and smaps."""

    pid: int
    start: int
    end: int
    perms: str
    resident_bytes: int | None


def _maps_matching(pid: int, match) -> list[tuple[int, int, str, str]]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        path = parts[5].rstrip("\n")
        if match(path, parts[4]):
            lo, hi = parts[0].split("-")
            found.append((int(lo, 16), int(hi, 16), parts[1], path))
    return found


def _resident(pid: int, start: int) -> int | None:
    """Resident bytes of the mapping that starts at `start`, from /proc/PID/smaps."""
    try:
        with open(f"/proc/{pid}/smaps") as f:
            inside = False
            for line in f:
                if "-" in line.split(" ", 1)[0] and not line.startswith(("Rss", "Size")):
                    lo = line.split("-", 1)[0]
                    try:
                        inside = int(lo, 16) == start
                    except ValueError:
                        inside = False
                elif inside and line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def all_pids() -> list[int]:
    """Every pid currently visible in /proc."""
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def posix_mappers(name: str, *, resident: bool = False) -> list[Mapping]:
    """Every mapping of /dev/shm/NAME in every process we may read."""
    path = f"{SHM_DIR}/{name}"
    deleted = path + " (deleted)"
    return _mappers(lambda p, _inode: p == path or p == deleted, resident)


def sysv_mappers(shmid: int, *, resident: bool = False) -> list[Mapping]:
    """Every attachment of System V segment `shmid` (maps show it as 'SYSV<key> ... inode=shmid')."""
    return _mappers(lambda p, inode: p.startswith("/SYSV") and inode == str(shmid), resident)


def _mappers(match, resident: bool) -> list[Mapping]:
    out = []
    for pid in all_pids():
        for lo, hi, perms, _path in _maps_matching(pid, match):
            out.append(Mapping(pid, lo, hi, perms, _resident(pid, lo) if resident else None))
    return out


def sysv_segments() -> list[dict]:
    """Rows of /proc/sysvipc/shm as dicts of ints (key, shmid, perms, size, cpid, lpid, nattch...)."""
    try:
        with open("/proc/sysvipc/shm") as f:
            header = f.readline().split()
            rows = [dict(zip(header, (int(v) for v in line.split()))) for line in f if line.strip()]
    except OSError:
        return []
    return rows
