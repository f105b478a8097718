"""The header at the start of every typed shmkit segment (segment layer).

Plain `Segment`s have no header. Typed objects (locks, queues, arrays, ...) start with this
128-byte header, then their payload at offset 128. All integers are little-endian.

=======  ====  ==================  ===========================================================
offset   size  field               meaning
=======  ====  ==================  ===========================================================
0        8     magic               b"\\x89SHMKIT\\n": this is a shmkit object; written after
                                   every other header field (release store)
8        2     layout_version      version of this table (1); newer versions are refused
10       2     kind                what the object is (`Kind`)
12       4     state               0 initialising, 1 ready; written last (release store)
16       8     segment_size        size of the whole segment in bytes
24       8     payload_offset      where the object's own data starts (128)
32       8     payload_size        bytes of object data after the header
40       4     creator_pid         pid of the process that created it
44       4     reserved            0
48       8     creator_start       creator's start time, clock ticks since boot (pid reuse)
56       8     created_ns          creation time, ns since the epoch
64       64    params              8 kind-specific u64 values (capacity, parties, ...)
=======  ====  ==================  ===========================================================

Creation is atomic to observers (DESIGN invariant 3), in three published steps:

1. the creator writes every field except the magic (which stays zero) with state 0;
2. it publishes the magic with a release store: from then on the fields are complete;
3. it initialises the payload, then publishes state 1 with a release store.

An opener reads the magic and the state with acquire loads. A zero magic means "not written
yet": it waits while the header is still empty or names a live creator. State 0 means "not
ready yet": it waits while the creator (pid plus start time, so a reused pid does not count)
is alive, and reports a dead one. Waiting is bounded by `INIT_WAIT_SECONDS`.
"""

from __future__ import annotations

import enum
import os
import struct
import sys
import time
from dataclasses import dataclass

from . import _native, _proc
from .errors import CorruptSegmentError, KindMismatchError, describe
from .segment import Segment

MAGIC = b"\x89SHMKIT\n"
# The magic as the u64 that `_native.store_u64` writes, so that the bytes land in order.
_MAGIC_WORD = int.from_bytes(MAGIC, sys.byteorder)
MAGIC_OFFSET = 0
CREATOR_PID_OFFSET = 40
LAYOUT_VERSION = 1
HEADER_SIZE = 128
PAYLOAD_OFFSET = HEADER_SIZE
PARAM_COUNT = 8
STATE_OFFSET = 12
STATE_INITIALISING = 0
STATE_READY = 1

# How long an opener waits for a live creator to finish initialising.
INIT_WAIT_SECONDS = 2.0

_FIXED = struct.Struct("<8sHHIQQQIIQQ")
_PARAMS = struct.Struct(f"<{PARAM_COUNT}Q")
_CREATOR = struct.Struct("<IIQ")  # creator_pid, reserved, creator_start at offset 40
assert _FIXED.size + _PARAMS.size == HEADER_SIZE


class Kind(enum.IntEnum):
    """What a typed segment holds. Values are stored in the header: never renumber them."""

    MUTEX = 1
    SEMAPHORE = 2
    CONDITION = 3
    EVENT = 4
    RWLOCK = 5
    BARRIER = 6
    ATOMIC_INT = 7
    ATOMIC_U32 = 8
    QUEUE = 16
    BROADCAST = 17
    LATEST = 18
    ARRAY = 32
    DICT = 33

    @property
    def label(self) -> str:
        """The user-facing class name of the kind: 'Mutex', 'Queue', ..."""
        return _LABELS[self]


_LABELS = {
    Kind.MUTEX: "Mutex", Kind.SEMAPHORE: "Semaphore", Kind.CONDITION: "Condition",
    Kind.EVENT: "Event", Kind.RWLOCK: "RWLock", Kind.BARRIER: "Barrier",
    Kind.ATOMIC_INT: "AtomicInt", Kind.ATOMIC_U32: "AtomicU32", Kind.QUEUE: "Queue",
    Kind.BROADCAST: "Broadcast", Kind.LATEST: "Latest", Kind.ARRAY: "SharedArray",
    Kind.DICT: "SharedDict",
}


@dataclass(frozen=True)
class Header:
    """The decoded header of a typed segment."""

    version: int
    kind: Kind
    state: int
    segment_size: int
    payload_offset: int
    payload_size: int
    creator_pid: int
    creator_start: int
    created_ns: int
    params: tuple[int, ...]

    def as_dict(self) -> dict:
        """JSON-friendly form, for `shmkit inspect --json`."""
        return {
            "layout_version": self.version, "kind": self.kind.label,
            "state": "ready" if self.state == STATE_READY else "initialising",
            "segment_size": self.segment_size, "payload_offset": self.payload_offset,
            "payload_size": self.payload_size, "creator_pid": self.creator_pid,
            "creator_start": self.creator_start, "created_ns": self.created_ns,
            "params": list(self.params),
        }


