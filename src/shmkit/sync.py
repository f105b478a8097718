"""Process-shared synchronisation primitives living in shared memory (objects layer).

`Mutex`, `Semaphore`, `Condition`, `Event`, `RWLock`, `Barrier`, `AtomicInt` and `AtomicU32`.
Their API mirrors `threading`; unlike `threading` they work between unrelated processes.

Each primitive can live in two places:

* standalone, in a segment of its own with the typed header (`layout.py`), created with
  ``X.create(name, ...)`` and opened elsewhere with ``X.open(name)``; `shmkit ls` and
  `shmkit inspect` show its kind and state (see `describe_state`);
* inside a segment the user lays out, at an offset: ``X.create_at(segment, offset, ...)``
  writes its initial state, ``X.at(segment, offset)`` attaches to it. Each class documents
  `SIZE` (bytes) and `ALIGNMENT` (the offset must be a multiple of it).

The hot methods (acquire/release, `with`, Event set/wait, the atomics) are methods of C types
in `_native`, which every class here extends with naming, lifetime and pickling. Each object
holds one export of its segment's buffer for its whole life: while it exists, closing the
segment raises `SegmentBusyError`.

Owner death (the full policy is in docs/sync.md): a `Mutex` (and the write side of an `RWLock`)
records its holder's kernel thread id. A waiter that has slept one slice (2 ms, growing to
50 ms) checks that the holder still runs; if it died, the waiter takes the lock over and
``recovered`` is True until `mark_consistent()` or the next `release()`. All processes using
an object must share a pid namespace.

Layouts (little-endian, offsets relative to the object; the C file comments hold the same
tables):

=========  ======  ===============================================================
kind       SIZE    fields (u32 unless noted)
=========  ======  ===============================================================
Mutex      24      word (owner tid | 1<<31 waiters), recovered, owner_pid, waiters,
                   owner_start (owner thread's start time, low 32 bits), reserved
Semaphore  16      value, waiters, max_value (0: none), reserved
Event      8       flag, waiters
Condition  32      Mutex (24), seq, waiters
RWLock     40+16n  Mutex (24), slots n, drain, writer_waiting, reserved,
                   n x {tid, count, start, reserved}
Barrier    32      parties, state (count | generation<<16 | reset<<30 | broken<<31),
                   waiters, completer (tid of the last party while the round completes),
                   default timeout ns (u64, all ones: none), completer_start, reserved
AtomicInt  8       value (i64)
AtomicU32  8       value, waiters
=========  ======  ===============================================================
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from . import _native, layout
from .errors import (
    CorruptSegmentError,
    LockNotOwnedError,
    ResourceLimitError,
    SegmentBusyError,
    ShmkitError,
    WaitTimeoutError,
    describe,
)
from .layout import PAYLOAD_OFFSET, Kind
from .segment import Segment

__all__ = [
    "AtomicInt", "AtomicU32", "Barrier", "BrokenBarrierError", "Condition", "Event", "Mutex",
    "RWLock", "Semaphore", "describe_state", "get_default_spin_ns", "set_default_spin_ns",
]

_NOTIFY_ALL = 2**31 - 1
_SLOTS = ("_segment", "_offset", "_owns", "__weakref__")
_NO_TIMEOUT = 2**64 - 1


class BrokenBarrierError(ShmkitError, threading.BrokenBarrierError):
    """A `Barrier` is broken: a party timed out, `abort()` was called, or the action raised.

    Every party waiting then, and every later arrival, gets this error until someone calls
    `reset()`. Also an instance of `threading.BrokenBarrierError`.
    """


def set_default_spin_ns(spin_ns: int) -> None:
    """Set the longest (ns) blocking calls spin before they sleep, for objects made from now on.

    Within that bound each object adapts how long it spins to whether spinning pays (see
    docs/sync.md). Each object's own `spin_ns` attribute can be changed too. 0 disables
    spinning.
    """
    _native.set_spin_ns(spin_ns)


def get_default_spin_ns() -> int:
    """How long (ns) new objects spin before sleeping (default 20000)."""
    return _native.get_spin_ns()


def _spin(spin_ns: int | None) -> int:
    if spin_ns is None:
        return _native.get_spin_ns()
    if isinstance(spin_ns, bool) or not isinstance(spin_ns, int):
        raise TypeError(f"spin_ns must be an int number of nanoseconds, not "
                        f"{type(spin_ns).__name__}")
    if not 0 <= spin_ns <= 1_000_000_000:
        raise ValueError(f"spin_ns must be within 0..1_000_000_000, not {spin_ns}")
    return spin_ns


def _check_offset(segment: Segment, offset: int, size: int, alignment: int, label: str) -> None:
    if not isinstance(segment, Segment):
        raise TypeError(f"segment must be a shmkit.Segment, not {type(segment).__name__}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, not {type(offset).__name__}")
    if offset < 0 or offset % alignment:
        raise ValueError(f"offset must be a non-negative multiple of {label}.ALIGNMENT "
                         f"({alignment}), not {offset}")
    if offset + size > segment.size:
        raise ValueError(f"a {label} needs {size} bytes at offset {offset}, but segment "
                         f"{describe(segment.name, segment.backend)} has {segment.size}")
    if segment.readonly:
        raise ValueError(f"segment {describe(segment.name, segment.backend)} is mapped "
                         f"read-only; a {label} needs to write: open it read-write")


class _Placed:
    """Where a primitive lives, and the lifecycle all primitives share.

    Subclasses set KIND, SIZE, ALIGNMENT and implement `_bind` (attach the C core) and
    `_init_memory` (write the initial state); most also extend a `_native` C type.
    """

    # No instance __dict__ on the C-backed classes (they list _SLOTS): a method call on an
    # object with a __dict__ costs an extra dictionary lookup, ~20 ns on the hot path.
    __slots__ = ()

    KIND: Kind
    SIZE: int
    ALIGNMENT: int

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError(f"create a {type(self).__name__} with {type(self).__name__}.create(name), "
                        f".open(name), .create_at(segment, offset) or .at(segment, offset)")

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def _new(cls, segment: Segment, offset: int, owns: bool, spin_ns: int | None, **extra):
        obj = cls.__new__(cls)
        obj._segment = segment
        obj._offset = offset
        obj._owns = owns
        obj._bind(segment, offset, _spin(spin_ns), **extra)
        return obj

    def _bind(self, segment: Segment, offset: int, spin_ns: int, **extra) -> None:
        # The C base class takes (buffer, offset, spin_ns).
        type(self).__mro__[-2].__init__(self, segment.buf, offset, spin_ns)

    @classmethod
    def _payload_size(cls, **params) -> int:
        return cls.SIZE

    @classmethod
    def _header_params(cls, **params) -> tuple[int, ...]:
        return ()

    @classmethod
    def _init_memory(cls, buf: memoryview, offset: int, **params) -> None:
        buf[offset:offset + cls._payload_size(**params)] = bytes(cls._payload_size(**params))

    @classmethod
    def _create(cls, name: str, *, backend: str, mode: int, spin_ns: int | None, extra: dict,
                **params):
        size = cls._payload_size(**params)
        seg, _header = layout.create_typed(
            name, cls.KIND, size, cls._header_params(**params),
            init=lambda s: cls._init_memory(s.buf, PAYLOAD_OFFSET, **params),
            backend=backend, mode=mode)
        try:
            return cls._new(seg, PAYLOAD_OFFSET, True, spin_ns, **extra)
        except BaseException:
            seg.unlink()  # we just made it: leave nothing half-usable behind
            seg.close()
            raise

    @classmethod
    def _open(cls, name: str, *, backend: str, spin_ns: int | None, extra: dict):
        seg, header = layout.open_typed(name, cls.KIND, backend=backend)
        try:
            cls._check_header(seg, header)
            return cls._new(seg, PAYLOAD_OFFSET, True, spin_ns, **extra)
        except BaseException:
            seg.close()
            raise

    @classmethod
    def _check_header(cls, seg: Segment, header: layout.Header) -> None:
        if header.payload_size < cls.SIZE:
            raise CorruptSegmentError(
                f"segment {describe(seg.name, seg.backend)} holds a {cls.KIND.label} of "
                f"{header.payload_size} bytes; it needs {cls.SIZE}: remove it with "
                f"`shmkit rm {seg.name}` and create it again")

    @classmethod
    def _create_at(cls, segment: Segment, offset: int, spin_ns: int | None, extra: dict,
                   **params):
        _check_offset(segment, offset, cls._payload_size(**params), cls.ALIGNMENT, cls.__name__)
        cls._init_memory(segment.buf, offset, **params)
        return cls._new(segment, offset, False, spin_ns, **extra)

    @classmethod
    def _at(cls, segment: Segment, offset: int, spin_ns: int | None, extra: dict):
        _check_offset(segment, offset, cls.SIZE, cls.ALIGNMENT, cls.__name__)
        return cls._new(segment, offset, False, spin_ns, **extra)

    # -- identity -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The name of the segment this object lives in."""
        return self._segment.name

    @property
    def segment(self) -> Segment:
        """The segment this object lives in (its own, or the one it was placed in)."""
        return self._segment

    @property
    def offset(self) -> int:
        """Where the object starts in its segment (128 for standalone objects)."""
        return self._offset

    def _what(self) -> str:
        seg = self._segment
        if self._owns:
            return f"{type(self).__name__} {describe(seg.name, seg.backend)}"
        return (f"{type(self).__name__} at offset {self._offset} of segment "
                f"{describe(seg.name, seg.backend)}")

    def __repr__(self) -> str:
        state = "" if self._attached_now() else " closed"
        return f"<shmkit.{self._what()}{state}>"

    # -- lifetime -----------------------------------------------------------------------------

    def _attached_now(self) -> bool:
        return self._attached

    def _detach_all(self) -> bool:
        return self._detach()

    def close(self) -> None:
        """Stop using the object in this process; the shared state stays for everyone else.

        A standalone object also closes its segment; an object placed with `at` leaves the
        user's segment open (but lets it be closed). Closing twice is allowed.

        Raises:
            SegmentBusyError: a thread of this process is blocked in one of its calls.
        """
        if not self._detach_all():
            raise SegmentBusyError(f"cannot close {self._what()}: a thread of this process is "
                                   f"blocked in one of its calls; wake it or wait for it first")
        if self._owns:
            self._segment.close()

    def unlink(self) -> None:
        """Remove the name of a standalone object so no new process can open it.

        Processes that have it open keep using it.

        Raises:
            SegmentNotFoundError: the name was already removed.
            ValueError: the object was placed in a user segment: unlink that segment instead.
        """
        if not self._owns:
            raise ValueError(f"{self._what()} has no name of its own; unlink the segment instead")
        self._segment.unlink()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- pickling: by name, or by (segment, offset) -------------------------------------------

    def _extra_state(self) -> dict:
        return {}

    def __reduce__(self):
        if self._owns:
            return (_reopen, (type(self), self._segment.name, self._segment.backend,
                              self.spin_ns, self._extra_state()))
        return (_reattach, (type(self), self._segment, self._offset, self.spin_ns,
                            self._extra_state()))

    # -- errors raised by the C core (messages live here) -------------------------------------

    def _error(self, code: str) -> BaseException:
        what = self._what()
        if code == "closed":
            return ValueError(f"{what} is closed")
        if code == "deadlock":
            return RuntimeError(f"cannot acquire {what}: this thread already holds it; it is "
                                f"not reentrant, so waiting would deadlock")
        if code == "not_owned":
            return LockNotOwnedError(f"cannot release {what}: this thread does not hold it")
        if code == "corrupt":
            return CorruptSegmentError(f"{what} holds impossible values (damaged shared memory); "
                                       f"create it again")
        return ShmkitError(f"{what}: {code}")

    def state(self) -> dict:
        """The shared state as `shmkit inspect` shows it (see `describe_state`)."""
        if not self._attached_now():
            raise self._error("closed")
        return _STATE[self.KIND](self._segment.buf, self._offset)


