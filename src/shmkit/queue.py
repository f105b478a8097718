"""Queue: a bounded multi-producer multi-consumer channel of byte messages (channel layer).

The ring itself is C (`_native.Ring`, see ring.c for the record protocol); `Queue` subclasses
it, so `put`, `get`, `put_nowait`, `get_nowait`, `put_many` and `get_many` are C methods
called directly. This module adds what is policy: creating and opening by name, checking the
header, the attachment table, zero-copy context managers, numpy and pickle helpers,
statistics, and pickling by name.

Segment layout (offsets from the start of the segment):

=========  ======  =====================  =====================================================
offset     size    field                  meaning
=========  ======  =====================  =====================================================
0          128     header                 layout.py header, kind QUEUE; params = (capacity,
                                          max_message, ring offset 4096, control version 1)
128        8       magic                  b"SKRING01"
136        8       capacity               ring bytes (copy of the header param, checked)
144        8       max_message            largest payload (copy, checked)
152        4       closed                 1 once `close()` closed the channel
160        8       pid namespace          the creator's (inode of /proc/self/ns/pid); openers
                                          in another one are refused (owners are pids)
192        8       tail                   hint: a record boundary at or before the end
256        8       head                   hint: a boundary at or before the first untaken record
320        8       free                   bytes before it may be reused by producers
384        4+4     data_seq, waiting      futex word consumers sleep on; how many sleep
448        4+4     space_seq, waiting     futex word producers sleep on; how many sleep
512        8 x 4   aborted, lost,         records dropped by crash recovery; totals of
                   retired put/got        handles that have closed
576        64x32   attachment slots       pid, roles (1 producer, 2 consumer), start time,
                                          messages put, messages got (one slot per handle)
4096       cap     ring                   records: 16-byte header (tag|state|owner, length),
                                          payload padded to 16 bytes; PAD records fill the
                                          space before a wrap
=========  ======  =====================  =====================================================
"""

from __future__ import annotations

import os
import pickle
import struct
import threading

from . import _native, _proc, layout
from .errors import (
    CorruptSegmentError,
    Empty,
    Full,
    MessageTooLargeError,
    QueueClosed,
    SegmentBusyError,
    ShmkitError,
    describe,
    format_size,
)
from ._frames import DTYPE_STR, parse_descr
from .segment import Segment, validate_mode

__all__ = ["Queue", "describe_state"]

CTRL_OFFSET = layout.PAYLOAD_OFFSET
RING_OFFSET = 4096
CTRL_VERSION = 1
RECORD_HEADER = _native.RING_RECORD_HEADER
MIN_CAPACITY = 64
MAX_CAPACITY = _native.RING_MAX_CAPACITY
_SLOTS = CTRL_OFFSET + _native.RING_SLOTS_OFFSET
_SLOT_SIZE = _native.RING_SLOT_SIZE
_CLOSED = CTRL_OFFSET + 24
_PID_NS = CTRL_OFFSET + 32   # the creator's pid namespace (inode), 0 for queues made before
_RETIRED_PUT = CTRL_OFFSET + 400
_RETIRED_GOT = CTRL_OFFSET + 408
ROLE_PRODUCER = 1
ROLE_CONSUMER = 2
# Slot flags above the roles: threads of the slot's process asleep in a get / in a put.
_CONS_WAIT_SHIFT, _PROD_WAIT_SHIFT, _WAIT_MASK = 2, 17, 0x7FFF

assert CTRL_OFFSET + _native.RING_CTRL_SIZE <= RING_OFFSET

_ARRAY_MAGIC = b"SKA1"
_ARRAY_HEAD = struct.Struct("<4sBBHQ")   # magic, ndim, dtype kind, dtype text length, nbytes
_OBJ_MAGIC = b"SKP5"
_OBJ_HEAD = struct.Struct("<4sIQ")       # magic, out-of-band buffer count, pickle length


def _pad16(n: int) -> int:
    return (n + 15) & ~15


# -- errors: the C ring raises what this factory builds from a code and the values involved ----

