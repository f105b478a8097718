"""The header at the start of every typed shmkit segment (segment layer).

Plain `Segment`s have no header. Typed objects (locks, queues, arrays, ...) start with this
128-byte header, then their payload at offset 128. All integers are little-endian.

=======  ====  ==================  ===========================================================
offset   size  field               meaning
=======  ====  ==================  ===========================================================
0        8     magic               b"\\x89SHMKIT\\n": this is a shmkit object
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

Creation is atomic to observers (DESIGN invariant 3): the creator writes the header with
state 0, initialises the payload, then publishes state 1 with a release store. An opener that
finds state 0 waits briefly for a live creator and reports a dead one.
"""

from __future__ import annotations

import enum
import os
import struct
import time
from dataclasses import dataclass

from . import _native, _proc
from .errors import CorruptSegmentError, KindMismatchError, describe
from .segment import Segment

MAGIC = b"\x89SHMKIT\n"
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


def read(seg: Segment, kind: Kind | None, *, wait: float = INIT_WAIT_SECONDS) -> Header:
    """Check that `seg` is a ready shmkit object of `kind` and return its header.

    Waits up to `wait` seconds for a live creator that is still initialising (or has not yet
    written the header at all).

    Raises:
        CorruptSegmentError: not a shmkit object, damaged, or its creator died while
            initialising it.
        KindMismatchError: it is another kind of shmkit object.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            header = parse(seg)
        except CorruptSegmentError:
            # A brand-new segment is all zeroes until its creator writes the header.
            if time.monotonic() < deadline and _all_zero(seg.buf[:HEADER_SIZE]):
                time.sleep(0.001)
                continue
            raise
        if kind is not None and header.kind != kind:
            raise KindMismatchError(
                f"segment {describe(seg.name, seg.backend)} is a {header.kind.label}, not a "
                f"{kind.label}; open it with shmkit.{header.kind.label}")
        if header.state == STATE_READY:
            return header
        if not _proc.process_alive(header.creator_pid, header.creator_start):
            raise _corrupt(seg, f"was never finished: its creator (pid {header.creator_pid}) "
                                f"died while initialising it")
        if time.monotonic() >= deadline:
            raise CorruptSegmentError(
                f"segment {describe(seg.name, seg.backend)} is still being initialised by pid "
                f"{header.creator_pid} after {wait:.1f} s; try again later")
        time.sleep(0.001)


def _all_zero(view: memoryview) -> bool:
    return not any(view)


def write(seg: Segment, kind: Kind, params: tuple[int, ...] = ()) -> None:
    """Write a header in state 'initialising' at the start of a freshly created `seg`."""
    if len(params) > PARAM_COUNT:
        raise ValueError(f"at most {PARAM_COUNT} header params, got {len(params)}")
    padded = tuple(params) + (0,) * (PARAM_COUNT - len(params))
    _FIXED.pack_into(seg.buf, 0, MAGIC, LAYOUT_VERSION, int(kind), STATE_INITIALISING, seg.size,
                     PAYLOAD_OFFSET, seg.size - PAYLOAD_OFFSET, os.getpid(), 0,
                     _proc.own_start_time(), time.time_ns())
    _PARAMS.pack_into(seg.buf, _FIXED.size, *padded)


def publish(seg: Segment) -> None:
    """Mark `seg` ready. Release store: every write before it is visible to openers."""
    _native.store_u32(seg.buf, STATE_OFFSET, STATE_READY)


def create_typed(name: str, kind: Kind, payload_size: int, params: tuple[int, ...] = (), *,
                 init=None, backend: str = "posix", mode: int = 0o600,
                 **segment_kwargs) -> tuple[Segment, Header]:
    """Create a segment holding a header and `payload_size` bytes, initialise it, publish it.

    `init(seg)` runs between writing the header and publishing it; if it raises, the segment
    is removed again so nothing half-made is left behind.
    """
    seg = Segment.create(name, HEADER_SIZE + payload_size, backend=backend, mode=mode,
                         **segment_kwargs)
    try:
        write(seg, kind, params)
        if init is not None:
            init(seg)
        publish(seg)
    except BaseException:
        seg.unlink()
        try:
            seg.close()
        except Exception:
            pass
        raise
    return seg, parse(seg)


def open_typed(name: str, kind: Kind, *, backend: str = "posix", readonly: bool = False,
               **segment_kwargs) -> tuple[Segment, Header]:
    """Open `name` and check that it is a ready shmkit object of `kind`.

    The segment is closed again if the check fails.
    """
    seg = Segment.open(name, backend=backend, readonly=readonly, **segment_kwargs)
    try:
        return seg, read(seg, kind)
    except BaseException:
        seg.close()
        raise