def _reopen(cls, name: str, backend: str, spin_ns: int, extra: dict):
    return cls._open(name, backend=backend, spin_ns=spin_ns, extra=extra)


def _reattach(cls, segment: Segment, offset: int, spin_ns: int, extra: dict):
    return cls._at(segment, offset, spin_ns, extra)


# ==== Mutex ==================================================================================

class Mutex(_Placed, _native.Mutex):
    """A robust, process-shared, non-reentrant lock (like `threading.Lock`, with an owner).

    The holder is a thread: only it may release, and acquiring again from the same thread
    raises RuntimeError instead of deadlocking. If the holder dies (process killed, or thread
    ended) while holding it, the next acquirer takes it over within milliseconds and sees
    ``recovered == True`` until it calls `mark_consistent()` or releases: the data the lock
    protects may be half-updated, so check or repair it first.

    Methods (C): ``acquire(blocking=True, timeout=None) -> bool`` (timeout in seconds, None or
    -1 = forever; releases the GIL; Ctrl-C interrupts it), ``release()`` (raises
    LockNotOwnedError from a non-holder), ``with mutex:``, ``locked()``, ``mark_consistent()``.
    Properties: ``recovered``, ``owner_pid``, ``owner_tid``, ``waiters``, ``spin_ns``.

    SIZE = 24 bytes, ALIGNMENT = 4; all-zero bytes are an unlocked mutex.
    """

    __slots__ = _SLOTS
    KIND = Kind.MUTEX
    SIZE = _native.MUTEX_SIZE
    ALIGNMENT = 4

    @classmethod
    def create(cls, name: str, *, backend: str = "posix", mode: int = 0o600,
               spin_ns: int | None = None) -> "Mutex":
        """Create a standalone mutex in a new segment named `name`, unlocked.

        Args:
            name: segment name (see `Segment.create`).
            backend: "posix" or "sysv".
            mode: permission bits of the segment; everyone who uses the lock needs read-write.
            spin_ns: how long blocking calls spin before sleeping (default: see
                `set_default_spin_ns`).

        Raises:
            SegmentExistsError: the name is taken.
        """
        return cls._create(name, backend=backend, mode=mode, spin_ns=spin_ns, extra={})

    @classmethod
    def open(cls, name: str, *, backend: str = "posix", spin_ns: int | None = None) -> "Mutex":
        """Open the standalone mutex `name` created by any process.

        Raises:
            SegmentNotFoundError: no such segment.
            KindMismatchError: the segment holds another kind of shmkit object.
            CorruptSegmentError: not a shmkit object, or damaged.
        """
        return cls._open(name, backend=backend, spin_ns=spin_ns, extra={})

    @classmethod
    def create_at(cls, segment: Segment, offset: int = 0, *,
                  spin_ns: int | None = None) -> "Mutex":
        """Initialise an unlocked mutex at `offset` of `segment` (overwrites SIZE bytes).

        Do this once, before other processes use it; they then call `at`.
        """
        return cls._create_at(segment, offset, spin_ns, {})

    @classmethod
    def at(cls, segment: Segment, offset: int = 0, *, spin_ns: int | None = None) -> "Mutex":
        """Use the mutex at `offset` of `segment` (zeroed memory is an unlocked mutex)."""
        return cls._at(segment, offset, spin_ns, {})

    def acquire_nowait(self) -> None:
        """Take the lock if it is free right now.

        Raises:
            WaitTimeoutError: another thread holds it.
        """
        if not self.acquire(False):
            raise WaitTimeoutError(f"cannot acquire {self._what()} without waiting: it is held "
                                   f"by pid {self.owner_pid}")


