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


def command(pid: int) -> str | None:
    """The short command name of `pid` (/proc/PID/comm), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def started_at(pid: int) -> float | None:
    """When `pid` started, in seconds since the epoch, or None if it is gone."""
    ticks = start_time(pid)
    if ticks is None:
        return None
    return boot_time() + ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Mapping:
    """One mapping of a segment in one process, from /proc/PID/maps (and smaps for residency)."""

    pid: int
    start: int
    end: int
    perms: str
    resident_bytes: int | None
    path: str = ""

    @property
    def size(self) -> int:
        """Length of the mapping in bytes (whole pages)."""
        return self.end - self.start


@dataclass(frozen=True)
class MapsScan:
    """Every shared-memory mapping of every readable process, from one pass over /proc/*/maps.

    POSIX segments are keyed by the (st_dev, st_ino) of their /dev/shm file rather than by
    path: a name that was removed and created again is a different file, and the processes
    still mapping the old one (shown as "(deleted)") must not count as mapping the new one.
    System V attachments are keyed by shmid, which the kernel shows as the inode.
    """

    posix: dict[tuple[int, int], list[Mapping]]
    sysv: dict[int, list[Mapping]]
    unreadable: tuple[int, ...]
    """Pids whose maps we were not allowed to read (other users' processes, unless root)."""

    def posix_mappers(self, dev: int, inode: int) -> list[Mapping]:
        """Mappings of the /dev/shm file with this device and inode."""
        return self.posix.get((dev, inode), [])

    def sysv_mappers(self, shmid: int) -> list[Mapping]:
        """Attachments of System V segment `shmid`."""
        return self.sysv.get(shmid, [])


_SHM_PREFIX = SHM_DIR + "/"


def scan_mappings(pids: list[int] | None = None) -> MapsScan:
    """Read /proc/PID/maps of every process (or of `pids`) once and index shared memory.

    Processes that exit during the scan are skipped; processes we may not read are listed in
    `unreadable`. Resident sizes are not read here (see `resident_bytes`).
    """
    posix: dict[tuple[int, int], list[Mapping]] = {}
    sysv: dict[int, list[Mapping]] = {}
    unreadable = []
    for pid in all_pids() if pids is None else pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                lines = [line for line in f if _SHM_PREFIX in line or "/SYSV" in line]
        except PermissionError:
            unreadable.append(pid)
            continue
        except OSError:
            continue  # exited meanwhile
        for line in lines:
            # "7f58f44ea000-7f58f44ed000 rw-s 00000000 00:1b 3   /dev/shm/name"
            parts = line.split(None, 5)
            if len(parts) < 6:
                continue
            path = parts[5].rstrip("\n")
            try:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                inode = int(parts[4])
            except ValueError:
                continue
            mapping = Mapping(pid, lo, hi, parts[1], None, path)
            if path.startswith(_SHM_PREFIX):
                posix.setdefault((os.makedev(major, minor), inode), []).append(mapping)
            elif path.startswith("/SYSV"):
                sysv.setdefault(inode, []).append(mapping)
    return MapsScan(posix, sysv, tuple(unreadable))


def resident_bytes(pid: int, starts: set[int] | list[int]) -> dict[int, int]:
    """Resident bytes (smaps Rss) of the mappings of `pid` that begin at `starts`.

    One pass over /proc/PID/smaps; mappings not found (or a process that is gone) are absent
    from the result.
    """
    wanted = set(starts)
    found: dict[int, int] = {}
    current = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and not head.endswith(":"):
                    try:
                        current = int(head.split("-", 1)[0], 16)
                    except ValueError:
                        current = None
                elif current in wanted and line.startswith("Rss:"):
                    found[current] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found


def with_residency(mappings: list[Mapping]) -> list[Mapping]:
    """The same mappings with `resident_bytes` filled in from smaps (one read per process)."""
    by_pid: dict[int, list[Mapping]] = {}
    for m in mappings:
        by_pid.setdefault(m.pid, []).append(m)
    out = []
    for pid, group in by_pid.items():
        rss = resident_bytes(pid, [m.start for m in group])
        out.extend(Mapping(m.pid, m.start, m.end, m.perms, rss.get(m.start), m.path)
                   for m in group)
    return sorted(out, key=lambda m: (m.pid, m.start))


def all_pids() -> list[int]:
    """Every pid currently visible in /proc."""
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def posix_mappers(name: str, *, resident: bool = False) -> list[Mapping]:
    """Every mapping of the file /dev/shm/NAME in every process we may read.

    Matches by device and inode, so mappings of an earlier segment of the same name that was
    removed do not count. Returns [] if the name does not exist.
    """
    try:
        st = os.stat(f"{SHM_DIR}/{name}")
    except OSError:
        return []
    found = scan_mappings().posix_mappers(st.st_dev, st.st_ino)
    return with_residency(found) if resident else found


def sysv_mappers(shmid: int, *, resident: bool = False) -> list[Mapping]:
    """Every attachment of System V segment `shmid` (maps show 'SYSV<key>' with inode = shmid)."""
    found = scan_mappings().sysv_mappers(shmid)
    return with_residency(found) if resident else found


def sysv_segments() -> list[dict]:
    """Rows of /proc/sysvipc/shm as dicts of ints (key, shmid, perms, size, cpid, lpid, nattch...).

    `key` is signed as `shmget` takes it; `perms` is the mode (octal in the file) with the
    kernel's SHM_DEST/SHM_LOCKED bits; times are seconds since the epoch.
    """
    try:
        with open("/proc/sysvipc/shm") as f:
            columns = f.readline().split()
            lines = [line.split() for line in f if line.strip()]
    except OSError:
        return []
    rows = []
    for values in lines:
        try:
            # perms is printed in octal ("%4o"), every other column in decimal.
            rows.append({col: int(v, 8 if col == "perms" else 10)
                         for col, v in zip(columns, values)})
        except ValueError:
            continue
    return rows
