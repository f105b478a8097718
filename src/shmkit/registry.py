"""Discovery of shared memory on this machine: listing, mappers, orphans, removal (tools layer).

What `shmkit ls`, `inspect`, `rm` and `gc` show and do, as a library. It looks at every POSIX
segment in /dev/shm and every System V segment in /proc/sysvipc/shm, shmkit's own or not:

- the kind comes from the typed header (`layout.parse`), read without trusting it: a segment
  without the shmkit magic is "foreign", one with the magic but a damaged header is
  "corrupt", one we may not read is "unreadable". Reading never crashes and never writes;
- the processes that map a segment come from one pass over /proc/*/maps (`_proc.scan_mappings`);
- an *orphan* is a shmkit segment whose creator is dead and that no process maps. `gc`
  removes orphans and nothing else; foreign and corrupt segments go only by name (`remove`).

Side effects of looking: POSIX headers are read with pread (no mapping). A System V segment
can only be read by attaching, so listing attaches each one read-only for a moment, which
updates its shm_atime and shm_lpid like any other attach.

The live state of a typed object (is the lock held? how deep is the queue?) belongs to the
module that implements the kind; it is looked up lazily through `STATE_PROVIDERS`, so this
module works (without a state section) while a kind's module is missing.
"""

from __future__ import annotations

import errno
import importlib
import os
import pwd
import stat as _stat
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from . import _native, _proc, layout, segment
from .errors import CorruptSegmentError, SegmentNotFoundError, ShmkitError, describe, from_oserror
from .layout import Kind

SCHEMA_VERSION = 1
"""Version of the JSON documents (`as_dict`) that `shmkit ls/inspect/gc --json` print."""

KIND_FOREIGN = "foreign"
KIND_CORRUPT = "corrupt"
KIND_UNREADABLE = "unreadable"

# Seconds of slack when deciding whether the process now holding a System V segment's cpid
# started after the segment was made (then that pid was reused: the creator is dead).
# /proc/stat btime is whole seconds and wall clocks get adjusted.
_PID_REUSE_SLACK = 5.0

STATE_PROVIDERS: dict[Kind, tuple[str, str]] = {
    Kind.MUTEX: ("shmkit.sync", "describe_state"),
    Kind.SEMAPHORE: ("shmkit.sync", "describe_state"),
    Kind.CONDITION: ("shmkit.sync", "describe_state"),
    Kind.EVENT: ("shmkit.sync", "describe_state"),
    Kind.RWLOCK: ("shmkit.sync", "describe_state"),
    Kind.BARRIER: ("shmkit.sync", "describe_state"),
    Kind.ATOMIC_INT: ("shmkit.sync", "describe_state"),
    Kind.ATOMIC_U32: ("shmkit.sync", "describe_state"),
    Kind.QUEUE: ("shmkit.queue", "describe_state"),
    Kind.BROADCAST: ("shmkit.broadcast", "describe_state"),
    Kind.LATEST: ("shmkit.broadcast", "describe_state"),
    Kind.ARRAY: ("shmkit.array", "describe_state"),
    Kind.DICT: ("shmkit.dict", "describe_state"),
}
"""Kind -> (module, function) giving `function(seg, header) -> dict` of live state.

The function receives a read-only `Segment` and its fresh `layout.Header`. A missing module
or function means "no state section", never an error.
"""


def state_function(kind: Kind) -> Callable | None:
    """The live-state function for `kind`, or None if its module or function does not exist."""
    entry = STATE_PROVIDERS.get(kind)
    if entry is None:
        return None
    module_name, attr = entry
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None