# ==== Semaphore ==============================================================================

class Semaphore(_Placed, _native.Semaphore):
    """A process-shared counting semaphore (like `threading.Semaphore`).

    ``acquire(blocking=True, timeout=None) -> bool`` takes a permit, ``release(n=1)`` returns
    permits (any thread or process may release), ``with sem:``. With ``max_value`` it is a
    bounded semaphore: a release above it raises ValueError.

    A semaphore has no owner: permits held by a process that dies are not returned. Use
    timeouts; a supervisor that knows a worker died may `release()` for it.

    SIZE = 16 bytes, ALIGNMENT = 4.
    """

    __slots__ = _SLOTS
    KIND = Kind.SEMAPHORE
    SIZE = _native.SEMAPHORE_SIZE
    ALIGNMENT = 4
    VALUE_MAX = _native.SEMAPHORE_VALUE_MAX

    @classmethod
    def _check_value(cls, value: int, max_value: int | None) -> None:
        for label, v in (("value", value), ("max_value", max_value)):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{label} must be an int, not {type(v).__name__}")
            if not 0 <= v <= cls.VALUE_MAX:
                raise ValueError(f"{label} must be within 0..{cls.VALUE_MAX}, not {v}")
        if max_value is not None and (max_value == 0 or value > max_value):
            raise ValueError(f"max_value must be >= 1 and >= value ({value}), not {max_value}")

    @classmethod
    def _header_params(cls, value: int = 1, max_value: int | None = None) -> tuple[int, ...]:
        return (value, max_value or 0)

    @classmethod
    def _init_memory(cls, buf, offset, value: int = 1, max_value: int | None = None) -> None:
        buf[offset:offset + cls.SIZE] = bytes(cls.SIZE)
        _native.store_u32(buf, offset + 8, max_value or 0)
        _native.store_u32(buf, offset, value)

    @classmethod
    def create(cls, name: str, value: int = 1, *, max_value: int | None = None,
               backend: str = "posix", mode: int = 0o600,
               spin_ns: int | None = None) -> "Semaphore":
        """Create a standalone semaphore holding `value` permits.

        Args:
            value: initial permits (0..VALUE_MAX).
            max_value: optional upper bound for release() (a bounded semaphore).

        Raises:
            SegmentExistsError: the name is taken.
        """
        cls._check_value(value, max_value)
        return cls._create(name, backend=backend, mode=mode, spin_ns=spin_ns, extra={},
                           value=value, max_value=max_value)

    @classmethod
    def open(cls, name: str, *, backend: str = "posix",
             spin_ns: int | None = None) -> "Semaphore":
        """Open the standalone semaphore `name`."""
        return cls._open(name, backend=backend, spin_ns=spin_ns, extra={})

    @classmethod
    def create_at(cls, segment: Segment, offset: int = 0, value: int = 1, *,
                  max_value: int | None = None, spin_ns: int | None = None) -> "Semaphore":
        """Initialise a semaphore with `value` permits at `offset` of `segment`."""
        cls._check_value(value, max_value)
        return cls._create_at(segment, offset, spin_ns, {}, value=value, max_value=max_value)

    @classmethod
    def at(cls, segment: Segment, offset: int = 0, *,
           spin_ns: int | None = None) -> "Semaphore":
        """Use the semaphore at `offset` of `segment` (zeroed memory: no permits)."""
        return cls._at(segment, offset, spin_ns, {})

    def acquire_nowait(self) -> None:
        """Take a permit if one is available now.

        Raises:
            WaitTimeoutError: no permit is available.
        """
        if not self.acquire(False):
            raise WaitTimeoutError(f"cannot acquire {self._what()} without waiting: no permit "
                                   f"is available")

    def _error(self, code: str) -> BaseException:
        if code == "sem_overflow":
            bound = self.max_value if self.max_value is not None else self.VALUE_MAX
            return ValueError(f"cannot release {self._what()}: its value would exceed {bound} "
                              f"(released more often than acquired)")
        return super()._error(code)