_CORRUPT_REASONS = {
    "free_cursor": "the free cursor is not a valid position behind the head cursor",
    "passed_header": "a record the head cursor passed has an invalid header",
    "freed_length": "a freed record has an impossible length",
    "tail_cursor": "the tail cursor is outside the ring",
    "tail_tag": "the record at the tail cursor has a header from another position",
    "bad_state": "a record header has an invalid state",
    "tail_length": "a record at the tail has an impossible length",
    "changed_writing": "a record changed while this process was writing it",
    "head_cursor": "the head cursor is outside the ring",
    "run_past": "the records run past the ring's capacity",
    "header_position": "a record header does not match its position",
    "length": "a record has an impossible length",
    "changed_reading": "a record changed while this process was reading it",
    "attach_params": "its capacity parameters are impossible",
    "attach_fit": "the ring does not fit in the segment",
    "attach_slot": "bad attachment slot",
    "attach_magic": "its control block has no ring magic",
    "attach_disagree": "its control block disagrees with its header",
}

_FIRST_ARGUMENT = {"put": "data", "put_many": "messages", "get_many": "max_messages",
                   "reserve": "size"}


def _problem_text(reason: str) -> str:
    return _CORRUPT_REASONS.get(reason, reason)


def _ring_error(code: str, label: str | None, hint: str | None, *values) -> BaseException:
    """The exception for an error the C ring reports as `code` (see ring.c's fail() calls)."""
    label = label or "queue"
    hint = hint or ""
    if code == "corrupt":
        why, pos = values
        where = "" if pos is None else f" (position {pos})"
        return CorruptSegmentError(f"{label} is corrupt: {_problem_text(why)}{where}{hint}")
    if code in ("full", "empty"):
        (timed,) = values
        cls = Full if code == "full" else Empty
        return cls(f"{label} is still {code} after the timeout" if timed else f"{label} is {code}")
    if code == "closed_put":
        return QueueClosed(f"cannot put into {label}: the channel was closed")
    if code == "closed_get":
        return QueueClosed(f"{label} is closed and every message has been taken")
    if code == "too_large":
        size, limit = values
        return MessageTooLargeError(
            f"a message of {size} bytes is larger than the {limit}-byte limit of {label}; split "
            f"it, or create the queue with a larger max_message (and capacity)")
    if code == "detached":
        return ValueError(f"{label} is closed in this process")
    if code == "detached_buffer":
        return BufferError(f"{label} is closed in this process")
    if code == "readonly":
        return TypeError(f"{label} was opened read-only: it can only be inspected")
    if code == "attached":
        return ValueError(f"{label} is already attached")
    if code == "detach_views":
        return SegmentBusyError(f"cannot close {label}: zero-copy views of its memory are still "
                                f"alive; release them first")
    if code == "detach_threads":
        return BufferError(f"cannot close {label}: other threads are blocked in it")
    if code == "not_owner":
        pos, owner = values
        return RuntimeError(
            f"the record at position {pos} of {label} is held by process {owner}, not by this "
            f"one: finish a reserve() or get_view() block in the process that entered it (not "
            f"in a child forked inside the block)")
    if code == "bad_data":
        (type_name,) = values
        return TypeError(f"data must be a bytes-like object, not {type_name}")
    if code == "bad_messages":
        (type_name,) = values
        return TypeError(f"put_many() needs an iterable of bytes-like objects, not {type_name}")
    if code == "bad_type":
        name, type_name = values
        return TypeError(f"{name} must be an int, not {type_name}")
    if code == "bad_count":
        name, value = values
        return ValueError(f"{name} must be at least 1, not {value}")
    if code == "bad_size":
        (value,) = values
        return ValueError(f"size must be >= 0, not {value}")
    if code == "bad_position":
        (value,) = values
        return ValueError(f"{value} is not a record position")
    if code == "too_many_args":
        func, most, given = values
        return TypeError(f"{func}() takes at most {most} positional arguments ({given} given)")
    if code == "unexpected_arg":
        func, keyword = values
        return TypeError(f"{func}() got an unexpected keyword argument {keyword!r}")
    if code == "missing_arg":
        (func,) = values
        return TypeError(f"{func}() missing required argument {_FIRST_ARGUMENT.get(func, '')!r}")
    return ShmkitError(f"{label}: internal error {code} {values!r}")


_native.ring_setup(_ring_error)