@dataclass(frozen=True)
class SegmentInfo:
    """What shmkit knows about one segment at the moment it looked.

    Attributes:
        name: the POSIX name, or for System V the name the caller asked for (System V
            segments store no name: listings show them by key).
        backend: "posix" or "sysv".
        key, shmid: System V key (signed, as `shmget` takes it) and id; None for POSIX.
        kind: a kind label ("Mutex", "Queue", ...), or "foreign", "corrupt", "unreadable".
        state: "ready" or "initialising" for shmkit objects, else None.
        size: bytes (the size the creator asked for).
        mode, uid, gid: permission bits and owner.
        creator_pid, creator_alive: from the header for shmkit objects, from the kernel's
            cpid for System V; None when unknown (foreign POSIX segments).
        mappings: every mapping in the processes we could read (see `_proc.MapsScan`).
        attach_count: System V nattch (counts every process, even ones we cannot read).
        created: seconds since the epoch: the header's creation time for shmkit objects,
            otherwise the inode change time (POSIX) or shm_ctime (System V), which are the
            creation time unless the mode or owner was changed later.
        pending_removal: System V only: removed (IPC_RMID) but still attached somewhere.
        orphan: a shmkit object whose creator is dead and that no process maps (`gc` removes it).
        detail: why a segment is corrupt or unreadable.
        header: the decoded header of shmkit objects.
    """

    name: str | None
    backend: str
    key: int | None
    shmid: int | None
    kind: str
    state: str | None
    size: int
    mode: int
    uid: int
    gid: int
    creator_pid: int | None
    creator_alive: bool | None
    mappings: tuple[_proc.Mapping, ...]
    attach_count: int | None
    created: float | None
    pending_removal: bool
    orphan: bool
    detail: str | None
    header: layout.Header | None = field(default=None, repr=False)
    inode: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """How tools name it: the name, or 'key 0x1234abcd' / 'shmid 7' for System V."""
        if self.name is not None:
            return self.name
        if self.key:
            return f"key {format_key(self.key)}"
        return f"shmid {self.shmid}"

    @property
    def is_shmkit(self) -> bool:
        """Whether it carries a valid shmkit header."""
        return self.header is not None

    @property
    def mapped_by(self) -> tuple[int, ...]:
        """Sorted pids of the processes that map it (each once)."""
        return tuple(sorted({m.pid for m in self.mappings}))

    @property
    def owner(self) -> str:
        """The owner's user name, or the uid as a string."""
        return user_name(self.uid)

    def age_seconds(self, now: float | None = None) -> float | None:
        """Seconds since `created`, or None."""
        if self.created is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.created)

    def as_dict(self, now: float | None = None) -> dict:
        """The stable JSON form (schema `SCHEMA_VERSION`, documented in docs/cli.md)."""
        age = self.age_seconds(now)
        return {
            "name": self.name,
            "backend": self.backend,
            "key": self.key,
            "shmid": self.shmid,
            "kind": self.kind,
            "state": self.state,
            "size": self.size,
            "mode": f"{self.mode:04o}",
            "uid": self.uid,
            "gid": self.gid,
            "owner": self.owner,
            "creator_pid": self.creator_pid,
            "creator_alive": self.creator_alive,
            "mapped_by": list(self.mapped_by),
            "attach_count": self.attach_count,
            "created": self.created,
            "age_seconds": None if age is None else round(age, 3),
            "pending_removal": self.pending_removal,
            "orphan": self.orphan,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Inspection:
    """`SegmentInfo` plus the header, per-process mappings with residency, and live state."""

    info: SegmentInfo
    mappings: tuple[_proc.Mapping, ...]
    commands: dict[int, str | None]
    state: dict | None
    state_error: str | None

    def as_dict(self, now: float | None = None) -> dict:
        """The stable JSON form: `SegmentInfo.as_dict()` plus header, mappings, live state."""
        out = self.info.as_dict(now)
        out["header"] = None if self.info.header is None else self.info.header.as_dict()
        out["mappings"] = [
            {"pid": m.pid, "command": self.commands.get(m.pid), "start": m.start, "end": m.end,
             "size": m.size, "perms": m.perms, "resident_bytes": m.resident_bytes}
            for m in self.mappings
        ]
        out["live_state"] = self.state
        out["live_state_error"] = self.state_error
        return out


@dataclass(frozen=True)
class GcResult:
    """What `collect_garbage` did with one orphan.

    `result` is "would_remove" (dry run), "removed", "skipped" (it stopped being an orphan,
    or vanished, between the listing and the removal) or "failed" (`detail` says why).
    """

    info: SegmentInfo
    result: str
    detail: str | None = None

    def as_dict(self, now: float | None = None) -> dict:
        """`SegmentInfo.as_dict()` plus "result" and "result_detail"."""
        out = self.info.as_dict(now)
        out["result"] = self.result
        out["result_detail"] = self.detail
        return out


# -- small helpers ---------------------------------------------------------------------------

_user_names: dict[int, str] = {}


def user_name(uid: int) -> str:
    """The login name for `uid`, or the number as a string."""
    if uid not in _user_names:
        try:
            _user_names[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _user_names[uid] = str(uid)
    return _user_names[uid]


def format_key(key: int) -> str:
    """A System V key as `ipcs` prints it: 0x followed by 8 hex digits."""
    return f"0x{key & 0xFFFFFFFF:08x}"


def parse_key(text: str) -> int:
    """Parse a System V key given as decimal or 0x-hex (as `ls` and `ipcs` print it).

    Returns the signed 32-bit value `shmget` takes.

    Raises:
        ValueError: not a number, or outside 32 bits.
    """
    try:
        value = int(text, 0)
    except (TypeError, ValueError):
        raise ValueError(f"key must be a number such as 0x1234abcd, not {text!r}") from None
    if not -(1 << 31) <= value <= 0xFFFFFFFF:
        raise ValueError(f"key {text!r} does not fit in 32 bits")
    return value - (1 << 32) if value >= (1 << 31) else value


@dataclass(frozen=True)
class _Peek:
    """Just enough of a Segment for `layout.parse`: the first bytes, copied out."""

    name: str
    backend: str
    size: int
    buf: bytearray  # a copy (malloc'd, so aligned for the atomic loads parse makes)


def _classify(label: str, backend: str, size: int, head: bytes):
    """(kind, state, header, detail) for a segment of `size` bytes starting with `head`."""
    magic_len = len(layout.MAGIC)
    if head[:magic_len] == layout.MAGIC:
        try:
            header = layout.parse(_Peek(label, backend, size, bytearray(head)))
        except CorruptSegmentError as exc:
            return KIND_CORRUPT, None, None, str(exc)
        except Exception as exc:  # untrusted bytes: anything odd is damage, never a crash
            return KIND_CORRUPT, None, None, f"unreadable header ({type(exc).__name__}: {exc})"
        state = "ready" if header.state == layout.STATE_READY else "initialising"
        return header.kind.label, state, header, None
    if head[:magic_len] == bytes(magic_len) and any(head[magic_len:]):
        # The creator writes every field, then publishes the magic (layout.write). A creator
        # killed in between leaves a complete header without magic: recognise it, so that gc
        # can reclaim it once that creator is dead. Anything else without magic is foreign.
        try:
            header = layout.parse(_Peek(label, backend, size,
                                        bytearray(layout.MAGIC + head[magic_len:])))
        except Exception:
            return KIND_FOREIGN, None, None, None
        return (header.kind.label, "initialising", header,
                "header written but not yet published (creator still writing, or died doing so)")
    return KIND_FOREIGN, None, None, None


def _is_orphan(header, creator_alive, mappings, attach_count, pending_removal) -> bool:
    return (header is not None and creator_alive is False and not mappings
            and not attach_count and not pending_removal)


# -- POSIX -------------------------------------------------------------------------------------

def _posix_names() -> list[str]:
    try:
        names = os.listdir(_proc.SHM_DIR)
    except OSError:
        return []
    # sem.* files are POSIX named semaphores (sem_open), not shared memory segments.
    return sorted(n for n in names if not n.startswith("sem."))


def _posix_info(name: str, scan: _proc.MapsScan) -> SegmentInfo | None:
    """Look at /dev/shm/NAME; None if it is gone or not a regular file."""
    path = os.path.join(_proc.SHM_DIR, name)
    head = b""
    detail = None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        fd = None
        detail = f"cannot read it: {exc.strerror}"
    try:
        st = os.fstat(fd) if fd is not None else os.lstat(path)
        if not _stat.S_ISREG(st.st_mode):
            return None
        if fd is not None:
            head = os.pread(fd, layout.HEADER_SIZE, 0)
    except FileNotFoundError:
        return None
    except OSError as exc:
        detail = f"cannot read it: {exc.strerror}"
    finally:
        if fd is not None:
            os.close(fd)
    if detail is not None:
        kind, state, header = KIND_UNREADABLE, None, None
    else:
        kind, state, header, detail = _classify(name, "posix", st.st_size, head)
    mappings = tuple(scan.posix_mappers(st.st_dev, st.st_ino))
    if header is not None:
        creator_pid = header.creator_pid
        creator_alive = _proc.process_alive(header.creator_pid, header.creator_start)
        created = header.created_ns / 1e9
    else:
        creator_pid = creator_alive = None
        created = st.st_ctime
    return SegmentInfo(
        name=name, backend="posix", key=None, shmid=None, kind=kind, state=state,
        size=st.st_size, mode=_stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
        creator_pid=creator_pid, creator_alive=creator_alive, mappings=mappings,
        attach_count=None, created=created, pending_removal=False,
        orphan=_is_orphan(header, creator_alive, mappings, None, False), detail=detail,
        header=header, inode=(st.st_dev, st.st_ino))


# -- System V ----------------------------------------------------------------------------------

_SHM_DEST = 0o1000  # mode bit the kernel sets after IPC_RMID while the segment is attached


def _sysv_head(shmid: int, size: int) -> bytes:
    """Copy the first bytes of a System V segment (attaching read-only for a moment)."""
    attachment = _native.SysVAttachment(shmid, readonly=True)
    try:
        view = memoryview(attachment)
        try:
            return bytes(view[:min(size, layout.HEADER_SIZE)])
        finally:
            view.release()
    finally:
        attachment.detach()


def _sysv_info(row: dict, scan: _proc.MapsScan, name: str | None = None) -> SegmentInfo | None:
    """Build the info of one /proc/sysvipc/shm row; None if the segment is gone meanwhile."""
    shmid, key, size = row["shmid"], row["key"], row["size"]
    label = name if name is not None else (f"key {format_key(key)}" if key else f"shmid {shmid}")
    try:
        head = _sysv_head(shmid, size)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EIDRM):
            return None
        kind, state, header = KIND_UNREADABLE, None, None
        detail = f"cannot attach it: {exc.strerror}"
    else:
        kind, state, header, detail = _classify(label, "sysv", size, head)
    mappings = tuple(scan.sysv_mappers(shmid))
    pending = bool(row["perms"] & _SHM_DEST)
    if header is not None:
        creator_pid = header.creator_pid
        creator_alive = _proc.process_alive(header.creator_pid, header.creator_start)
        created = header.created_ns / 1e9
    else:
        creator_pid = row["cpid"]
        created = float(row["ctime"])
        started = _proc.started_at(creator_pid)
        # A process that started after the segment was made cannot be its creator: pid reuse.
        creator_alive = started is not None and started <= created + _PID_REUSE_SLACK
    return SegmentInfo(
        name=name, backend="sysv", key=key, shmid=shmid, kind=kind, state=state, size=size,
        mode=row["perms"] & 0o777, uid=row["uid"], gid=row["gid"], creator_pid=creator_pid,
        creator_alive=creator_alive, mappings=mappings, attach_count=row["nattch"],
        created=created, pending_removal=pending,
        orphan=_is_orphan(header, creator_alive, mappings, row["nattch"], pending),
        detail=detail, header=header)


# -- listing -----------------------------------------------------------------------------------

def list_segments(*, prefix: str | None = None,
                  names: Iterable[str] | None = None) -> list[SegmentInfo]:
    """Every shared memory segment on the machine, POSIX first, then System V.

    With filters, only segments that match at least one filter are listed:

    Args:
        prefix: POSIX names starting with it. System V segments store no name, so a prefix
            never selects them; use `names` for those.
        names: exact names: the POSIX segment of that name and the System V segment whose key
            is `sysv_key(name)` (which is then reported under that name).

    Never raises for what it finds: foreign, corrupt, unreadable segments and segments that
    vanish while listing are reported as such or skipped.
    """
    wanted = set(names or ())
    filtered = prefix is not None or bool(wanted)
    keys = {segment.sysv_key(n): n for n in wanted}
    scan = _proc.scan_mappings()
    out = []
    for name in _posix_names():
        if filtered and not (name in wanted or (prefix is not None and name.startswith(prefix))):
            continue
        info = _posix_info(name, scan)
        if info is not None:
            out.append(info)
    for row in sorted(_proc.sysv_segments(), key=lambda r: r["shmid"]):
        name = keys.get(row["key"]) if row["key"] else None
        if filtered and name is None:
            continue
        info = _sysv_info(row, scan, name)
        if info is not None:
            out.append(info)
    return out


def _not_found(label: str, backend: str) -> SegmentNotFoundError:
    return SegmentNotFoundError(
        errno.ENOENT, f"no segment {describe(label, backend)}; `shmkit ls` lists every "
                      f"segment (System V ones by key)", label)


def find(name: str | None = None, *, backend: str | None = None, key: int | None = None,
         shmid: int | None = None) -> SegmentInfo:
    """Look up one segment by name, System V key, or System V shmid.

    Without `backend`, a name is looked up on both backends.

    Raises:
        SegmentNotFoundError: nothing matches.
        ValueError: bad arguments, or the name exists on both backends and `backend` is None.
    """
    if backend is not None:
        segment.validate_backend(backend)
    if key is not None or shmid is not None:
        if backend == "posix":
            raise ValueError("key and shmid identify System V segments; use backend 'sysv'")
        return _find_sysv(name, key, shmid)
    if name is None:
        raise ValueError("give a segment name, or a System V key or shmid")
    _check_lookup_name(name)
    found = []
    scan = _proc.scan_mappings()
    if backend in (None, "posix"):
        info = _posix_info(name, scan)
        if info is not None:
            found.append(info)
    if backend in (None, "sysv"):
        try:
            key = segment.sysv_key(name)
        except ValueError:
            if backend == "sysv":
                raise
            key = None  # a POSIX-only name (longer than shmkit allows): no System V key
        for row in _proc.sysv_segments() if key is not None else ():
            info = _sysv_info(row, scan, name) if row["key"] == key else None
            if info is not None:
                found.append(info)
    if not found:
        raise _not_found(name, backend or "posix or sysv")
    if len(found) > 1:
        raise ValueError(f"segment {name!r} exists on both backends (posix and sysv); choose "
                         f"one with --backend posix|sysv (backend= in Python)")
    return found[0]


def _check_lookup_name(name: str) -> None:
    # Looser than segment.validate_name: other programs may use names shmkit would not create
    # (longer than shmkit's limit), and tools must still reach them.
    if not isinstance(name, str) or not name or "/" in name or "\0" in name or name in (".", ".."):
        segment.validate_name(name)  # raises with the precise rule


def _find_sysv(name: str | None, key: int | None, shmid: int | None) -> SegmentInfo:
    if key is not None and key == 0:
        raise ValueError("key 0 is IPC_PRIVATE and names no single segment; use the shmid")
    rows = _proc.sysv_segments()
    scan = _proc.scan_mappings()
    match = [r for r in rows
             if (key is None or r["key"] == key) and (shmid is None or r["shmid"] == shmid)]
    info = _sysv_info(match[0], scan, name) if match else None
    if info is None:
        what = " ".join(filter(None, [f"key {format_key(key)}" if key is not None else "",
                                      f"shmid {shmid}" if shmid is not None else ""]))
        asked = f" (asked for as {name!r})" if name else ""
        raise SegmentNotFoundError(
            errno.ENOENT, f"no System V segment with {what}{asked}; `shmkit ls` lists every "
                          f"segment (System V ones by key)", name or what)
    return info


def inspect(name: str | None = None, *, backend: str | None = None, key: int | None = None,
            shmid: int | None = None) -> Inspection:
    """Everything `shmkit inspect` shows about one segment.

    Adds to `find`: the resident bytes of each process's mapping (/proc/PID/smaps Rss), the
    processes' command names, and for shmkit objects the kind's live state (see
    `STATE_PROVIDERS`). A failing state function is reported in `state_error`, not raised.

    Raises:
        SegmentNotFoundError, ValueError: as `find`.
    """
    info = find(name, backend=backend, key=key, shmid=shmid)
    mappings = tuple(_proc.with_residency(list(info.mappings)))
    commands = {pid: _proc.command(pid) for pid in info.mapped_by}
    state, state_error = _live_state(info)
    return Inspection(info, mappings, commands, state, state_error)


def _live_state(info: SegmentInfo) -> tuple[dict | None, str | None]:
    if info.header is None:
        return None, None
    func = state_function(info.header.kind)
    if func is None:
        return None, None
    try:
        if info.backend == "posix":
            seg = segment.Segment.open(info.name, readonly=True)
        else:
            if not info.key:
                return None, "a System V segment without a key cannot be reopened to read its state"
            seg = segment.Segment.open(info.name or f"sysv-key-{info.key & 0xFFFFFFFF:08x}",
                                       backend="sysv", key=info.key, readonly=True)
    except (ShmkitError, OSError, ValueError) as exc:
        return None, f"cannot open it to read its state: {exc}"
    try:
        header = layout.parse(seg)
        state = func(seg, header)
        return (dict(state) if state is not None else None), None
    except Exception as exc:  # a broken or hostile segment must not break inspect
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        try:
            seg.close()
        except ShmkitError:
            pass  # the state function kept a view; the mapping goes when it is collected


# -- removal -----------------------------------------------------------------------------------

def _unlink(info: SegmentInfo) -> None:
    if info.backend == "sysv":
        segment.unlink(info.label, backend="sysv", shmid=info.shmid)
        return
    try:
        segment.validate_name(info.name)
    except ValueError:
        # A name only another program could make (longer than shmkit allows): shm_unlink
        # is unlink(2) of /dev/shm/NAME on Linux.
        try:
            os.unlink(os.path.join(_proc.SHM_DIR, info.name))
        except OSError as exc:
            raise from_oserror(exc, action="remove", name=info.name, backend="posix") from exc
        return
    segment.unlink(info.name, backend="posix")


def remove(name: str | None = None, *, backend: str | None = None, key: int | None = None,
           shmid: int | None = None) -> SegmentInfo:
    """Remove one segment by name (or System V key/shmid), whatever it is: `shmkit rm`.

    Processes that map it keep their memory; the name is gone at once (System V: IPC_RMID,
    memory freed at the last detach).

    Returns:
        What the segment was just before removal.

    Raises:
        SegmentNotFoundError, SegmentPermissionError, ValueError.
    """
    info = find(name, backend=backend, key=key, shmid=shmid)
    _unlink(info)
    return info


def orphans(*, prefix: str | None = None, names: Iterable[str] | None = None) -> list[SegmentInfo]:
    """The segments `gc` would remove now (filters as in `list_segments`)."""
    return [info for info in list_segments(prefix=prefix, names=names) if info.orphan]


def _recheck(info: SegmentInfo, scan: _proc.MapsScan) -> SegmentInfo | None:
    """The same segment looked at again, or None if it is gone or was replaced."""
    if info.backend == "posix":
        fresh = _posix_info(info.name, scan)
        return fresh if fresh is not None and fresh.inode == info.inode else None
    for row in _proc.sysv_segments():
        if row["shmid"] == info.shmid and row["key"] == info.key:
            return _sysv_info(row, scan, info.name)
    return None


def collect_garbage(*, dry_run: bool = False, prefix: str | None = None,
                    names: Iterable[str] | None = None) -> list[GcResult]:
    """Remove orphans: shmkit segments whose creator is dead and that no process maps.

    Foreign, corrupt and unreadable segments are never touched (remove those by name).
    Each orphan is checked again just before removal, so one that a process mapped in the
    meantime is skipped. Only processes whose /proc/PID/maps we may read are seen: run as
    root to see everyone's (System V attach counts are always complete).

    Args:
        dry_run: report what would be removed, remove nothing.
        prefix, names: restrict to these segments (see `list_segments`).

    Returns:
        One result per orphan found, in listing order.
    """
    found = orphans(prefix=prefix, names=names)
    if dry_run:
        return [GcResult(info, "would_remove") for info in found]
    results = []
    scan = _proc.scan_mappings()
    for info in found:
        fresh = _recheck(info, scan)
        if fresh is None:
            results.append(GcResult(info, "skipped", "it vanished or was replaced meanwhile"))
            continue
        if not fresh.orphan:
            results.append(GcResult(fresh, "skipped", "it is no longer an orphan"))
            continue
        try:
            _unlink(fresh)
        except SegmentNotFoundError:
            results.append(GcResult(fresh, "skipped", "it was removed meanwhile"))
        except (ShmkitError, OSError, ValueError) as exc:
            results.append(GcResult(fresh, "failed", getattr(exc, "strerror", None) or str(exc)))
        else:
            results.append(GcResult(fresh, "removed"))
    return results