# ==== Event ==================================================================================

class Event(_Placed, _native.Event):
    """A process-shared flag that threads wait for (like `threading.Event`).

    ``set()`` wakes every waiter, ``clear()``, ``is_set()``, ``wait(timeout=None) -> bool``
    (True when set, False on timeout). A waiter woken by set() returns True even if the flag
    was cleared again before it ran, as in `threading`.

    SIZE = 8 bytes, ALIGNMENT = 4; zeroed memory is a clear event.
    """

    __slots__ = _SLOTS
    KIND = Kind.EVENT
    SIZE = _native.EVENT_SIZE
    ALIGNMENT = 4

    @classmethod
    def create(cls, name: str, *, backend: str = "posix", mode: int = 0o600,
               spin_ns: int | None = None) -> "Event":
        """Create a standalone event, clear."""
        return cls._create(name, backend=backend, mode=mode, spin_ns=spin_ns, extra={})

    @classmethod
    def open(cls, name: str, *, backend: str = "posix", spin_ns: int | None = None) -> "Event":
        """Open the standalone event `name`."""
        return cls._open(name, backend=backend, spin_ns=spin_ns, extra={})

    @classmethod
    def create_at(cls, segment: Segment, offset: int = 0, *,
                  spin_ns: int | None = None) -> "Event":
        """Initialise a clear event at `offset` of `segment`."""
        return cls._create_at(segment, offset, spin_ns, {})

    @classmethod
    def at(cls, segment: Segment, offset: int = 0, *, spin_ns: int | None = None) -> "Event":
        """Use the event at `offset` of `segment`."""
        return cls._at(segment, offset, spin_ns, {})


# ==== Condition ==============================================================================