def _corrupt(seg: Segment, why: str) -> CorruptSegmentError:
    return CorruptSegmentError(
        f"segment {describe(seg.name, seg.backend)} {why}; if it is a leftover, remove it with "
        f"`shmkit rm {seg.name}`")


def parse(seg: Segment) -> Header:
    """Decode and check the header of `seg` without waiting or checking the kind.

    Every field is treated as untrusted (DESIGN invariant 1).

    Raises:
        CorruptSegmentError: no shmkit header, a newer layout, or impossible sizes.
    """
    buf = seg.buf
    if seg.size < HEADER_SIZE:
        raise _corrupt(seg, f"is too small ({seg.size} bytes) to be a shmkit object")
    # acquire: pairs with the release store of the magic in write(); every field read below
    # is then the one the creator wrote before publishing the magic
    _native.load_u64(buf, MAGIC_OFFSET)
    (magic, version, kind, _state, segment_size, payload_offset, payload_size, pid, _reserved,
     started, created) = _FIXED.unpack_from(buf, 0)
    state = _native.load_u32(buf, STATE_OFFSET)  # acquire: pairs with the release in publish()
    if magic != MAGIC:
        raise _corrupt(seg, "is not a shmkit object (no shmkit magic at offset 0)")
    if version == 0:
        raise _corrupt(seg, "has layout version 0")
    if version > LAYOUT_VERSION:
        raise CorruptSegmentError(
            f"segment {describe(seg.name, seg.backend)} uses layout version {version}, newer "
            f"than this shmkit understands ({LAYOUT_VERSION}); upgrade shmkit")
    try:
        kind = Kind(kind)
    except ValueError:
        raise _corrupt(seg, f"has an unknown kind {kind}") from None
    if segment_size != seg.size:
        raise _corrupt(seg, f"claims {segment_size} bytes but is {seg.size} bytes long")
    if payload_offset != PAYLOAD_OFFSET or payload_size > segment_size - payload_offset:
        raise _corrupt(seg, f"has an impossible payload ({payload_size} bytes at {payload_offset})")
    if state not in (STATE_INITIALISING, STATE_READY):
        raise _corrupt(seg, f"has an invalid state word {state}")
    if not 0 < pid <= _proc.pid_max():
        raise _corrupt(seg, f"has an impossible creator pid {pid}")
    params = _PARAMS.unpack_from(buf, _FIXED.size)
    return Header(version, kind, state, segment_size, payload_offset, payload_size, pid,
                  started, created, params)


def read(seg: Segment, kind: Kind | None, *, wait: float | None = None) -> Header:
    """Check that `seg` is a ready shmkit object of `kind` and return its header.

    Waits up to `wait` seconds (default `INIT_WAIT_SECONDS`) while a live creator is still
    writing the header or initialising the payload, or has not started writing at all.

    Raises:
        CorruptSegmentError: not a shmkit object, damaged, or its creator died while
            initialising it (or was still at it when the wait ran out).
        KindMismatchError: it is another kind of shmkit object.
    """
    wait = INIT_WAIT_SECONDS if wait is None else wait
    deadline = time.monotonic() + wait
    delay = 0.0005
    while True:
        pending = _unpublished_creator(seg)
        if pending is not None:
            # The magic is not there yet: a creator may still be writing the header.
            if time.monotonic() >= deadline:
                if pending == 0:
                    raise _corrupt(seg, f"is not a shmkit object (its header is still empty "
                                        f"after {wait:g} s)")
                raise CorruptSegmentError(
                    f"segment {describe(seg.name, seg.backend)} is still being initialised by "
                    f"pid {pending} after {wait:g} s; try again later")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
            continue
        header = parse(seg)
        if kind is not None and header.kind != kind:
            raise KindMismatchError(
                f"segment {describe(seg.name, seg.backend)} is {_a(header.kind.label)}, not "
                f"{_a(kind.label)}; open it with shmkit.{header.kind.label}")
        if header.state == STATE_READY:
            return header
        if not _proc.process_alive(header.creator_pid, header.creator_start):
            raise _corrupt(seg, f"was never finished: its creator (pid {header.creator_pid}) "
                                f"died while initialising it")
        if time.monotonic() >= deadline:
            raise CorruptSegmentError(
                f"segment {describe(seg.name, seg.backend)} is still being initialised by pid "
                f"{header.creator_pid} after {wait:g} s; try again later")
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def _a(label: str) -> str:
    return f"an {label}" if label[0] in "AEIOU" else f"a {label}"


def _unpublished_creator(seg: Segment) -> int | None:
    """Who may still be writing the header of `seg`, while its magic is not published.

    Returns 0 when the header is all zeroes (its creator has not started writing), the
    creator's pid when the fields name a live process, and None when the magic is there or
    the bytes cannot be a header in the making (then `parse` says what is wrong).
    """
    if seg.size < HEADER_SIZE:
        return None
    buf = seg.buf
    if _native.load_u64(buf, MAGIC_OFFSET) != 0:  # acquire: pairs with write()
        return None
    if not any(buf[:HEADER_SIZE]):
        return 0
    pid, _reserved, started = _CREATOR.unpack_from(buf, CREATOR_PID_OFFSET)
    if 0 < pid <= _proc.pid_max() and _proc.process_alive(pid, started):
        return pid
    return None


