"""SharedDict: a crash-safe key-value store in one named shared segment (data layer).

Keys are `str` or `bytes` (distinct: 'a' and b'a' are two keys); values are `bytes`, stored
as they are, or any other picklable object, stored as a protocol-5 pickle (each entry records
which). Every read and write touches only its own entry: nothing is re-pickled as a whole.

The hot path is C (`_native.DictTable`, src/shmkit/_native/table.c, whose header comment
explains the algorithm); this module owns the API, pickling, geometry and errors.

On-segment layout (offsets absolute; 16-byte heap units):

==============  =================  ==========================================================
offset          size               content
==============  =================  ==========================================================
0               128                typed header, kind DICT; params below
128             64                 writer Mutex (sync.h; lock word = owner TID | WAITERS)
192             8                  index generation (low bit = active index area)
256             48                 write stamp, keys, tombstones, used units, free bitmap (2)
304             8                  repairs: bookkeeping rebuilds after interrupted writes
312             4                  dirty: a writer is (or was, if it died) mid-update
320             384                free-list heads, 96 size classes (u32 heap units)
704             8                  recoveries: locks taken over from dead writers
768             16 * nslots        index area 0: {u64 ref, u32 hint, u32 0} per slot
768+16*nslots   16 * nslots        index area 1
768+32*nslots   capacity_bytes     heap: blocks {u32 units, u32 flags, u32 klen, u32 kinds,
                                   u64 vlen, u64 hash, key, value}, 16-byte aligned
==============  =================  ==========================================================

Header params: [0] dict format (1), [1] nslots, [2] max_keys, [3] index area 0 offset,
[4] index area 1 offset, [5] heap offset, [6] heap bytes (capacity_bytes rounded up to 16).

Crash guarantee: a writer killed at any instruction leaves every key with its old or its new
value; the next writer rebuilds the heap bookkeeping from the index and reclaims the space of
the interrupted write. Readers never take a lock and never see a torn value.
"""

from __future__ import annotations

import errno
import pickle
import struct
from collections.abc import ItemsView, MutableMapping, ValuesView

from . import _native, layout, segment as _segment
from .errors import (
    CorruptSegmentError,
    SegmentBusyError,
    SegmentPermissionError,
    SharedDictFullError,
    WaitTimeoutError,
    describe,
    format_size,
)
from .layout import Kind
from .segment import Segment

DICT_FORMAT = 1
CONTROL_END = _native.DICT_CONTROL_END       # 768
SLOT_SIZE = _native.DICT_SLOT_SIZE           # 16
UNIT = _native.DICT_UNIT                     # 16
BLOCK_HEADER = _native.DICT_BLOCK_HEADER     # 32
MAX_SEGMENT = UNIT << 32                     # 64 GiB: heap positions are u32 units
DEFAULT_TIMEOUT = 30.0
BYTES_PER_KEY_DEFAULT = 256                  # max_keys default: capacity_bytes // 256

_OK = _native.DICT_OK
_NOT_FOUND = _native.DICT_NOT_FOUND
_FULL_HEAP = _native.DICT_FULL_HEAP
_FULL_KEYS = _native.DICT_FULL_KEYS
_CORRUPT = _native.DICT_CORRUPT
_TIMEOUT = _native.DICT_TIMEOUT
_READONLY = _native.DICT_READONLY
_TOO_LARGE = _native.DICT_TOO_LARGE
_BUSY = _native.DICT_BUSY
_BAD_KEY = _native.DICT_BAD_KEY
_CLOSED = _native.DICT_CLOSED
_REENTERED = _native.DICT_REENTERED

_RAW = 0      # value stored as the bytes themselves
_PICKLED = 1  # value stored as a protocol-5 pickle
_dumps = pickle.dumps
_loads = pickle.loads
# What unpickling damaged bytes raises. ImportError and AttributeError are left alone: they
# usually mean a class that exists in the writer but not in this process.
_GARBAGE_PICKLE = (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
                   KeyError, OverflowError, UnicodeDecodeError, struct.error, RecursionError)