class Condition(_Placed):
    """A process-shared condition variable (like `threading.Condition`).

    It carries its own `Mutex` (the first 24 bytes), or uses the one given as ``mutex=`` (then
    every process must pass the same one). ``with cond:`` / acquire / release lock it;
    ``wait(timeout=None)``, ``wait_for(predicate, timeout=None)``, ``notify(n=1)`` and
    ``notify_all()`` need it held.

    Waiters sleep on a counter that notify bumps; there is no per-waiter state, so a waiter
    that dies blocks nobody. Like POSIX condition variables, `wait` may return True without a
    matching notify (for instance when notify(1) coincides with a waiter's periodic re-check):
    test the condition in a loop, or use `wait_for`.

    SIZE = 32 bytes, ALIGNMENT = 4; zeroed memory is a fresh condition.
    """

    KIND = Kind.CONDITION
    SIZE = 32
    ALIGNMENT = 4
    _SEQ_OFFSET = _native.MUTEX_SIZE

    def _bind(self, segment: Segment, offset: int, spin_ns: int,
              mutex: Mutex | None = None) -> None:
        if mutex is not None and not isinstance(mutex, Mutex):
            raise TypeError(f"mutex must be a shmkit.Mutex, not {type(mutex).__name__}")
        self._seq = _native.CondSeq(segment.buf, offset + self._SEQ_OFFSET, spin_ns)
        self._own_lock = mutex is None
        self._lock = Mutex._new(segment, offset, False, spin_ns) if mutex is None else mutex
        # Bound C methods: as fast as calling the mutex itself.
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    @classmethod
    def create(cls, name: str, *, mutex: Mutex | None = None, backend: str = "posix",
               mode: int = 0o600, spin_ns: int | None = None) -> "Condition":
        """Create a standalone condition (with its own mutex unless `mutex` is given)."""
        return cls._create(name, backend=backend, mode=mode, spin_ns=spin_ns,
                           extra={"mutex": mutex})

    @classmethod
    def open(cls, name: str, *, mutex: Mutex | None = None, backend: str = "posix",
             spin_ns: int | None = None) -> "Condition":
        """Open the standalone condition `name`."""
        return cls._open(name, backend=backend, spin_ns=spin_ns, extra={"mutex": mutex})

    @classmethod
    def create_at(cls, segment: Segment, offset: int = 0, *, mutex: Mutex | None = None,
                  spin_ns: int | None = None) -> "Condition":
        """Initialise a condition at `offset` of `segment`."""
        return cls._create_at(segment, offset, spin_ns, {"mutex": mutex})

    @classmethod
    def at(cls, segment: Segment, offset: int = 0, *, mutex: Mutex | None = None,
           spin_ns: int | None = None) -> "Condition":
        """Use the condition at `offset` of `segment`."""
        return cls._at(segment, offset, spin_ns, {"mutex": mutex})

    @property
    def mutex(self) -> Mutex:
        """The lock this condition uses."""
        return self._lock

    @property
    def spin_ns(self) -> int:
        """Nanoseconds a wait spins before sleeping."""
        return self._seq.spin_ns

    @spin_ns.setter
    def spin_ns(self, value: int) -> None:
        self._seq.spin_ns = value

    @property
    def waiters(self) -> int:
        """Threads sleeping in wait (approximate: a waiter that died still counts)."""
        return self._seq.waiters

    def _attached_now(self) -> bool:
        return self._seq._attached

    def _detach_all(self) -> bool:
        if not self._seq._detach():
            return False
        return self._lock._detach() if self._own_lock else True

    def _extra_state(self) -> dict:
        return {} if self._own_lock else {"mutex": self._lock}

    def acquire_nowait(self) -> None:
        """Take the condition's lock if it is free right now.

        Raises:
            WaitTimeoutError: another thread holds it.
        """
        self._lock.acquire_nowait()

    def __enter__(self) -> "Condition":
        self._lock.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._lock.release()

    def _check_owned(self, action: str) -> None:
        if not self._lock._is_owned():
            raise RuntimeError(f"cannot {action} {self._what()}: this thread does not hold its "
                               f"lock; use `with cond:` first")

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, sleep until notified or `timeout` seconds pass, re-acquire it.

        The lock is re-acquired whatever happens (also on Ctrl-C), waiting as long as that
        takes; if its holder died it is recovered (see `Mutex.recovered`).

        Returns:
            False if the timeout passed, True otherwise (possibly spuriously).

        Raises:
            RuntimeError: the calling thread does not hold the lock.
        """
        self._check_owned("wait on")
        seq = self._seq._seq()
        self._lock.release()
        try:
            return self._seq._wait(seq, timeout)
        finally:
            self._lock.acquire()

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        """Wait until `predicate()` is true or `timeout` seconds pass; return its last value."""
        deadline = None if timeout is None else time.monotonic() + timeout
        result = predicate()
        while not result:
            if deadline is None:
                self.wait()
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.wait(left)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        """Wake up to `n` threads waiting on this condition (in any process).

        Raises:
            RuntimeError: the calling thread does not hold the lock.
        """
        self._check_owned("notify")
        self._seq._notify(min(n, _NOTIFY_ALL))

    def notify_all(self) -> None:
        """Wake every thread waiting on this condition."""
        self._check_owned("notify")
        self._seq._notify(_NOTIFY_ALL)

    notifyAll = notify_all


# ==== RWLock =================================================================================

class _Guard:
    """`with rwlock.read():` / `with rwlock.write():`."""

    __slots__ = ("_lock", "_timeout", "_write")

    def __init__(self, lock: "RWLock", timeout: float | None, write: bool) -> None:
        self._lock = lock
        self._timeout = timeout
        self._write = write

    def __enter__(self) -> "RWLock":
        lock = self._lock
        ok = (lock.acquire_write if self._write else lock.acquire_read)(True, self._timeout)
        if not ok:
            side = "write" if self._write else "read"
            raise WaitTimeoutError(f"cannot {side}-lock {lock._what()} within "
                                   f"{self._timeout} s")
        return lock

    def __exit__(self, *exc_info) -> None:
        if self._write:
            self._lock.release_write()
        else:
            self._lock.release_read()


class RWLock(_Placed, _native.RWLock):
    """A process-shared reader-writer lock: many readers or one writer, writers preferred.

    ``with rw.read(timeout=None):`` and ``with rw.write(timeout=None):`` (raise
    WaitTimeoutError on timeout), or ``acquire_read/acquire_write(blocking=True, timeout=None)
    -> bool`` with ``release_read()/release_write()``, and ``acquire_read_nowait()`` /
    ``acquire_write_nowait()`` (WaitTimeoutError instead of waiting). Read holds belong to
    the thread (each of up to `max_readers` reading threads at once uses a slot); a thread may
    read recursively (also while a writer waits: that writer is waiting for it), but may not
    write while it reads, nor read while it writes (RuntimeError).

    Dead participants: a writer that dies is recovered like a `Mutex`; then ``recovered`` is
    True, for readers too, until a writer calls `mark_consistent()` or releases the write lock.
    A reader thread that dies holding a read lock is dropped by the next writer within
    milliseconds.

    SIZE = 40 + 16 * max_readers bytes (`size_for`), ALIGNMENT = 4.
    """

    __slots__ = _SLOTS + ("_size_limit",)
    KIND = Kind.RWLOCK
    SIZE = _native.RWLOCK_HEADER_SIZE + _native.RWLOCK_SLOT_SIZE  # the smallest (one slot)
    _SLOTS_OFFSET = _native.MUTEX_SIZE
    ALIGNMENT = 4
    DEFAULT_MAX_READERS = 64

    @staticmethod
    def size_for(max_readers: int = DEFAULT_MAX_READERS) -> int:
        """Bytes an RWLock with `max_readers` slots takes."""
        return _native.RWLOCK_HEADER_SIZE + _native.RWLOCK_SLOT_SIZE * max_readers

    @classmethod
    def _check_readers(cls, max_readers: int) -> None:
        if isinstance(max_readers, bool) or not isinstance(max_readers, int):
            raise TypeError(f"max_readers must be an int, not {type(max_readers).__name__}")
        if not 1 <= max_readers <= _native.RWLOCK_MAX_SLOTS:
            raise ValueError(f"max_readers must be within 1..{_native.RWLOCK_MAX_SLOTS}, "
                             f"not {max_readers}")

    @classmethod
    def _payload_size(cls, max_readers: int = DEFAULT_MAX_READERS) -> int:
        return cls.size_for(max_readers)

    @classmethod
    def _header_params(cls, max_readers: int = DEFAULT_MAX_READERS) -> tuple[int, ...]:
        return (max_readers,)

    @classmethod
    def _init_memory(cls, buf, offset, max_readers: int = DEFAULT_MAX_READERS) -> None:
        buf[offset:offset + cls.size_for(max_readers)] = bytes(cls.size_for(max_readers))
        _native.store_u32(buf, offset + cls._SLOTS_OFFSET, max_readers)

    def _bind(self, segment: Segment, offset: int, spin_ns: int,
              size_limit: int | None = None) -> None:
        # The slot count is read once, here, and the C core keeps it: memory written later
        # cannot make it reach further. `size_limit` (bytes) bounds it for a lock living in
        # an area of fixed size (SharedArray's), so a damaged count cannot reach its neighbours.
        slots = _native.load_u32(segment.buf, offset + self._SLOTS_OFFSET)
        if not 1 <= slots <= _native.RWLOCK_MAX_SLOTS or \
                offset + self.size_for(slots) > segment.size or \
                (size_limit is not None and self.size_for(slots) > size_limit):
            raise CorruptSegmentError(
                f"the RWLock at offset {offset} of segment "
                f"{describe(segment.name, segment.backend)} claims {slots} reader slots, which "
                f"do not fit; it is damaged or was never created there (use create_at)")
        _native.RWLock.__init__(self, segment.buf, offset, slots, spin_ns)
        self._size_limit = size_limit

    @classmethod
    def _check_header(cls, seg: Segment, header: layout.Header) -> None:
        slots = header.params[0]
        if not 1 <= slots <= _native.RWLOCK_MAX_SLOTS or \
                header.payload_size < cls.size_for(slots) or \
                _native.load_u32(seg.buf, PAYLOAD_OFFSET + cls._SLOTS_OFFSET) != slots:
            raise CorruptSegmentError(
                f"segment {describe(seg.name, seg.backend)} holds a damaged RWLock (reader "
                f"slots do not match its size); remove it with `shmkit rm {seg.name}`")

    @classmethod
    def create(cls, name: str, *, max_readers: int = DEFAULT_MAX_READERS,
               backend: str = "posix", mode: int = 0o600,
               spin_ns: int | None = None) -> "RWLock":
        """Create a standalone reader-writer lock.

        Args:
            max_readers: how many threads (over all processes) may hold read locks at once.
        """
        cls._check_readers(max_readers)
        return cls._create(name, backend=backend, mode=mode, spin_ns=spin_ns, extra={},
                           max_readers=max_readers)

    @classmethod
    def open(cls, name: str, *, backend: str = "posix", spin_ns: int | None = None) -> "RWLock":
        """Open the standalone reader-writer lock `name`."""
        return cls._open(name, backend=backend, spin_ns=spin_ns, extra={})

    @classmethod
    def create_at(cls, segment: Segment, offset: int = 0, *,
                  max_readers: int = DEFAULT_MAX_READERS,
                  spin_ns: int | None = None) -> "RWLock":
        """Initialise a reader-writer lock at `offset` of `segment` (`size_for(max_readers)`
        bytes)."""
        cls._check_readers(max_readers)
        return cls._create_at(segment, offset, spin_ns, {}, max_readers=max_readers)

    @classmethod
    def at(cls, segment: Segment, offset: int = 0, *, spin_ns: int | None = None,
           size_limit: int | None = None) -> "RWLock":
        """Use the reader-writer lock initialised at `offset` of `segment` by `create_at`.

        Args:
            size_limit: the most bytes the lock may take (the area reserved for it); its
                reader-slot count, read from the segment, must fit.

        Raises:
            CorruptSegmentError: the slot count read from the segment does not fit.
        """
        return cls._at(segment, offset, spin_ns, {"size_limit": size_limit})

    def _extra_state(self) -> dict:
        return {} if self._size_limit is None else {"size_limit": self._size_limit}

    def acquire_read_nowait(self) -> None:
        """Take a read lock if that needs no waiting.

        Raises:
            WaitTimeoutError: a writer holds or waits for the lock.
            ResourceLimitError: every reader slot is in use.
        """
        if not self.acquire_read(False):
            raise WaitTimeoutError(f"cannot read-lock {self._what()} without waiting: a writer "
                                   f"holds it or waits for it (pid {self.writer_pid})")

    def acquire_write_nowait(self) -> None:
        """Take the write lock if that needs no waiting.

        Raises:
            WaitTimeoutError: a writer holds it or readers hold read locks.
        """
        if not self.acquire_write(False):
            raise WaitTimeoutError(f"cannot write-lock {self._what()} without waiting: "
                                   f"{self.readers} read holds, writer pid "
                                   f"{self.writer_pid or 'none'}")

    def read(self, timeout: float | None = None) -> _Guard:
        """``with rw.read(timeout):`` holds a read lock for the block.

        Raises (on entering):
            WaitTimeoutError: not acquired within `timeout` seconds.
        """
        return _Guard(self, timeout, False)

    def write(self, timeout: float | None = None) -> _Guard:
        """``with rw.write(timeout):`` holds the write lock for the block.

        Raises (on entering):
            WaitTimeoutError: not acquired within `timeout` seconds.
        """
        return _Guard(self, timeout, True)

    def _error(self, code: str) -> BaseException:
        what = self._what()
        if code == "deadlock":
            return RuntimeError(f"cannot lock {what}: this thread holds its write lock; "
                                f"waiting would deadlock")
        if code == "read_then_write":
            return RuntimeError(f"cannot write-lock {what}: this thread holds a read lock "
                                f"(upgrading would deadlock); release it first")
        if code == "readers_full":
            return ResourceLimitError(f"cannot read-lock {what}: all {self.max_readers} reader "
                                      f"slots are in use by live threads; create it with a "
                                      f"larger max_readers")
        if code == "read_not_owned":
            return LockNotOwnedError(f"cannot release a read lock of {what}: this thread "
                                     f"holds none")
        if code == "write_not_owned":
            return LockNotOwnedError(f"cannot release the write lock of {what}: this thread "
                                     f"does not hold it")
        return super()._error(code)


# ==== Barrier ================================================================================

class Barrier(_Placed, _native.Barrier):
    """A process-shared barrier for a fixed number of parties (like `threading.Barrier`).

    ``wait(timeout=None) -> int`` blocks until `parties` threads (in any processes) have
    called it, then returns a distinct index in range(parties) to each. The barrier then
    starts over. A wait that times out breaks the barrier: every waiting party, and every
    later one, gets BrokenBarrierError until `reset()`. `abort()` breaks it on purpose.

    A party that dies before arriving can only be noticed by the others' timeouts: give a
    default `timeout` when creating it (stored in shared memory, so every opener gets it).
    If the last party dies after arriving (in `action`, say), the others notice within
    milliseconds and the barrier breaks, as after a timeout.
    `action`, if given to this process's object, runs in the last arriving thread before the
    others are released; if it raises, the barrier breaks.

    SIZE = 32 bytes, ALIGNMENT = 8.
    """

    __slots__ = _SLOTS + ("_action",)
    KIND = Kind.BARRIER
    SIZE = _native.BARRIER_SIZE
    ALIGNMENT = 8
    MAX_PARTIES = _native.BARRIER_MAX_PARTIES

    @classmethod
    def _check_args(cls, parties: int, timeout: float | None) -> None:
        if isinstance(parties, bool) or not isinstance(parties, int):
            raise TypeError(f"parties must be an int, not {type(parties).__name__}")
        if not 1 <= parties <= cls.MAX_PARTIES:
            raise ValueError(f"parties must be within 1..{cls.MAX_PARTIES}, not {parties}")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be None or a number of seconds >= 0, not {timeout}")

    @classmethod
    def _header_params(cls, parties: int = 1, timeout: float | None = None) -> tuple[int, ...]:
        return (parties,)

    @classmethod
    def _init_memory(cls, buf, offset, parties: int = 1, timeout: float | None = None) -> None:
        buf[offset:offset + cls.SIZE] = bytes(cls.SIZE)
        _native.store_u64(buf, offset + 16, _NO_TIMEOUT if timeout is None
                          else min(int(timeout * 1e9), _NO_TIMEOUT - 1))
        _native.store_u32(buf, offset, parties)

    def _bind(self, segment: Segment, offset: int, spin_ns: int,
              action: Callable[[], Any] | None = None) -> None:
        if action is not None and not callable(action):
            raise TypeError(f"action must be callable, not {type(action).__name__}")
        _native.Barrier.__init__(self, segment.buf, offset, spin_ns)
        self._action = action

    @classmethod
    def create(cls, name: str, parties: int, *, timeout: float | None = None,
               action: Callable[[], Any] | None = None, backend: str = "posix",
               mode: int = 0o600, spin_ns: int | None = None) -> "Barrier":
        """Create a standalone barrier for `parties` parties.

        Args:
            parties: how many must call wait() (1..MAX_PARTIES).
            timeout: default timeout of wait() in seconds, shared with every opener.
            action: called by the last arriving thread of this process's object.
        """
        cls._check_args(parties, timeout)
        return cls._create(name, backend=backend, mode=mode, spin_ns=spin_ns,
                           extra={"action": action}, parties=parties, timeout=timeout)

    @classmethod
    def open(cls, name: str, *, action: Callable[[], Any] | None = None,
             backend: str = "posix", spin_ns: int | None = None) -> "Barrier":
        """Open the standalone barrier `name`."""
        return cls._open(name, backend=backend, spin_ns=spin_ns, extra={"action": action})

    @classmethod
    def create_at(cls, segment: Segment, offset: int, parties: int, *,
                  timeout: float | None = None, action: Callable[[], Any] | None = None,
                  spin_ns: int | None = None) -> "Barrier":
        """Initialise a barrier for `parties` parties at `offset` of `segment`."""
        cls._check_args(parties, timeout)
        return cls._create_at(segment, offset, spin_ns, {"action": action}, parties=parties,
                              timeout=timeout)

    @classmethod
    def at(cls, segment: Segment, offset: int = 0, *, action: Callable[[], Any] | None = None,
           spin_ns: int | None = None) -> "Barrier":
        """Use the barrier initialised at `offset` of `segment` by `create_at`."""
        return cls._at(segment, offset, spin_ns, {"action": action})

    def _extra_state(self) -> dict:
        return {}  # the action is this process's own; it is not pickled

    @property
    def timeout(self) -> float | None:
        """The default timeout of wait() in seconds (None: wait forever)."""
        ns = self._timeout_ns
        return None if ns == _NO_TIMEOUT else ns / 1e9

    def wait(self, timeout: float | None = None) -> int:
        """Wait until all parties have arrived; return this party's index in range(parties).

        Args:
            timeout: seconds; None uses the barrier's default timeout.

        Raises:
            BrokenBarrierError: the barrier is or became broken (also when this call timed
                out: it breaks the barrier for everyone).
        """
        if timeout is None:
            timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            index, ticket, last = self._arrive()
            if index >= 0:
                break
            # More threads than parties: the round is completing; join the next one.
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            verdict = self._await(ticket, left)
            if verdict != 0:
                raise self._broken_error(verdict, timeout)
        if last:
            if self._action is not None:
                try:
                    self._action()
                except BaseException:
                    self.abort()
                    raise
            if not self._complete(ticket):
                raise self._error("broken")
            return index
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        verdict = self._await(ticket, left)
        if verdict == 0:
            return index
        raise self._broken_error(verdict, timeout)

    def _broken_error(self, verdict: int, timeout: float | None) -> BrokenBarrierError:
        if verdict == 2:
            return BrokenBarrierError(f"{self._what()} timed out after {timeout} s with "
                                      f"{self.parties} parties expected; it is now broken for "
                                      f"every party (a party may have died before arriving); "
                                      f"call reset() to use it again")
        return self._error("broken")

    def _error(self, code: str) -> BaseException:
        if code == "broken":
            return BrokenBarrierError(f"{self._what()} is broken (a party timed out, the last "
                                      f"party died before releasing the others, abort() was "
                                      f"called, or the action raised); call reset() to use it "
                                      f"again")
        return super()._error(code)


# ==== Atomics ================================================================================

class AtomicInt(_Placed, _native.AtomicInt):
    """A process-shared signed 64-bit integer with atomic operations.

    ``load()``, ``store(v)``, ``add(delta=1) -> previous value``, ``exchange(v) -> previous``,
    ``compare_exchange(expected, desired) -> (swapped, value seen)``, and the ``value``
    property. Arithmetic wraps around at 64 bits. Loads acquire, stores release, the others
    are sequentially consistent.

    SIZE = 8 bytes, ALIGNMENT = 8.
    """

    __slots__ = _SLOTS
    KIND = Kind.ATOMIC_INT
    SIZE = 8
    ALIGNMENT = 8

    @classmethod
    def _init_memory(cls, buf, offset, value: int = 0) -> None:
        _native.store_i64(buf, offset, value)

    @staticmethod
    def _check(value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"value must be an int, not {type(value).__name__}")
        if not -2**63 <= value < 2**63:
            raise ValueError(f"value must fit in a signed 64-bit int, not {value}")

    @classmethod
    def create(cls, name: str, value: int = 0, *, backend: str = "posix", mode: int = 0o600,
               spin_ns: int | None = None) -> "AtomicInt":
        """Create a standalone atomic integer holding `value`."""
        cls._check(value)
        return cls._create(name, backend=backend, mode=mode, spin_ns=spin_ns, extra={},
                           value=value)

    @classmethod
    def open(cls, name: str, *, backend: str = "posix",
             spin_ns: int | None = None) -> "AtomicInt":
        """Open the standalone atomic integer `name`."""
        return cls._open(name, backend=backend, spin_ns=spin_ns, extra={})

    @classmethod
    def create_at(cls, segment: Segment, offset: int = 0, value: int = 0, *,
                  spin_ns: int | None = None) -> "AtomicInt":
        """Store `value` as an atomic integer at `offset` of `segment`."""
        cls._check(value)
        return cls._create_at(segment, offset, spin_ns, {}, value=value)

    @classmethod
    def at(cls, segment: Segment, offset: int = 0, *,
           spin_ns: int | None = None) -> "AtomicInt":
        """Use the 8 bytes at `offset` of `segment` as an atomic integer."""
        return cls._at(segment, offset, spin_ns, {})


class AtomicU32(_Placed, _native.AtomicU32):
    """A process-shared unsigned 32-bit word that threads can sleep on: a futex made safe.

    The atomics of `AtomicInt` (modulo 2**32), plus ``wait(expected, timeout=None) -> bool``
    (sleeps while the value equals `expected`; True when it differs or a notify arrived, False
    on timeout) and ``notify(n=1) -> int`` (wakes up to n waiters; change the value first, or
    waiters that are about to sleep miss it).

    SIZE = 8 bytes (the word, then a waiter count), ALIGNMENT = 4.
    """

    __slots__ = _SLOTS
    KIND = Kind.ATOMIC_U32
    SIZE = 8
    ALIGNMENT = 4

    @classmethod
    def _init_memory(cls, buf, offset, value: int = 0) -> None:
        buf[offset:offset + cls.SIZE] = bytes(cls.SIZE)
        _native.store_u32(buf, offset, value)

    @staticmethod
    def _check(value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"value must be an int, not {type(value).__name__}")
        if not 0 <= value < 2**32:
            raise ValueError(f"value must fit in an unsigned 32-bit int, not {value}")

    @classmethod
    def create(cls, name: str, value: int = 0, *, backend: str = "posix", mode: int = 0o600,
               spin_ns: int | None = None) -> "AtomicU32":
        """Create a standalone 32-bit word holding `value`."""
        cls._check(value)
        return cls._create(name, backend=backend, mode=mode, spin_ns=spin_ns, extra={},
                           value=value)

    @classmethod
    def open(cls, name: str, *, backend: str = "posix",
             spin_ns: int | None = None) -> "AtomicU32":
        """Open the standalone 32-bit word `name`."""
        return cls._open(name, backend=backend, spin_ns=spin_ns, extra={})

    @classmethod
    def create_at(cls, segment: Segment, offset: int = 0, value: int = 0, *,
                  spin_ns: int | None = None) -> "AtomicU32":
        """Initialise a 32-bit word holding `value` at `offset` of `segment`."""
        cls._check(value)
        return cls._create_at(segment, offset, spin_ns, {}, value=value)

    @classmethod
    def at(cls, segment: Segment, offset: int = 0, *,
           spin_ns: int | None = None) -> "AtomicU32":
        """Use the 8 bytes at `offset` of `segment` as a 32-bit word with a waiter count."""
        return cls._at(segment, offset, spin_ns, {})


# ==== inspection (for `shmkit inspect`) ======================================================

def _u32(buf, off: int) -> int:
    return _native.load_u32(buf, off)


def _mutex_state(buf, off: int) -> dict:
    word = _u32(buf, off)
    tid = word & 0x7FFFFFFF
    return {
        "locked": tid != 0,
        "owner_tid": tid,
        "owner_pid": _u32(buf, off + 8) if tid else 0,
        "owner_alive": bool(tid) and _native.task_alive_since(tid, _u32(buf, off + 16)),
        "recovered": _u32(buf, off + 4) != 0,
        "waiters": _u32(buf, off + 12),
    }


def _semaphore_state(buf, off: int) -> dict:
    max_value = _u32(buf, off + 8)
    return {"value": _u32(buf, off), "max_value": max_value or None,
            "waiters": _u32(buf, off + 4)}


def _event_state(buf, off: int) -> dict:
    return {"set": _u32(buf, off) != 0, "waiters": _u32(buf, off + 4)}


def _condition_state(buf, off: int) -> dict:
    seq = off + Condition._SEQ_OFFSET
    return {"mutex": _mutex_state(buf, off), "seq": _u32(buf, seq),
            "waiters": _u32(buf, seq + 4)}


def _rwlock_state(buf, off: int) -> dict:
    header, slot_size = _native.RWLOCK_HEADER_SIZE, _native.RWLOCK_SLOT_SIZE
    slots = _u32(buf, off + RWLock._SLOTS_OFFSET)
    available = (len(buf) - off - header) // slot_size
    slots = max(0, min(slots, available, _native.RWLOCK_MAX_SLOTS))
    readers = []
    for i in range(slots):
        base = off + header + slot_size * i
        count = _u32(buf, base + 4)
        if count:
            tid = _u32(buf, base)
            readers.append({"tid": tid, "count": count,
                            "alive": _native.task_alive_since(tid, _u32(buf, base + 8))})
    return {"writer": _mutex_state(buf, off), "readers": sum(r["count"] for r in readers),
            "reader_threads": readers, "max_readers": slots,
            "writer_waiting": _u32(buf, off + RWLock._SLOTS_OFFSET + 8) != 0}


def _barrier_state(buf, off: int) -> dict:
    state = _u32(buf, off + 4)
    timeout_ns = _native.load_u64(buf, off + 16)
    return {"parties": _u32(buf, off), "n_waiting": state & 0xFFFF,
            "generation": (state >> 16) & 0x3FFF, "broken": bool(state >> 31),
            "waiters": _u32(buf, off + 8), "completer_tid": _u32(buf, off + 12),
            "timeout": None if timeout_ns == _NO_TIMEOUT else timeout_ns / 1e9}


def _atomic_int_state(buf, off: int) -> dict:
    return {"value": _native.load_i64(buf, off)}


def _atomic_u32_state(buf, off: int) -> dict:
    return {"value": _u32(buf, off), "waiters": _u32(buf, off + 4)}


_STATE = {
    Kind.MUTEX: _mutex_state, Kind.SEMAPHORE: _semaphore_state, Kind.EVENT: _event_state,
    Kind.CONDITION: _condition_state, Kind.RWLOCK: _rwlock_state, Kind.BARRIER: _barrier_state,
    Kind.ATOMIC_INT: _atomic_int_state, Kind.ATOMIC_U32: _atomic_u32_state,
}

_MIN_PAYLOAD = {
    Kind.MUTEX: Mutex.SIZE, Kind.SEMAPHORE: Semaphore.SIZE, Kind.EVENT: Event.SIZE,
    Kind.CONDITION: Condition.SIZE, Kind.RWLOCK: RWLock.SIZE, Kind.BARRIER: Barrier.SIZE,
    Kind.ATOMIC_INT: AtomicInt.SIZE, Kind.ATOMIC_U32: AtomicU32.SIZE,
}

SYNC_KINDS = frozenset(_STATE)


def describe_state(seg: Segment, header: layout.Header) -> dict:
    """The live state of a standalone synchronisation object, for `shmkit inspect`.

    Reads the shared words without taking any lock (a snapshot that may be stale at once).
    Keys by kind: Mutex: locked, owner_tid, owner_pid, owner_alive, recovered, waiters;
    Semaphore: value, max_value, waiters; Event: set, waiters; Condition: mutex (as Mutex),
    seq, waiters; RWLock: writer (as Mutex), readers, reader_threads [{tid, count, alive}],
    max_readers, writer_waiting; Barrier: parties, n_waiting, generation, broken, waiters,
    completer_tid, timeout; AtomicInt: value; AtomicU32: value, waiters.

    Args:
        seg: the open segment.
        header: its header, from `layout.open_typed` or `layout.read`.

    Raises:
        ValueError: the header's kind is not a synchronisation primitive.
        CorruptSegmentError: the payload is too small for its kind.
    """
    reader = _STATE.get(header.kind)
    if reader is None:
        raise ValueError(f"segment {describe(seg.name, seg.backend)} is a {header.kind.label}, "
                         f"not a synchronisation primitive")
    if header.payload_size < _MIN_PAYLOAD[header.kind]:
        raise CorruptSegmentError(f"segment {describe(seg.name, seg.backend)} is too small for "
                                  f"a {header.kind.label}")
    return reader(seg.buf, PAYLOAD_OFFSET)