def _check_capacity(capacity: object, max_message: object) -> tuple[int, int]:
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise TypeError(f"capacity must be an int number of bytes, not {type(capacity).__name__}")
    if not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be between {MIN_CAPACITY} bytes and "
                         f"{format_size(MAX_CAPACITY)}, not {capacity}")
    capacity = _pad16(capacity)
    limit = capacity - 2 * RECORD_HEADER
    if max_message is None:
        return capacity, limit
    if not isinstance(max_message, int) or isinstance(max_message, bool):
        raise TypeError(f"max_message must be an int number of bytes or None, not "
                        f"{type(max_message).__name__}")
    if not 0 <= max_message <= limit:
        raise ValueError(f"max_message must be between 0 and capacity - {2 * RECORD_HEADER} "
                         f"({limit} bytes for capacity {capacity}), not {max_message}; raise "
                         f"capacity to at least max_message + {2 * RECORD_HEADER}")
    return capacity, max_message


def _init_ring(capacity: int, max_message: int):
    def init(seg: Segment) -> None:
        _native.ring_init(seg.buf, CTRL_OFFSET, RING_OFFSET, capacity, max_message)
        _native.store_u64(seg.buf, _PID_NS, _pid_namespace())
    return init


def _pid_namespace() -> int:
    """This process's pid namespace (the inode of /proc/self/ns/pid), 0 when unknown."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _check_pid_namespace(seg: Segment) -> None:
    """Refuse to share a queue across pid namespaces.

    Records name their owner by process id, and crash recovery finishes a record whose owner
    no longer runs. A process id from another pid namespace means another process (or none)
    here, so a live owner would be judged dead and its message taken away mid-read or
    mid-write. Containers must share the pid namespace to share a queue.
    """
    theirs, ours = _native.load_u64(seg.buf, _PID_NS), _pid_namespace()
    if theirs and ours and theirs != ours:
        raise ShmkitError(
            f"queue {describe(seg.name, seg.backend)} was created in another pid namespace "
            f"(pid:[{theirs}], this process is in pid:[{ours}]); its crash recovery identifies "
            f"processes by pid, so all its users must share one pid namespace (for containers: "
            f"--pid=host or --pid=container:NAME)")


def _params_ok(seg: Segment, header: layout.Header) -> tuple[int, int]:
    capacity, max_message, ring_offset, version = header.params[:4]
    if version != CTRL_VERSION:
        raise CorruptSegmentError(
            f"queue {describe(seg.name, seg.backend)} has control block version {version}; this "
            f"shmkit understands {CTRL_VERSION}")
    if (ring_offset != RING_OFFSET or not MIN_CAPACITY <= capacity <= MAX_CAPACITY
            or capacity % 16 or max_message > capacity - 2 * RECORD_HEADER
            or RING_OFFSET + capacity > seg.size):
        raise CorruptSegmentError(
            f"queue {describe(seg.name, seg.backend)} has impossible parameters (capacity "
            f"{capacity}, max_message {max_message}, ring at {ring_offset}, segment "
            f"{seg.size} bytes); remove it with `shmkit rm {seg.name}`")
    return capacity, max_message


def _hint(seg: Segment) -> str:
    if seg.backend == "memfd":
        return "; create a new queue"
    return f"; remove it with `shmkit rm {seg.name}` and create it again"


class Queue(_native.Ring):
    """A bounded FIFO of byte messages shared by any number of producers and consumers.

    Processes attach by name (`Queue.open`) or inherit an anonymous queue; each message is
    delivered to exactly one consumer, and messages from one producer arrive in the order it
    put them. All waits sleep on futexes with the GIL released and wake up for Ctrl-C.

    Crash behaviour: a process killed at any instruction never makes a consumer see a torn
    message and never blocks the others beyond a ~10 ms recovery slice; a message whose `put`
    returned is never lost, except the single message a killed consumer had already taken.
    See docs/queue.md.

    A Queue object is safe to share between threads. `put`/`get` and friends are C methods.
    """

    # -- construction -------------------------------------------------------------------------

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("use Queue.create(name, capacity=...), Queue.open(name) or "
                        "Queue.anonymous(capacity)")

    @classmethod
    def create(cls, name: str, capacity: int, *, max_message: int | None = None,
               mode: int = 0o600, backend: str = "posix") -> "Queue":
        """Create a new named queue whose ring holds `capacity` bytes.

        Each message costs its size rounded up to 16 bytes plus a 16-byte header, so a ring
        of `capacity` bytes holds about capacity / (size + 16 .. 31) messages.

        Args:
            name: segment name (see `Segment.create`).
            capacity: ring size in bytes (rounded up to a multiple of 16; at least 64).
            max_message: largest message in bytes; default and upper bound capacity - 32.
            mode: permission bits of the segment (exactly these, whatever the umask).
            backend: "posix" or "sysv".

        Raises:
            SegmentExistsError: the name is taken.
            ValueError, TypeError: bad sizes, before any syscall.
        """
        capacity, max_message = _check_capacity(capacity, max_message)
        validate_mode(mode)
        seg, header = layout.create_typed(
            name, layout.Kind.QUEUE, RING_OFFSET - CTRL_OFFSET + capacity,
            (capacity, max_message, RING_OFFSET, CTRL_VERSION),
            init=_init_ring(capacity, max_message), backend=backend, mode=mode)
        return cls._wrap(seg, header)

    @classmethod
    def open(cls, name: str, *, backend: str = "posix") -> "Queue":
        """Attach to an existing queue by name, from any process.

        Raises:
            SegmentNotFoundError: no such segment.
            KindMismatchError: the segment is another kind of shmkit object.
            CorruptSegmentError: it is not a valid queue.
        """
        seg, header = layout.open_typed(name, layout.Kind.QUEUE, backend=backend)
        try:
            return cls._wrap(seg, header)
        except BaseException:
            seg.close()
            raise

    @classmethod
    def anonymous(cls, capacity: int, *, max_message: int | None = None) -> "Queue":
        """Create a nameless queue for this process and its children (multiprocessing).

        Pass it to workers as an argument: it pickles by file descriptor while a process is
        being started. It disappears when the last process closes it.
        """
        capacity, max_message = _check_capacity(capacity, max_message)
        seg = Segment.anonymous(RING_OFFSET + capacity)
        layout.write(seg, layout.Kind.QUEUE, (capacity, max_message, RING_OFFSET, CTRL_VERSION))
        _init_ring(capacity, max_message)(seg)
        layout.publish(seg)
        return cls._wrap(seg, layout.parse(seg))

    @classmethod
    def _from_segment(cls, seg: Segment) -> "Queue":
        return cls._wrap(seg, layout.read(seg, layout.Kind.QUEUE))

    @classmethod
    def _wrap(cls, seg: Segment, header: layout.Header) -> "Queue":
        capacity, max_message = _params_ok(seg, header)
        _check_pid_namespace(seg)
        q = cls.__new__(cls)
        q._seg = seg
        q._lock = threading.Lock()
        q._slot = _claim_slot(seg.buf)
        label = f"queue {describe(seg.name, seg.backend)}"
        try:
            q._attach(seg.buf, CTRL_OFFSET, RING_OFFSET, capacity, max_message, q._slot, label,
                      _hint(seg))
        except BaseException:
            _release_slot(seg.buf, q._slot)
            raise
        q._wbuf = seg.buf
        q._rbuf = seg.buf.toreadonly()
        return q

    # -- properties ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The segment name ('memfd:PID:FD' for anonymous queues)."""
        return self._seg.name

    @property
    def backend(self) -> str:
        """'posix', 'sysv' or 'memfd'."""
        return self._seg.backend

    @property
    def segment(self) -> Segment:
        """The underlying segment (for inspection; do not write into it)."""
        return self._seg

    @property
    def closed(self) -> bool:
        """Whether the channel has been closed (by `close()` in any process).

        Raises:
            ValueError: this handle was detached.
        """
        if not self._attached:
            raise ValueError(f"{self._label()} is closed in this process")
        return bool(_native.load_u32(self._rbuf, _CLOSED))

    # -- zero copy ----------------------------------------------------------------------------

    def reserve(self, size: int, timeout: float | None = None) -> "_Reservation":
        """Write a message of exactly `size` bytes in place: ``with q.reserve(n) as buf:``.

        `buf` is a writable memoryview straight into the ring. Leaving the block normally
        commits the message (consumers see it at once); leaving it by an exception drops it.
        Other producers carry on meanwhile; consumers take later messages past it. The view
        is released on exit: keep no arrays or views derived from it.

        Raises:
            Full: no room within `timeout`. QueueClosed, MessageTooLargeError as for `put`.
        """
        return _Reservation(self, size, timeout)

    def get_view(self, timeout: float | None = None) -> "_View":
        """Read the next message in place: ``with q.get_view() as view:``.

        `view` is a read-only memoryview into the ring, valid inside the block only; the
        space is given back to producers when the block ends (whatever happens in it).

        Raises:
            Empty: nothing within `timeout`. QueueClosed: closed and drained.
        """
        return _View(self, timeout)

    # -- numpy --------------------------------------------------------------------------------

    def put_array(self, array, timeout: float | None = None) -> None:
        """Send a numpy array; its dtype and shape travel with the data, no pickle.

        The data is copied once, straight from the array into the ring (any memory layout).

        Raises:
            TypeError: not a numpy array, or an object dtype (use `put_obj`).
            MessageTooLargeError, Full, QueueClosed: as for `put`.
        """
        import numpy as np

        if not isinstance(array, np.ndarray):
            raise TypeError(f"put_array() needs a numpy.ndarray, not {type(array).__name__}")
        if array.dtype.hasobject:
            raise TypeError("put_array() cannot send arrays of Python objects; use put_obj()")
        if array.ndim > 255:
            raise ValueError(f"put_array() supports at most 255 dimensions, not {array.ndim}")
        if array.dtype.fields is None and array.dtype.subdtype is None:
            kind, text = 0, array.dtype.str.encode()
        else:
            kind, text = 1, repr(np.lib.format.dtype_to_descr(array.dtype)).encode()
        head = (_ARRAY_HEAD.pack(_ARRAY_MAGIC, array.ndim, kind, len(text), array.nbytes)
                + struct.pack(f"<{array.ndim}Q", *array.shape) + text)
        start = _pad16(len(head))
        with self.reserve(start + array.nbytes, timeout) as buf:
            buf[:len(head)] = head
            if array.nbytes:
                dst = np.ndarray(array.shape, array.dtype, buffer=buf, offset=start)
                dst[...] = array
                del dst

    def get_array(self, timeout: float | None = None):
        """Receive an array sent by `put_array`, as a new array (one copy out of the ring).

        Raises:
            ValueError: the message is not an array message (it is consumed all the same).
            Empty, QueueClosed: as for `get`.
        """
        import numpy as np

        with self.get_view(timeout) as view:
            dtype, shape, start, nbytes = _parse_array(view, self)
            flat = np.frombuffer(view, dtype=np.uint8, count=nbytes, offset=start)
            out = np.empty(shape, dtype)
            out.reshape(-1).view(np.uint8)[:] = flat
            del flat
        return out

    # -- pickle -------------------------------------------------------------------------------

    def put_obj(self, obj, timeout: float | None = None) -> None:
        """Send any picklable object with pickle protocol 5.

        Large buffers (numpy arrays, bytearrays, PickleBuffer) travel out of band: each is
        written into the ring once, beside the pickle stream, not copied into it.
        Only exchange pickles with processes you trust: unpickling can run code.

        Raises:
            MessageTooLargeError, Full, QueueClosed: as for `put`.
        """
        buffers: list[memoryview] = []

        def out_of_band(pb: pickle.PickleBuffer) -> bool:
            try:
                buffers.append(pb.raw())
            except BufferError:
                return True   # not contiguous: keep it in band
            return False

        data = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
        head = _OBJ_HEAD.pack(_OBJ_MAGIC, len(buffers), len(data)) + struct.pack(
            f"<{len(buffers)}Q", *(b.nbytes for b in buffers))
        pos = _pad16(len(head))
        total = pos + _pad16(len(data)) + sum(_pad16(b.nbytes) for b in buffers)
        with self.reserve(total, timeout) as buf:
            buf[:len(head)] = head
            buf[pos:pos + len(data)] = data
            pos += _pad16(len(data))
            for b in buffers:
                buf[pos:pos + b.nbytes] = b
                pos += _pad16(b.nbytes)

    def get_obj(self, timeout: float | None = None):
        """Receive an object sent by `put_obj` (its out-of-band buffers copied out once).

        Raises:
            ValueError: the message is not a `put_obj` message (it is consumed all the same).
            Empty, QueueClosed: as for `get`.
        """
        with self.get_view(timeout) as view:
            size = len(view)
            if size < _OBJ_HEAD.size:
                raise ValueError(f"the message from {self._label()} is not a put_obj() message")
            magic, nbufs, plen = _OBJ_HEAD.unpack_from(view, 0)
            if magic != _OBJ_MAGIC or _OBJ_HEAD.size + 8 * nbufs > size:
                raise ValueError(f"the message from {self._label()} is not a put_obj() message")
            lengths = struct.unpack_from(f"<{nbufs}Q", view, _OBJ_HEAD.size)
            pos = _pad16(_OBJ_HEAD.size + 8 * nbufs)
            if pos + _pad16(plen) + sum(_pad16(n) for n in lengths) > size:
                raise ValueError(f"the message from {self._label()} is a malformed put_obj() "
                                 f"message")
            data = bytes(view[pos:pos + plen])
            pos += _pad16(plen)
            buffers = []
            for n in lengths:
                buffers.append(bytearray(view[pos:pos + n]))
                pos += _pad16(n)
        return pickle.loads(data, buffers=buffers)

    # -- state --------------------------------------------------------------------------------

    def qsize(self) -> int:
        """Messages waiting now (a snapshot: others may change it at once). O(depth)."""
        return self._walk()["depth_messages"]

    def empty(self) -> bool:
        """Whether no message is waiting now (a snapshot)."""
        return self.qsize() == 0

    def stats(self) -> dict:
        """Depth, capacity, attached and waiting processes, and totals, read from the segment.

        Readable from any process. Keys: depth_messages, depth_bytes, used_bytes, capacity,
        max_message, producers, consumers, attached, waiting_producers, waiting_consumers,
        total_put, total_got, aborted (records dropped because their producer died), lost
        (messages taken by consumers that died), closed, being_written, being_read.
        """
        return _state(self._rbuf, self._walk())

    def _label(self) -> str:
        return f"queue {describe(self._seg.name, self._seg.backend)}"

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel for everyone, then detach this handle.

        After it, `put` raises QueueClosed in every process; consumers first receive what is
        left, then get QueueClosed. With several producers, call it once, when all of them
        are done (a producer that only leaves calls `detach()`). Closing twice is allowed.
        """
        if self._attached:
            self._close_channel()
        self.detach()

    def detach(self) -> None:
        """End this handle's use of the queue; other processes and the channel are unaffected.

        Raises:
            SegmentBusyError: zero-copy views into the queue are still alive.
            BufferError: other threads are blocked in this handle's put or get.
        """
        with self._lock:
            if not self._attached:
                return
            self._detach()
            _release_slot(self._wbuf, self._slot)
            self._rbuf.release()
            del self._wbuf, self._rbuf
            self._seg.close()

    def unlink(self) -> None:
        """Remove the queue's name; processes that have it open keep using it.

        Raises:
            SegmentNotFoundError: the name was already removed.
        """
        self._seg.unlink()

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def __del__(self) -> None:
        try:
            self.detach()
        except Exception:
            pass

    def __iter__(self):
        """Yield messages until the channel is closed and drained."""
        while True:
            try:
                yield self.get()
            except QueueClosed:
                return

    def __reduce__(self):
        if self._seg.backend == "memfd":
            return (Queue._from_segment, (self._seg,))
        return (_reopen, (self._seg.name, self._seg.backend))

    def __repr__(self) -> str:
        if not getattr(self, "_seg", None):
            return "<Queue unattached>"
        state = "detached" if not self._attached else "open"
        return (f"<Queue {self._seg.name!r} backend={self._seg.backend} capacity={self.capacity} "
                f"max_message={self.max_message} {state}>")


def _reopen(name: str, backend: str) -> Queue:
    return Queue.open(name, backend=backend)


class _Reservation:
    """``with q.reserve(n) as buf``: commit on success, abort on exception."""

    __slots__ = ("_q", "_size", "_timeout", "_pos", "_base", "_view")

    def __init__(self, q: Queue, size: int, timeout: float | None) -> None:
        self._q, self._size, self._timeout = q, size, timeout

    def __enter__(self) -> memoryview:
        q = self._q
        self._pos, off = q._reserve(self._size, self._timeout)
        try:
            # A fresh managed buffer per block: its view count shows escaped views later.
            self._base = memoryview(q)
            self._view = self._base[off:off + self._size]
        except BaseException:
            q._abort(self._pos)
            raise
        return self._view

    def __exit__(self, exc_type, exc, tb) -> None:
        q, pos = self._q, self._pos
        # Finish the record whatever happens (left RESERVED by this live process, it would hold
        # the ring's space, for every process, until this one exits), and while this block's
        # views still pin the handle, so no other thread can detach it in between.
        escaped = _native.view_count(self._base) > 2   # more views than this block's two
        try:
            if exc_type is not None:
                q._abort(pos)
            else:
                q._commit(pos)
        finally:
            escaped = _release_views(self._view, self._base) or escaped
        if escaped and exc_type is None:
            raise BufferError(f"the message was put into {q._label()}, but arrays or views made "
                              f"from the reserved memory are still alive; they now point into "
                              f"memory other processes reuse: drop them inside the with block")


class _View:
    """``with q.get_view() as view``: the space is freed when the block ends."""

    __slots__ = ("_q", "_timeout", "_pos", "_base", "_view")

    def __init__(self, q: Queue, timeout: float | None) -> None:
        self._q, self._timeout = q, timeout

    def __enter__(self) -> memoryview:
        q = self._q
        self._pos, off, n = q._take(self._timeout)
        try:
            base = memoryview(q)
            self._base = base.toreadonly()
            base.release()
            self._view = self._base[off:off + n]
        except BaseException:
            q._untake(self._pos)   # not read: it goes back to the consumers, not lost
            raise
        return self._view

    def __exit__(self, exc_type, exc, tb) -> None:
        escaped = _native.view_count(self._base) > 2   # see _Reservation.__exit__
        try:
            self._q._release(self._pos)
        finally:
            escaped = _release_views(self._view, self._base) or escaped
        if escaped and exc_type is None:
            raise BufferError(f"views or arrays made from a message of {self._q._label()} are "
                              f"still alive after get_view(); its space is reused now: copy "
                              f"what you need inside the with block")


def _release_views(view: memoryview, base: memoryview) -> bool:
    """Release a zero-copy block's two views; True when one cannot be released because an
    object holds a buffer of it (pickle.PickleBuffer, a C extension): it still points into
    the ring. (Other views of it, slices and numpy arrays, show in view_count instead.)"""
    escaped = False
    for v in (view, base):
        try:
            v.release()
        except BufferError:
            escaped = True
    return escaped


def _parse_array(view: memoryview, q: Queue):
    import numpy as np

    size = len(view)
    bad = f"the message from {q._label()} is not a put_array() message"
    if size < _ARRAY_HEAD.size:
        raise ValueError(bad)
    magic, ndim, kind, tlen, nbytes = _ARRAY_HEAD.unpack_from(view, 0)
    if magic != _ARRAY_MAGIC or _ARRAY_HEAD.size + 8 * ndim + tlen > size:
        raise ValueError(bad)
    shape = struct.unpack_from(f"<{ndim}Q", view, _ARRAY_HEAD.size)
    text = bytes(view[_ARRAY_HEAD.size + 8 * ndim:_ARRAY_HEAD.size + 8 * ndim + tlen]).decode()
    try:
        if kind == 0:
            if not DTYPE_STR.fullmatch(text):
                raise ValueError("not a dtype string")
            dtype = np.dtype(text)
        else:
            dtype = np.lib.format.descr_to_dtype(parse_descr(text))
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, SyntaxError) as exc:
        raise ValueError(f"{bad} (bad dtype {text!r})") from exc
    start = _pad16(_ARRAY_HEAD.size + 8 * ndim + tlen)
    count = 1
    for n in shape:
        count *= n
    if dtype.hasobject or count * dtype.itemsize != nbytes or start + nbytes > size:
        raise ValueError(f"{bad} (shape {shape} and dtype {dtype} do not match its "
                         f"{size} bytes)")
    return dtype, shape, start, nbytes


# -- attachment table: who has the queue open, and per-handle totals ---------------------------

def _slot_offsets():
    return [_SLOTS + i * _SLOT_SIZE for i in range(_native.RING_SLOTS)]


def _claim_slot(buf: memoryview) -> int:
    """Take a slot for this handle (a free one, else one whose process died); -1 if none.

    A slot's start time is 0 while it is free or being filled, and "pid with start time 0"
    counts as alive while that pid runs: so between the claim and the fill nobody mistakes
    the new owner for the dead one (whose start time would not match) and takes the slot.
    """
    if buf.readonly:
        return -1
    pid = os.getpid()
    start = _proc.own_start_time()
    for free_pass in (True, False):   # free slots first; then those of dead processes
        for off in _slot_offsets():
            owner = _native.load_u32(buf, off)
            started = _native.load_u64(buf, off + 8)
            if (owner == 0) != free_pass or (owner and _proc.process_alive(owner, started)):
                continue
            # First the start time (so the slot reads "being filled"), then the owner.
            ok, _ = _native.cas_u64(buf, off + 8, started, 0)
            if ok:
                ok, _ = _native.cas_u32(buf, off, owner, pid)
            if ok:
                _retire(buf, off)
                _fill_slot(buf, off, start)
                return off
    return -1


def _fill_slot(buf: memoryview, off: int, start: int) -> None:
    _native.store_u32(buf, off + 4, 0)
    _native.store_u64(buf, off + 8, start)
    _native.store_u64(buf, off + 16, 0)
    _native.store_u64(buf, off + 24, 0)


def _retire(buf: memoryview, off: int) -> None:
    """Fold a slot's counters into the retired totals before the slot is reused."""
    _native.add_u64(buf, _RETIRED_PUT, _native.load_u64(buf, off + 16))
    _native.add_u64(buf, _RETIRED_GOT, _native.load_u64(buf, off + 24))
    _native.store_u64(buf, off + 16, 0)
    _native.store_u64(buf, off + 24, 0)