def _geometry(capacity_bytes: int, max_keys: int) -> tuple[int, int, int]:
    """(nslots, heap_offset, heap_size) for a new dict."""
    nslots = 8
    while nslots - nslots // 4 < max_keys:  # load factor of live keys stays <= 3/4
        nslots *= 2
    heap_size = -(-capacity_bytes // UNIT) * UNIT
    return nslots, CONTROL_END + 2 * SLOT_SIZE * nslots, heap_size


def _check_int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{what} must be at least {minimum}, not {value}")
    return value


def _check_timeout(timeout) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ValueError(f"timeout must be None or a number of seconds >= 0, not {timeout!r}")
    return float(timeout)


def _table_for(seg: Segment, header: layout.Header, timeout: float | None):
    """Check the DICT params of `seg` (untrusted) and attach a DictTable to it."""
    fmt, nslots, max_keys, idx0, idx1, heap_off, heap_size = header.params[:7]
    where = describe(seg.name, seg.backend)
    if fmt != DICT_FORMAT:
        raise CorruptSegmentError(f"SharedDict {where} has an unknown format {fmt}; it was made "
                                  f"by another shmkit version, or is damaged")
    expected_heap = CONTROL_END + 2 * SLOT_SIZE * nslots if nslots < 1 << 40 else -1
    if (idx0 != CONTROL_END or idx1 != CONTROL_END + SLOT_SIZE * nslots
            or heap_off != expected_heap or heap_off + heap_size > seg.size):
        raise CorruptSegmentError(f"SharedDict {where} is damaged: its index and heap positions "
                                  f"do not fit its {seg.size} bytes; remove it with "
                                  f"`shmkit rm {seg.name}`")
    try:
        return _native.DictTable(seg.buf, nslots, heap_off, heap_size, max_keys, timeout)
    except (ValueError, OverflowError) as exc:
        raise CorruptSegmentError(f"SharedDict {where} is damaged: {exc}; remove it with "
                                  f"`shmkit rm {seg.name}`") from None


class SharedDict(MutableMapping):
    """A dict-like key-value store in a named shared segment, used by many processes at once.

    Create it with `SharedDict.create(name, capacity_bytes=...)`, open it anywhere with
    `SharedDict.open(name)`. Keys are str or bytes; values are bytes (stored as they are) or
    any picklable object (stored as a pickle and unpickled on every read: a fresh copy).

    Concurrency: reads take no lock and never block each other or writers; writes are
    serialized by a robust mutex in the segment and each is atomic for its key. A writer
    killed at any point leaves every key with its old or its new value.

    Snapshot semantics: `len()` is exact when no write is in progress. Iterating (keys(),
    items(), values(), ``for k in d``) reads the table once when the iteration starts; every
    key present during that whole read is included once, each pair consistent; writes made
    meanwhile may or may not be seen. `snapshot()` returns a point-in-time copy (it briefly
    holds the writer lock). `update()` is one atomic write per key, not one for all.

    Unpickling runs code chosen by whoever wrote the value: share a dict holding pickled
    values only with processes you trust (the default mode 0o600 allows only your user), or
    store bytes.
    """

    __slots__ = ("_seg", "_t", "_timeout", "_get", "_set", "__weakref__")

    def __init__(self, seg: Segment, table, timeout: float | None) -> None:
        """Internal: use `create` or `open`."""
        self._seg = seg
        self._t = table
        self._timeout = timeout
        self._get = table.get
        self._set = table.set

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, *, capacity_bytes: int, max_keys: int | None = None,
               mode: int = 0o600, backend: str = "posix",
               timeout: float | None = DEFAULT_TIMEOUT) -> "SharedDict":
        """Create a new, empty shared dict.

        Args:
            name: segment name (see `Segment.create`).
            capacity_bytes: heap bytes for entries. Each entry takes 32 bytes plus its key and
                value (UTF-8 / pickled), rounded up to 16. The segment is larger: 768 bytes
                of control block and 32 bytes per index slot (`stats()` shows all sizes).
            max_keys: the most keys it may hold (default: capacity_bytes // 256, at least
                16). The index gets between 4/3 and 8/3 slots per key.
            mode: permission bits, default owner-only 0o600.
            backend: "posix" or "sysv".
            timeout: seconds to wait for the writer lock before WaitTimeoutError (None:
                forever). Writers hold it for microseconds; waiting long means a stopped
                process or a damaged lock word.

        Raises:
            SegmentExistsError: the name is taken.
            ResourceLimitError: not enough shared memory.
            TypeError, ValueError: bad arguments, before any syscall.
        """
        _segment.validate_name(name)
        _segment.validate_mode(mode)
        _segment.validate_backend(backend)
        _check_int(capacity_bytes, "capacity_bytes", UNIT * 2)
        if max_keys is None:
            max_keys = max(16, capacity_bytes // BYTES_PER_KEY_DEFAULT)
        _check_int(max_keys, "max_keys", 1)
        timeout = _check_timeout(timeout)
        nslots, heap_off, heap_size = _geometry(capacity_bytes, max_keys)
        if heap_off + heap_size > MAX_SEGMENT or nslots > 1 << 31:
            raise ValueError(f"a SharedDict is limited to {format_size(MAX_SEGMENT)}; "
                             f"capacity_bytes={capacity_bytes} with max_keys={max_keys} needs "
                             f"{format_size(heap_off + heap_size)}")
        params = (DICT_FORMAT, nslots, max_keys, CONTROL_END, CONTROL_END + SLOT_SIZE * nslots,
                  heap_off, heap_size)

        def init(seg: Segment) -> None:
            table = _native.DictTable(seg.buf, nslots, heap_off, heap_size, max_keys, None)
            table.format()
            table.release()

        seg, header = layout.create_typed(name, Kind.DICT, heap_off + heap_size - layout.HEADER_SIZE,
                                          params, init=init, backend=backend, mode=mode)
        return cls(seg, _table_for(seg, header, timeout), timeout)

    @classmethod
    def open(cls, name: str, *, readonly: bool = False, backend: str = "posix",
             timeout: float | None = DEFAULT_TIMEOUT) -> "SharedDict":
        """Open an existing shared dict by name.

        Args:
            readonly: map it read-only: reads work (they take no lock), writes raise
                SegmentPermissionError.
            timeout: see `create`.

        Raises:
            SegmentNotFoundError: no such segment.
            KindMismatchError: it is another kind of shmkit object.
            CorruptSegmentError: its header or geometry is damaged.
        """
        timeout = _check_timeout(timeout)
        seg, header = layout.open_typed(name, Kind.DICT, backend=backend, readonly=readonly)
        try:
            return cls(seg, _table_for(seg, header, timeout), timeout)
        except BaseException:
            seg.close()
            raise

    def __reduce__(self):
        return (_reopen, (self._seg.name, self._seg.backend, self._seg.readonly, self._timeout))

    # -- the mapping ----------------------------------------------------------------------------

    def __getitem__(self, key):
        r = self._get(key)
        if r.__class__ is bytes:
            return r
        if r.__class__ is tuple:
            return self._unpickle(r[0], key)
        raise self._error(r, key)

    def __setitem__(self, key, value) -> None:
        if value.__class__ is bytes:
            r = self._set(key, value, _RAW)
        else:
            r = self._set(key, _dumps(value, 5), _PICKLED)
        if r:
            raise self._error(r, key, value)

    def __delitem__(self, key) -> None:
        r = self._t.delete(key)
        if r:
            raise self._error(r, key)

    def __contains__(self, key) -> bool:
        if not isinstance(key, (str, bytes)):
            return False
        r = self._t.contains(key)
        if r == _OK:
            return True
        if r == _NOT_FOUND:
            return False
        raise self._error(r, key)

    def __iter__(self):
        return iter(self._scan(False, False))

    def __len__(self) -> int:
        return self._t.count()

    def get(self, key, default=None):
        """The value of `key`, or `default` when it is missing (one lock-free read)."""
        r = self._get(key)
        if r.__class__ is bytes:
            return r
        if r.__class__ is tuple:
            return self._unpickle(r[0], key)
        if r == _NOT_FOUND:
            return default
        raise self._error(r, key)

    _MISSING = object()

    def pop(self, key, default=_MISSING):
        """Remove `key` and return its value (atomically), or `default` if it is missing.

        Raises:
            KeyError: missing and no default given.
        """
        r = self._t.pop(key)
        if r.__class__ is bytes:
            return r
        if r.__class__ is tuple:
            return self._unpickle(r[0], key)
        if r == _NOT_FOUND and default is not SharedDict._MISSING:
            return default
        raise self._error(r, key)

    def setdefault(self, key, default=None):
        """Return the value of `key`; if missing, insert `default` and return it (atomically).

        The returned default is the caller's object, not a copy read back.
        """
        if default.__class__ is bytes:
            r = self._t.setdefault(key, default, _RAW)
        else:
            r = self._t.setdefault(key, _dumps(default, 5), _PICKLED)
        if r is None:
            return default
        if r.__class__ is bytes:
            return r
        if r.__class__ is tuple:
            return self._unpickle(r[0], key)
        raise self._error(r, key, default)

    def popitem(self):
        """Remove and return some (key, value) pair.

        Raises:
            KeyError: the dict is empty.
        """
        for key in self._scan(False, False):
            r = self._t.pop(key)
            if r.__class__ is bytes:
                return key, r
            if r.__class__ is tuple:
                return key, self._unpickle(r[0], key)
            if r != _NOT_FOUND:  # someone else removed it meanwhile: try the next key
                raise self._error(r, key)
        raise KeyError(f"popitem(): SharedDict {self._where()} is empty")

    def clear(self) -> None:
        """Remove every entry (one atomic step for other processes)."""
        r = self._t.clear()
        if r:
            raise self._error(r, None)

    def items(self):
        """A view whose iteration reads every (key, value) pair lock-free, once."""
        return _Items(self)

    def values(self):
        """A view whose iteration reads every value lock-free, once."""
        return _Values(self)

    def snapshot(self) -> dict:
        """A plain dict copy of every entry at one point in time.

        Holds the writer lock while copying (writers wait; readers do not).
        """
        return {k: self._decode(v, k) for k, v in self._scan(True, True)}

    # -- shared-memory specific API ------------------------------------------------------------

    @property
    def name(self) -> str:
        """The segment name other processes open."""
        return self._seg.name

    @property
    def backend(self) -> str:
        """'posix' or 'sysv'."""
        return self._seg.backend

    @property
    def segment(self) -> Segment:
        """The `Segment` holding the table."""
        return self._seg

    @property
    def readonly(self) -> bool:
        """Whether this process attached it read-only."""
        return self._seg.readonly

    def stats(self) -> dict:
        """Counters and sizes: keys, max_keys, used_bytes, capacity_bytes, index_slots, ...

        Values are read without locking: exact when no write is in progress.
        """
        raw = self._t.stats()
        if raw.__class__ is int:
            raise self._error(raw, None)
        return _present_stats(raw, self._seg)

    def check(self) -> None:
        """Verify every structure of the table (index, heap, free lists, counters).

        Takes the writer lock (and repairs after a dead writer first), so it sees a quiet
        table. Meant for tests and `shmkit inspect`; O(size of the table).

        Raises:
            CorruptSegmentError: something is inconsistent; the message says what.
        """
        r = self._t.check()
        if r:
            raise self._error(r, None)

    def close(self) -> None:
        """End this process's use of the dict; other processes and the data are unaffected.

        Closing twice is allowed.

        Raises:
            SegmentBusyError: another thread of this process is inside a call on it.
        """
        if self._seg.closed:
            return
        if self._t.release() == _BUSY:
            raise SegmentBusyError(f"cannot close SharedDict {self._where()}: another thread of "
                                   f"this process is inside a call on it; wait for it first")
        self._seg.close()

    def unlink(self) -> None:
        """Remove the name so no new process can open it (attached processes keep it).

        Raises:
            SegmentNotFoundError: the name was already removed.
        """
        self._seg.unlink()

    def __enter__(self) -> "SharedDict":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._seg.closed:
            return f"<SharedDict {self._seg.name!r} closed>"
        return f"<SharedDict {self._seg.name!r} backend={self._seg.backend} keys={len(self)}>"

    # -- helpers -------------------------------------------------------------------------------

    def _where(self) -> str:
        return describe(self._seg.name, self._seg.backend)

    def _scan(self, with_values: bool, locked: bool) -> list:
        r = self._t.scan(with_values, locked)
        if r.__class__ is int:
            raise self._error(r, None)
        return r

    def _decode(self, raw, key):
        if raw.__class__ is bytes:
            return raw
        return self._unpickle(raw[0], key)

    def _unpickle(self, data: bytes, key):
        try:
            return _loads(data)
        except _GARBAGE_PICKLE as exc:
            raise CorruptSegmentError(f"the value of key {key!r} in SharedDict {self._where()} "
                                      f"is not a valid pickle ({exc}); it was damaged or written "
                                      f"by another program") from exc

    def _error(self, status: int, key, value=None) -> BaseException:
        where = self._where()
        if status == _NOT_FOUND:
            return KeyError(key)
        if status == _BAD_KEY:
            return TypeError(f"SharedDict keys must be str or bytes, not {type(key).__name__}")
        if status in (_FULL_HEAP, _FULL_KEYS, _TOO_LARGE):
            return self._full_error(status, key, value)
        if status == _CORRUPT:
            reason, offset = self._t.damage()
            return CorruptSegmentError(f"SharedDict {where} is damaged: {reason} (at byte "
                                       f"{offset}); copy out what still reads, then remove it "
                                       f"with `shmkit rm {self._seg.name}` and create it again")
        if status == _TIMEOUT:
            pid = self._t.stats().get("lock_owner_pid", 0) if not self._seg.closed else 0
            holder = f"held by pid {pid}" if pid else "held by another process"
            return WaitTimeoutError(f"cannot access SharedDict {where}: its writer lock is still "
                                    f"{holder} after {self._timeout} s; see `shmkit inspect "
                                    f"{self._seg.name}`, or open it with a larger timeout")
        if status == _READONLY:
            return SegmentPermissionError(errno.EACCES, f"cannot modify SharedDict {where}: it "
                                                        f"was opened readonly; open it with "
                                                        f"readonly=False", self._seg.name)
        if status == _CLOSED:
            return ValueError(f"SharedDict {where} is closed")
        if status == _REENTERED:
            return RuntimeError(f"cannot use SharedDict {where} from code that runs inside "
                                f"this thread's own call on it (a __del__ method or gc callback "
                                f"started while it held the writer lock); defer that work, "
                                f"e.g. to a queue drained outside the finalizer")
        return RuntimeError(f"SharedDict {where}: unexpected status {status}")

    def _full_error(self, status: int, key, value) -> SharedDictFullError:
        where = self._where()
        s = self._t.stats()
        used, heap = s["used_bytes"], s["heap_bytes"]
        if status == _FULL_KEYS:
            return SharedDictFullError(
                f"cannot add key {key!r} to SharedDict {where}: it holds its maximum of "
                f"{s['max_keys']} keys; delete keys, or create it again with a larger max_keys")
        size = _entry_size(key, value)
        if status == _TOO_LARGE:
            return SharedDictFullError(
                f"cannot store key {key!r} in SharedDict {where}: the entry needs "
                f"{format_size(size)} but the whole capacity is {format_size(heap)}; create it "
                f"again with capacity_bytes of at least {size}")
        return SharedDictFullError(
            f"cannot store key {key!r} ({format_size(size)}) in SharedDict {where}: "
            f"{format_size(used)} of {format_size(heap)} are used by {s['keys']} keys (free "
            f"space may also be split into pieces too small for this entry); delete keys, or "
            f"create it again with a larger capacity_bytes")


def _entry_size(key, value) -> int:
    """Approximate bytes an entry takes in the heap (for messages)."""
    klen = len(key.encode("utf-8", "surrogatepass")) if isinstance(key, str) else len(key or b"")
    if value is None or value.__class__ is bytes:
        vlen = len(value or b"")
    else:
        try:
            vlen = len(_dumps(value, 5))
        except Exception:
            vlen = 0
    return -(-(BLOCK_HEADER + klen + vlen) // UNIT) * UNIT


class _Items(ItemsView):
    def __iter__(self):
        d = self._mapping
        for key, raw in d._scan(True, False):
            yield key, d._decode(raw, key)


class _Values(ValuesView):
    def __iter__(self):
        d = self._mapping
        for key, raw in d._scan(True, False):
            yield d._decode(raw, key)


def _reopen(name: str, backend: str, readonly: bool, timeout: float | None) -> SharedDict:
    return SharedDict.open(name, backend=backend, readonly=readonly, timeout=timeout)


def _present_stats(raw: dict, seg: Segment) -> dict:
    heap = raw["heap_bytes"]
    return {
        "keys": min(raw["keys"], raw["max_keys"]),
        "max_keys": raw["max_keys"],
        "used_bytes": raw["used_bytes"],
        "capacity_bytes": heap,
        "free_bytes": max(0, heap - raw["used_bytes"]),
        "segment_bytes": seg.size,
        "index_slots": raw["index_slots"],
        "tombstones": raw["tombstones"],
        "writes": raw["writes"],
        "index_generation": raw["generation"],
        "writer_lock_pid": raw["lock_owner_pid"] if raw["lock_owner_tid"] else None,
        "interrupted_write_pending": bool(raw["dirty"]) and not raw["lock_owner_tid"],
        "recoveries": raw["recoveries"],
        "repairs": raw["repairs"],
    }


def describe_state(seg: Segment, header: layout.Header) -> dict:
    """Live state for `shmkit inspect`: keys, bytes used, capacity and recovery counters."""
    table = _table_for(seg, header, 0.0)
    try:
        raw = table.stats()
    finally:
        table.release()
    state = _present_stats(raw, seg)
    state["used"] = f"{format_size(state['used_bytes'])} of {format_size(state['capacity_bytes'])}"
    return state