def write(seg: Segment, kind: Kind, params: tuple[int, ...] = ()) -> None:
    """Write a header in state 'initialising' at the start of a freshly created `seg`.

    The magic goes last, with a release store, so an opener that sees it sees every field.

    Raises:
        ValueError, TypeError: bad kind or params, or `seg` is smaller than the header.
    """
    kind = _check_kind(kind)
    padded = _check_params(params)
    if seg.size < HEADER_SIZE:
        raise ValueError(f"segment {describe(seg.name, seg.backend)} has {seg.size} bytes; a "
                         f"typed segment needs at least {HEADER_SIZE}")
    buf = seg.buf
    _FIXED.pack_into(buf, 0, bytes(len(MAGIC)), LAYOUT_VERSION, int(kind), STATE_INITIALISING,
                     seg.size, PAYLOAD_OFFSET, seg.size - PAYLOAD_OFFSET, os.getpid(), 0,
                     _proc.own_start_time(), time.time_ns())
    _PARAMS.pack_into(buf, _FIXED.size, *padded)
    _native.store_u64(buf, MAGIC_OFFSET, _MAGIC_WORD)  # release: publishes the fields above


def publish(seg: Segment) -> None:
    """Mark `seg` ready. Release store: every write before it is visible to openers."""
    _native.store_u32(seg.buf, STATE_OFFSET, STATE_READY)


def _check_kind(kind: object) -> Kind:
    if isinstance(kind, bool) or not isinstance(kind, int):
        raise TypeError(f"kind must be a layout.Kind, not {type(kind).__name__}")
    try:
        return Kind(kind)
    except ValueError:
        raise ValueError(f"kind {kind} is not a layout.Kind") from None


def _check_params(params: object) -> tuple[int, ...]:
    try:
        values = tuple(params)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"params must be a sequence of ints, not {type(params).__name__}") from None
    if len(values) > PARAM_COUNT:
        raise ValueError(f"at most {PARAM_COUNT} header params, got {len(values)}")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"header param {i} must be an int, not {type(value).__name__}")
        if not 0 <= value < 2**64:
            raise ValueError(f"header param {i} must fit in an unsigned 64-bit int, not {value}")
    return values + (0,) * (PARAM_COUNT - len(values))


def create_typed(name: str, kind: Kind, payload_size: int, params: tuple[int, ...] = (), *,
                 init=None, backend: str = "posix", mode: int = 0o600,
                 **segment_kwargs) -> tuple[Segment, Header]:
    """Create a segment holding a header and `payload_size` bytes, initialise it, publish it.

    `init(seg)` runs between writing the header and publishing it; openers in other
    processes wait for it (up to `INIT_WAIT_SECONDS`). If it raises, the segment is removed
    again so nothing half-made is left behind.

    Raises:
        TypeError, ValueError: bad kind, payload_size or params, before any syscall.
        (and whatever `Segment.create` or `init` raise)
    """
    _check_kind(kind)
    _check_params(params)
    if isinstance(payload_size, bool) or not isinstance(payload_size, int):
        raise TypeError(f"payload_size must be an int number of bytes, not "
                        f"{type(payload_size).__name__}")
    if payload_size < 0:
        raise ValueError(f"payload_size must be >= 0, not {payload_size}")
    if init is not None and not callable(init):
        raise TypeError(f"init must be callable, not {type(init).__name__}")
    seg = Segment.create(name, HEADER_SIZE + payload_size, backend=backend, mode=mode,
                         **segment_kwargs)
    try:
        write(seg, kind, params)
        if init is not None:
            init(seg)
        publish(seg)
    except BaseException:
        try:
            seg.unlink()
        except Exception:
            pass  # removed meanwhile: the original error is the one to report
        try:
            seg.close()
        except Exception:
            pass
        raise
    return seg, parse(seg)


def open_typed(name: str, kind: Kind, *, backend: str = "posix", readonly: bool = False,
               **segment_kwargs) -> tuple[Segment, Header]:
    """Open `name` and check that it is a ready shmkit object of `kind`.

    Waits up to `INIT_WAIT_SECONDS` for a creator that is still initialising it. The segment
    is closed again if the check fails.

    Raises:
        SegmentNotFoundError, SegmentPermissionError: from `Segment.open`.
        CorruptSegmentError: not a shmkit object, damaged, a newer layout, or never finished.
        KindMismatchError: it holds another kind (the message names both).
    """
    kind = _check_kind(kind)
    seg = Segment.open(name, backend=backend, readonly=readonly, **segment_kwargs)
    try:
        return seg, read(seg, kind)
    except BaseException:
        seg.close()
        raise