def _release_slot(buf: memoryview, off: int) -> None:
    # A forked child inherits the handle, not the slot: only the process that claimed it
    # gives it back (the child's counts went to the retired totals).
    if off < 0 or _native.load_u32(buf, off) != os.getpid():
        return
    _retire(buf, off)
    _native.store_u32(buf, off + 4, 0)
    _native.store_u64(buf, off + 8, 0)
    _native.store_u32(buf, off, 0)


def _state(buf: memoryview, walk: dict) -> dict:
    producers = consumers = attached = 0
    total_put, total_got = walk["retired_put"], walk["retired_got"]
    # Sleepers of handles without a slot are counted in the control block; the others in
    # their slot, so that those of a process killed in its sleep drop out with it.
    waiting_producers, waiting_consumers = walk["waiting_producers"], walk["waiting_consumers"]
    for off in _slot_offsets():
        pid = _native.load_u32(buf, off)
        total_put += _native.load_u64(buf, off + 16)
        total_got += _native.load_u64(buf, off + 24)
        if not pid or not _proc.process_alive(pid, _native.load_u64(buf, off + 8)):
            continue
        attached += 1
        flags = _native.load_u32(buf, off + 4)
        producers += bool(flags & ROLE_PRODUCER)
        consumers += bool(flags & ROLE_CONSUMER)
        waiting_consumers += (flags >> _CONS_WAIT_SHIFT) & _WAIT_MASK
        waiting_producers += (flags >> _PROD_WAIT_SHIFT) & _WAIT_MASK
    state = {
        "depth_messages": walk["depth_messages"], "depth_bytes": walk["depth_bytes"],
        "used_bytes": walk["used_bytes"], "capacity": walk["capacity"],
        "max_message": walk["max_message"], "attached": attached, "producers": producers,
        "consumers": consumers, "waiting_producers": waiting_producers,
        "waiting_consumers": waiting_consumers, "total_put": total_put,
        "total_got": total_got, "aborted": walk["aborted"], "lost": walk["lost"],
        "closed": bool(walk["closed"]), "being_written": walk["being_written"],
        "being_read": walk["being_read"],
    }
    if walk["problem"]:
        state["problem"] = _problem_text(walk["problem"])
    return state


def describe_state(seg: Segment, header: layout.Header) -> dict:
    """The live state of the queue in `seg` as a JSON-friendly dict (for `shmkit inspect`).

    Works on a read-only mapping and never writes. Keys as in `Queue.stats()`; a damaged ring
    adds "problem" with what is wrong instead of raising.

    Raises:
        CorruptSegmentError: the header's queue parameters are impossible.
    """
    _params_ok(seg, header)
    ring = _native.Ring()
    ring._attach(seg.buf, CTRL_OFFSET, RING_OFFSET, header.params[0], header.params[1], -1,
                 f"queue {describe(seg.name, seg.backend)}", _hint(seg))
    try:
        return _state(seg.buf, ring._walk())
    finally:
        ring._detach()
