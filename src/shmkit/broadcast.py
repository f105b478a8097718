"""Broadcast (one publisher, many subscribers) and Latest (the newest value) (channels layer).

A `Broadcast` is a ring of variable-size messages in one segment. One publisher appends;
every subscriber has its own cursor and reads every message from where it joined, in order.
Two policies decide what happens when a subscriber falls behind:

- ``"overwrite"``: the publisher never waits. It overwrites the oldest messages; a subscriber
  that had not read them gets `LaggedError` carrying the exact number it missed, then
  continues with the oldest retained message. A message is validated after it is copied
  (seqlock-style, against the oldest retained position), so a torn message is never returned.
- ``"block"``: the publisher waits (with a timeout) for the slowest live subscriber. A
  subscriber whose process died, or that made no progress for ``grace`` seconds while the
  publisher waited on it, is evicted (its next call raises `EvictedError`).

The hot paths (`Publisher.publish`, `Subscriber.receive`, ...) are methods of C types in
``shmkit._native`` (bcast.c); this module adds creation, validation, zero-copy context
managers, numpy helpers, statistics and `describe_state` for ``shmkit inspect``.

Shared memory layout of a Broadcast (all integers little-endian; see bcast.c for the
protocol):

======  =====  =================  =============================================================
offset  size   field              meaning
======  =====  =================  =============================================================
0       128    typed header       `layout.py`; params = capacity, max_message, max_subscribers,
                                  policy (0 overwrite, 1 block), grace_ns, ring_offset
128     64     geometry           magic "BCST", version 1, the params again (checked at open)
192     64     publisher          holder pid << 32 | claim generation, holder start time, claims,
                                  takeovers, ended flag, publisher-waiting flag and position,
                                  space futex word, slot high-water mark, evictions
256     64     head               head position (release-published), subscriber futex word,
                                  "a subscriber may sleep" flag, {next seq, head position}
                                  pair, bytes published
320     64     tail               oldest retained position, {seq, position} pair of the oldest
                                  retained message
384     64     intent             block policy: how far the publisher may move the tail now
448     64     spare              zero
512     64*S   subscriber table   per slot: pid << 32 | generation << 8 | state (free, joining,
                                  active, evicted), read position, next seq, drops, first seq,
                                  owner start time, join time, sleeping flag, thread id
R       C      ring               records {u64 seq, u32 len, u32 flags} + payload, 16-byte
                                  aligned; a padding record (flags = 1) fills the end of the
                                  ring when a message does not fit before it
======  =====  =================  =============================================================

S = max_subscribers, C = capacity, R = 512 + 64 * S. Positions are byte counts since creation
(never wrapped); a position's offset in the ring is position % capacity.

A `Latest` holds the newest value of some state for readers that poll (see latest.c):

======  =====  =================  =============================================================
offset  size   field              meaning
======  =====  =================  =============================================================
0       128    typed header       params = max_size, slots, stride
128     64     control            magic "LTST", version, max_size, slots, stride, latest version
                                  (futex on its low half), writer lock (thread id), writer pid,
                                  "a reader may sleep" flag, locks taken from dead writers
192     K*T    buffers            K = slots buffers of T = stride bytes: {seq (odd while being
                                  written), length, write time} in a 64-byte header, then data
======  =====  =================  =============================================================
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
import weakref
from typing import Iterator

from . import _native, _proc, layout
from .errors import (
    CorruptSegmentError,
    Empty,
    EvictedError,
    Full,
    LaggedError,
    MessageTooLargeError,
    PublisherExistsError,
    QueueClosed,
    ResourceLimitError,
    SegmentBusyError,
    WaitTimeoutError,
    describe,
    format_size,
)
from ._frames import DTYPE_STR, parse_descr
from .layout import Kind
from .segment import Segment

_native.bcast_set_errors(
    corrupt=CorruptSegmentError, lagged=LaggedError, evicted=EvictedError, empty=Empty,
    full=Full, closed=QueueClosed, too_large=MessageTooLargeError,
    pub_exists=PublisherExistsError, limit=ResourceLimitError, timeout=WaitTimeoutError)

POLICIES = ("overwrite", "block")
"""The Broadcast policies, in the order of their code in the header."""

DEFAULT_GRACE = 5.0
"""Seconds a block-policy publisher waits on a subscriber that makes no progress before
evicting it."""

MIN_CAPACITY = 128
MAX_SUBSCRIBERS = 4096
MAX_LATEST_SLOTS = 64

_CTRL = layout.PAYLOAD_OFFSET              # the control block starts after the typed header
_CTRL_SIZE = 384
_TABLE = _CTRL + _CTRL_SIZE
_SLOT_SIZE = 64
_REC_HDR = 16
_NEVER = 2**64 - 1                          # grace_ns meaning "never evict a live subscriber"
_MAGIC = 0x54534342
_LATEST_MAGIC = 0x5453544C

_GEOMETRY = struct.Struct("<IIQQIIQQQQ")    # control line 0
_PUBLISHER = struct.Struct("<QQQQIIQIIQ")   # control line 1
_HEAD = struct.Struct("<QIIQQQQQQ")         # control line 2
_TAIL = struct.Struct("<QQQQQQ")            # control line 3 (without the spare words)
_SLOT = struct.Struct("<QQQQQQQII")
_LATEST_CTRL = struct.Struct("<IIQIIQQIIIIQ")
_LATEST_SLOT = struct.Struct("<QQQ")

_STATES = {0: "free", 1: "joining", 2: "active", 3: "evicted"}


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _ring_offset(max_subscribers: int) -> int:
    return _TABLE + _SLOT_SIZE * max_subscribers


class _Geometry:
    """A Broadcast's sizes, from its header params, checked against the segment (untrusted)."""

    __slots__ = ("capacity", "max_message", "max_subscribers", "policy", "grace_ns",
                 "ring_offset")

    def __init__(self, seg: Segment, header: layout.Header) -> None:
        cap, max_msg, subs, policy, grace_ns, ring_off = header.params[:6]
        ok = (MIN_CAPACITY <= cap and cap % 64 == 0 and 1 <= subs <= MAX_SUBSCRIBERS
              and max_msg <= cap // 2 - _REC_HDR and policy in (0, 1)
              and ring_off == _ring_offset(subs) and ring_off + cap == seg.size)
        if not ok:
            raise CorruptSegmentError(
                f"broadcast {describe(seg.name, seg.backend)} has impossible sizes in its header; "
                f"remove it with `shmkit rm {seg.name}` and create it again")
        self.capacity = cap
        self.max_message = max_msg
        self.max_subscribers = subs
        self.policy = POLICIES[policy]
        self.grace_ns = grace_ns
        self.ring_offset = ring_off

    def native_args(self) -> tuple:
        return (self.capacity, self.max_message, self.max_subscribers,
                POLICIES.index(self.policy), self.grace_ns)


def _check_name_kind(name: object) -> None:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")


def _int_arg(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# Broadcast
# ---------------------------------------------------------------------------------------------


class Broadcast:
    """A one-to-many message channel in shared memory: every subscriber reads every message.

    Create it once with `Broadcast.create`, open it by name from any process with
    `Broadcast.open`. One process at a time publishes (`publisher()`); any number of
    subscribers (`subscribe()`) join and leave at any time, from unrelated processes and from
    threads. A Broadcast pickles as its name, so it can be handed to multiprocessing workers.

    `close()` ends this process's use (its publisher and subscribers, then the mapping);
    `unlink()` removes the name for everyone.
    """

    def __init__(self, seg: Segment, header: layout.Header) -> None:
        """Internal: use `create` or `open`."""
        self._seg = seg
        self._geom = _Geometry(seg, header)
        self._label = describe(seg.name, seg.backend)
        self._children: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, capacity: int, *, max_message: int | None = None,
               max_subscribers: int = 64, policy: str = "overwrite",
               grace: float | None = DEFAULT_GRACE, mode: int = 0o600,
               backend: str = "posix") -> "Broadcast":
        """Create a new broadcast with a ring of `capacity` bytes.

        The segment holds the ring plus a 64-byte slot per possible subscriber and 512 bytes
        of header and control data. Each message takes 16 bytes of header plus its length
        rounded up to 16.

        Args:
            name: segment name (see `segment.validate_name`).
            capacity: ring size in bytes (at least 128; rounded up to a multiple of 64).
            max_message: largest message in bytes; default and maximum capacity/2 - 16, the
                largest that always fits.
            max_subscribers: subscriber slots (1..4096).
            policy: "overwrite" (the publisher never waits; slow subscribers lose messages
                and are told how many) or "block" (the publisher waits for the slowest live
                subscriber).
            grace: block policy: seconds a subscriber may make no progress while the
                publisher waits on it before it is evicted; None never evicts a live one.
            mode: permission bits of the segment (default owner-only).
            backend: "posix" or "sysv".

        Raises:
            SegmentExistsError: the name is taken.
            ResourceLimitError: not enough shared memory.
            ValueError, TypeError: bad arguments, before anything is created.
        """
        _check_name_kind(name)
        capacity = _int_arg(capacity, "capacity")
        if capacity < MIN_CAPACITY:
            raise ValueError(f"capacity must be at least {MIN_CAPACITY} bytes, got {capacity}")
        capacity = _round_up(capacity, 64)
        largest = capacity // 2 - _REC_HDR
        if max_message is None:
            max_message = largest
        max_message = _int_arg(max_message, "max_message")
        if not 0 <= max_message <= largest:
            raise ValueError(f"max_message must be between 0 and capacity/2 - 16 = {largest} "
                             f"bytes, got {max_message}; raise capacity for larger messages")
        max_subscribers = _int_arg(max_subscribers, "max_subscribers")
        if not 1 <= max_subscribers <= MAX_SUBSCRIBERS:
            raise ValueError(f"max_subscribers must be between 1 and {MAX_SUBSCRIBERS}, "
                             f"got {max_subscribers}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be 'overwrite' or 'block', got {policy!r}")
        if grace is None:
            grace_ns = _NEVER
        else:
            if isinstance(grace, bool) or not isinstance(grace, (int, float)):
                raise TypeError(f"grace must be a number of seconds or None, not "
                                f"{type(grace).__name__}")
            if not 0 <= grace < 1e9:
                raise ValueError(f"grace must be >= 0 seconds, got {grace}")
            grace_ns = int(grace * 1e9)
        code = POLICIES.index(policy)
        ring_off = _ring_offset(max_subscribers)
        params = (capacity, max_message, max_subscribers, code, grace_ns, ring_off)

        def init(seg: Segment) -> None:
            _native.bcast_format(seg.buf, capacity, max_message, max_subscribers, code, grace_ns)

        seg, header = layout.create_typed(name, Kind.BROADCAST, ring_off + capacity
                                          - layout.PAYLOAD_OFFSET, params, init=init,
                                          backend=backend, mode=mode)
        try:
            return cls(seg, header)
        except BaseException:
            seg.unlink()
            seg.close()
            raise

    @classmethod
    def open(cls, name: str, *, backend: str = "posix") -> "Broadcast":
        """Open an existing broadcast by name (from any process).

        Raises:
            SegmentNotFoundError: no segment has that name.
            KindMismatchError: the segment is another kind of shmkit object.
            CorruptSegmentError: the segment is damaged or not a shmkit object.
        """
        _check_name_kind(name)
        seg, header = layout.open_typed(name, Kind.BROADCAST, backend=backend)
        try:
            return cls(seg, header)
        except BaseException:
            seg.close()
            raise

    def __reduce__(self):
        return (_open_broadcast, (self._seg.name, self._seg.backend))

    # -- properties ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The segment name."""
        return self._seg.name

    @property
    def backend(self) -> str:
        """'posix' or 'sysv'."""
        return self._seg.backend

    @property
    def segment(self) -> Segment:
        """The underlying segment."""
        return self._seg

    @property
    def capacity(self) -> int:
        """Ring size in bytes."""
        return self._geom.capacity

    @property
    def max_message(self) -> int:
        """Largest message in bytes."""
        return self._geom.max_message

    @property
    def max_subscribers(self) -> int:
        """Number of subscriber slots."""
        return self._geom.max_subscribers

    @property
    def policy(self) -> str:
        """'overwrite' or 'block'."""
        return self._geom.policy

    @property
    def grace(self) -> float | None:
        """Block policy eviction grace in seconds (None: live subscribers are never evicted)."""
        g = self._geom.grace_ns
        return None if g >= 2**63 - 1 else g / 1e9

    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
        return self._seg.closed

    # -- roles --------------------------------------------------------------------------------

    def publisher(self) -> "Publisher":
        """Claim the publisher role and return the publisher.

        Only one publisher may be live at a time, across all processes. If the holder's
        process has died, its role is taken over: whatever it was writing when it died is
        never delivered (records become visible only once complete), and the new publisher
        continues the sequence numbers. `Publisher.took_over` says whether that happened.

        Raises:
            PublisherExistsError: a live process holds the role (the message names its pid).
            CorruptSegmentError: the cursors or retained records are damaged.
        """
        self._check_open()
        pub = Publisher.__new__(Publisher)
        took_over, previous = pub._attach(self._seg.buf, *self._geom.native_args(),
                                          self._seg.name, self._label, _proc.own_start_time())
        pub._broadcast = self
        pub.took_over = took_over
        pub.previous_pid = previous or None
        with self._lock:
            self._children.add(pub)
        return pub

    def subscribe(self, start: str = "next", *, on_lag: str = "raise") -> "Subscriber":
        """Join as a subscriber and return it.

        Args:
            start: "next": receive every message published after this call returns (and
                possibly some published while it runs). "oldest": start with the oldest
                message still retained in the ring.
            on_lag: overwrite policy: "raise" makes receive raise `LaggedError` (with the
                exact count) when messages were missed, then continue; "skip" continues
                silently (the count is in `Subscriber.missed` and in `stats()`).

        Raises:
            ResourceLimitError: every subscriber slot is held by a live process (slots of
                dead processes are reclaimed automatically).
        """
        self._check_open()
        if start not in ("next", "oldest"):
            raise ValueError(f"start must be 'next' or 'oldest', got {start!r}")
        if on_lag not in ("raise", "skip"):
            raise ValueError(f"on_lag must be 'raise' or 'skip', got {on_lag!r}")
        sub = Subscriber.__new__(Subscriber)
        sub._attach(self._seg.buf, *self._geom.native_args(), self._seg.name, self._label,
                    start == "oldest", on_lag == "raise", _proc.own_start_time(),
                    time.time_ns())
        sub._broadcast = self
        with self._lock:
            self._children.add(sub)
        return sub

    # -- state --------------------------------------------------------------------------------

    def stats(self) -> dict:
        """A snapshot of the broadcast's state, readable from any process.

        Returns a dict: policy, capacity, max_message, max_subscribers, grace; published
        (messages so far), published_bytes, retained (messages still in the ring),
        oldest_seq, ended; publisher (pid, alive, claims, takeovers, waiting) or None;
        evictions; subscribers: one dict per occupied slot with slot, pid, alive, state,
        position (next sequence number), lag (messages published but not yet read), drops,
        received, joined_ns.
        """
        self._check_open()
        return _broadcast_state(self._seg, self._geom)

    def publisher_alive(self) -> bool:
        """Whether a publisher holds the role and its process is running."""
        self._check_open()
        word = _PUBLISHER.unpack_from(self._seg.buf, _CTRL + 64)[0]
        return (word >> 32) != 0 and _native.task_alive(word >> 32)

    # -- lifetime -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._seg.closed:
            raise ValueError(f"broadcast {self._label} is closed")

    def close(self) -> None:
        """End this process's use: close the publisher and subscribers made from this object,
        then unmap. Other processes are unaffected; closing twice is allowed.

        Raises:
            SegmentBusyError: zero-copy views of messages are still alive; release them first.
        """
        with self._lock:
            children = list(self._children)
        for child in children:
            try:
                child.close()
            except SegmentBusyError:
                raise
        self._seg.close()

    def unlink(self) -> None:
        """Remove the name so no new process can open it; open ones keep working.

        Raises:
            SegmentNotFoundError: the name was already removed.
        """
        self._seg.unlink()

    def __enter__(self) -> "Broadcast":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._seg.closed else self._geom.policy
        return (f"<Broadcast {self._seg.name!r} backend={self._seg.backend} "
                f"capacity={format_size(self._geom.capacity)} {state}>")


def _open_broadcast(name: str, backend: str) -> Broadcast:
    return Broadcast.open(name, backend=backend)


class Publisher(_native.BcastPublisher):
    """The one process that publishes on a Broadcast (see `Broadcast.publisher`).

    Safe to share between threads of the process (calls are serialised). It holds the role
    until `close()` (or until it is garbage collected, or its process ends: a dead holder's
    role is taken over by the next `publisher()` call anywhere).

    Attributes:
        took_over: the role was taken from a publisher whose process had died.
        previous_pid: that process's pid, or None.
    """

    took_over: bool
    previous_pid: int | None

    def close(self, *, end_stream: bool = False) -> None:
        """Give up the publisher role (another process may then claim it).

        Args:
            end_stream: also tell subscribers the stream is over: once they have received
                everything, their receive raises `QueueClosed` (until a new publisher claims
                the role).

        Raises:
            SegmentBusyError: views from `reserve` are still alive.
        """
        try:
            self._close(end_stream=end_stream)
        except BufferError as exc:
            raise SegmentBusyError(f"cannot close the publisher of broadcast "
                                   f"{self._broadcast._label}: {exc}; delete them first") from exc

    @contextlib.contextmanager
    def reserve(self, size: int, timeout: float | None = None) -> Iterator[memoryview]:
        """Write a message of `size` bytes straight into the ring (zero copy).

        ``with pub.reserve(n) as buf: buf[:] = ...`` publishes the message when the block
        ends, and drops it if the block raises. Only this thread may use the publisher until
        then. Room is made at the start exactly as `publish` does (overwrite: the oldest
        messages are overwritten; block: waits up to timeout).

        Raises:
            MessageTooLargeError, Full: as `publish`.
            BufferError: a view of `buf` outlived the block (the message is published anyway).
        """
        window = self._reserve_begin(size, timeout)
        completed = escaped = False
        try:
            view = memoryview(window)
            try:
                yield view
                completed = True
            finally:
                try:
                    view.release()
                except BufferError:  # something still holds a buffer of `view` itself
                    escaped = True
        finally:
            # always end the reservation, or the publisher would refuse every later call
            alive = self._reserve_commit() if completed else self._reserve_abort()
        if escaped or alive:
            raise BufferError(f"a view of the message reserved on broadcast "
                              f"{self._broadcast._label} outlived its with block (the message "
                              f"was published); copy what you need inside the block")

    def publish_array(self, array, timeout: float | None = None) -> None:
        """Publish a numpy array: dtype and shape travel with the data (one copy, no pickle).

        Receive it with `Subscriber.receive_array`.

        Raises:
            TypeError: object arrays (they hold pointers, not data).
            MessageTooLargeError, Full: as `publish`.
        """
        import numpy as np

        arr = np.asarray(array)
        head = _array_header(arr)
        with self.reserve(len(head) + arr.nbytes, timeout) as buf:
            buf[:len(head)] = head
            if arr.nbytes:  # copied once, from any memory layout, straight into the ring
                dst = np.ndarray(arr.shape, arr.dtype, buffer=buf, offset=len(head))
                dst[...] = arr
                del dst

    def publish_many_nowait(self, messages) -> int:
        """`publish_many` without waiting for room: `Full` (with the count published so far
        in a note) as soon as a message does not fit."""
        return self.publish_many(messages, 0)

    def publish_array_nowait(self, array) -> None:
        """`publish_array` without waiting for room (`Full` at once)."""
        self.publish_array(array, 0)

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __reduce__(self):
        raise TypeError("a Publisher cannot be pickled: pickle the Broadcast and call "
                        "publisher() in the other process")

    def __repr__(self) -> str:
        b = getattr(self, "_broadcast", None)
        name = b.name if b is not None else "?"
        return f"<Publisher of {name!r} {'closed' if self.closed else 'open'}>"


class Subscriber(_native.BcastSubscriber):
    """One reader of a Broadcast (see `Broadcast.subscribe`): it sees every message, in order.

    Safe to share between threads (calls are serialised, and the threads then split the
    messages between them); for each thread to see every message, give each its own
    Subscriber. Iterating yields messages until the publisher ends the stream.
    """

    def close(self) -> None:
        """Leave the broadcast: the slot is freed (a block-policy publisher stops waiting for
        it). Closing twice is allowed.

        Raises:
            SegmentBusyError: views from `receive_view` are still alive.
        """
        try:
            self._close()
        except BufferError as exc:
            raise SegmentBusyError(f"cannot close a subscriber of broadcast "
                                   f"{self._broadcast._label}: {exc}; delete them first") from exc

    @contextlib.contextmanager
    def receive_view(self, timeout: float | None = None) -> Iterator[memoryview]:
        """Read the next message in place, without copying it (read-only memoryview).

        The message is consumed when the block ends. Overwrite policy: the publisher does not
        wait for readers, so it may overwrite the message while the view is held; the view is
        validated when the block ends and `LaggedError` is raised if that happened (the data
        seen may then be torn: discard what was computed from it). Block policy: the message
        cannot be overwritten while viewed (unless this subscriber is evicted: then
        `EvictedError`).

        Raises:
            Empty, LaggedError, EvictedError, QueueClosed: as `receive`.
            BufferError: a view of the message outlived the block.
        """
        window = self._view_begin(timeout)
        escaped = False
        try:
            view = memoryview(window)
            try:
                yield view
            finally:
                try:
                    view.release()
                except BufferError:  # something still holds a buffer of `view` itself
                    escaped = True
        finally:
            # always end the view, or the subscriber would refuse every later call
            alive = self._view_end()
        if escaped or alive:
            raise BufferError(f"a view of a message received from broadcast "
                              f"{self._broadcast._label} outlived its with block; copy what "
                              f"you need inside the block")

    def receive_array(self, timeout: float | None = None):
        """Receive a numpy array sent with `Publisher.publish_array` (one copy, writable).

        Raises:
            ValueError: the message is not an array message.
            Empty, LaggedError, EvictedError, QueueClosed: as `receive`.
        """
        import numpy as np

        with self.receive_view(timeout) as view:
            dtype, shape, start, nbytes = _parse_array(
                view, f"broadcast {self._broadcast._label}")
            out = np.empty(shape, dtype)
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(view, np.uint8, count=nbytes,
                                                              offset=start)
        return out

    def receive_many_nowait(self, max_messages: int) -> list:
        """`receive_many` without waiting: what is there now, up to `max_messages` (`Empty`
        if nothing is)."""
        return self.receive_many(max_messages, 0)

    def receive_array_nowait(self):
        """`receive_array` without waiting (`Empty` if no message is there)."""
        return self.receive_array(0)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                yield self.receive()
            except QueueClosed:
                return

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __reduce__(self):
        raise TypeError("a Subscriber cannot be pickled: pickle the Broadcast and call "
                        "subscribe() in the other process")

    def __repr__(self) -> str:
        b = getattr(self, "_broadcast", None)
        name = b.name if b is not None else "?"
        state = "closed" if self.closed else f"slot {self.slot}, next seq {self.next_seq}"
        return f"<Subscriber of {name!r} {state}>"


# ---------------------------------------------------------------------------------------------
# numpy frames: dtype and shape travel with the data (the same frame as Queue.put_array, so an
# array message can be forwarded between channels)
# ---------------------------------------------------------------------------------------------

_ARRAY_MAGIC = b"SKA1"
_ARRAY_HEAD = struct.Struct("<4sBBHQ")  # magic, ndim, dtype kind, dtype text length, nbytes


def _array_header(arr) -> bytes:
    """The header of an array message, padded to 16 bytes; the C-order data follows it."""
    import numpy as np

    if arr.dtype.hasobject:
        raise TypeError("arrays of Python objects cannot be sent; use a numeric or structured "
                        "dtype")
    if arr.ndim > 255:
        raise ValueError(f"at most 255 dimensions can be sent, not {arr.ndim}")
    if arr.dtype.fields is None and arr.dtype.subdtype is None:
        kind, text = 0, arr.dtype.str.encode()
    else:
        kind, text = 1, repr(np.lib.format.dtype_to_descr(arr.dtype)).encode()
    head = (_ARRAY_HEAD.pack(_ARRAY_MAGIC, arr.ndim, kind, len(text), arr.nbytes)
            + struct.pack(f"<{arr.ndim}Q", *arr.shape) + text)
    return head + b"\0" * (_round_up(len(head), 16) - len(head))


def _parse_array(buf, owner: str) -> tuple:
    """(dtype, shape, data offset, nbytes) of an array message; ValueError if it is not one.

    The frame comes from shared memory, which any process with write access may have
    scribbled on: every field is checked, and the dtype text is parsed by `_frames.parse_descr`
    (bounded depth and size), never evaluated. `owner` names the channel in messages.
    """
    import numpy as np

    size = len(buf)
    bad = f"the message from {owner} is not an array message"
    if size < _ARRAY_HEAD.size:
        raise ValueError(f"{bad} (too short)")
    magic, ndim, kind, tlen, nbytes = _ARRAY_HEAD.unpack_from(buf, 0)
    end = _ARRAY_HEAD.size + 8 * ndim + tlen
    if magic != _ARRAY_MAGIC or end > size or kind not in (0, 1):
        raise ValueError(f"{bad} (bad header)")
    shape = struct.unpack_from(f"<{ndim}Q", buf, _ARRAY_HEAD.size)
    try:
        text = bytes(buf[_ARRAY_HEAD.size + 8 * ndim:end]).decode("utf-8")
        if kind == 0:
            if not DTYPE_STR.fullmatch(text):
                raise ValueError("not a dtype string")
            dtype = np.dtype(text)
        else:
            dtype = np.lib.format.descr_to_dtype(parse_descr(text))
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, SyntaxError) as exc:
        # UnicodeDecodeError is a ValueError
        raise ValueError(f"{bad} (bad dtype: {exc})") from None
    start = _round_up(end, 16)
    if dtype.hasobject or _count(shape) * dtype.itemsize != nbytes or start + nbytes > size:
        raise ValueError(f"{bad} (shape {shape} and dtype {dtype} do not match its {size} "
                         f"bytes)")
    return dtype, tuple(shape), start, nbytes


# ---------------------------------------------------------------------------------------------
# Latest
# ---------------------------------------------------------------------------------------------


class Latest(_native.LatestCore):
    """The newest value of some state, for readers that poll: no queue, no waiting for readers.

    Any process may `set` a value (writers take turns on a small lock that is taken over if
    its holder dies); any number of readers `get` the newest complete value without blocking
    the writer and without ever seeing a torn value. Values are bytes up to `max_size`.
    `version` counts the values set so far, and `wait(version)` sleeps until a newer one.
    Pickles as its name.
    """

    @classmethod
    def create(cls, name: str, max_size: int, *, slots: int = 3, mode: int = 0o600,
               backend: str = "posix") -> "Latest":
        """Create a Latest holding values of up to `max_size` bytes.

        Args:
            slots: buffers (2..64). A reader copying a value is disturbed (and retries) only
                if `slots - 1` newer values are completed during its copy; more slots make
                retries rarer for large values written often.

        Raises:
            SegmentExistsError, ResourceLimitError: as `Segment.create`.
            ValueError, TypeError: bad arguments.
        """
        _check_name_kind(name)
        max_size = _int_arg(max_size, "max_size")
        slots = _int_arg(slots, "slots")
        if not 0 <= max_size <= 2**48:
            raise ValueError(f"max_size must be between 0 and 2**48 bytes, got {max_size}")
        if not 2 <= slots <= MAX_LATEST_SLOTS:
            raise ValueError(f"slots must be between 2 and {MAX_LATEST_SLOTS}, got {slots}")
        stride = 64 + _round_up(max_size, 64)

        def init(seg: Segment) -> None:
            _native.latest_format(seg.buf, max_size, slots)

        seg, header = layout.create_typed(name, Kind.LATEST, 64 + slots * stride,
                                          (max_size, slots, stride), init=init,
                                          backend=backend, mode=mode)
        try:
            return cls._wrap(seg, header, True)
        except BaseException:
            seg.unlink()
            seg.close()
            raise

    @classmethod
    def open(cls, name: str, *, backend: str = "posix", readonly: bool = False) -> "Latest":
        """Open an existing Latest by name. `readonly=True` maps it read-only (get only).

        Raises:
            SegmentNotFoundError, KindMismatchError, CorruptSegmentError: as `Broadcast.open`.
        """
        _check_name_kind(name)
        seg, header = layout.open_typed(name, Kind.LATEST, backend=backend, readonly=readonly)
        try:
            return cls._wrap(seg, header, not readonly)
        except BaseException:
            seg.close()
            raise

    @classmethod
    def _wrap(cls, seg: Segment, header: layout.Header, writable: bool) -> "Latest":
        max_size, slots, stride = _latest_geometry(seg, header)
        obj = cls.__new__(cls)
        obj._seg = seg
        obj._label = describe(seg.name, seg.backend)
        obj._attach(seg.buf, max_size, slots, seg.name, obj._label, writable)
        obj._max_size = max_size
        obj._slots = slots
        return obj

    @property
    def name(self) -> str:
        """The segment name."""
        return self._seg.name

    @property
    def backend(self) -> str:
        """'posix' or 'sysv'."""
        return self._seg.backend

    @property
    def max_size(self) -> int:
        """Largest value in bytes."""
        return self._max_size

    @property
    def slots(self) -> int:
        """Number of buffers."""
        return self._slots

    @property
    def segment(self) -> Segment:
        """The underlying segment."""
        return self._seg

    def set_array(self, array, timeout: float | None = None) -> None:
        """Set a numpy array as the value (dtype and shape travel with the data)."""
        import numpy as np

        arr = np.asarray(array)
        self.set(_array_header(arr) + arr.tobytes(), timeout)

    def set_nowait(self, data) -> None:
        """`set` without waiting for another writer (`WaitTimeoutError` if one is copying)."""
        self.set(data, 0)

    def set_array_nowait(self, array) -> None:
        """`set_array` without waiting for another writer."""
        self.set_array(array, 0)

    def get_array(self):
        """The newest value as a numpy array (written with `set_array`).

        Raises:
            Empty: no value yet.
            ValueError: the value is not an array.
        """
        import numpy as np

        raw = self.get()
        dtype, shape, start, _nbytes = _parse_array(raw, f"latest value {self._label}")
        out = np.frombuffer(raw, dtype, offset=start, count=_count(shape))
        return out.reshape(shape).copy()

    def stats(self) -> dict:
        """version, max_size, slots, size and write time of the newest value, the writer
        holding the lock (pid) if any, and locks taken from dead writers."""
        if self.closed:
            raise ValueError(f"latest value {self._label} is closed")
        return _latest_state(self._seg, self._max_size, self._slots)

    def close(self) -> None:
        """End this process's mapping. Closing twice is allowed."""
        self._close()
        self._seg.close()

    def unlink(self) -> None:
        """Remove the name so no new process can open it."""
        self._seg.unlink()

    def __enter__(self) -> "Latest":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __reduce__(self):
        return (_open_latest, (self._seg.name, self._seg.backend, self._seg.readonly))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"version {self.version}"
        return f"<Latest {self._seg.name!r} backend={self._seg.backend} {state}>"


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _open_latest(name: str, backend: str, readonly: bool) -> Latest:
    return Latest.open(name, backend=backend, readonly=readonly)


def _latest_geometry(seg: Segment, header: layout.Header) -> tuple[int, int, int]:
    max_size, slots, stride = header.params[:3]
    if not (2 <= slots <= MAX_LATEST_SLOTS and max_size <= 2**48
            and stride == 64 + _round_up(max_size, 64)
            and layout.PAYLOAD_OFFSET + 64 + slots * stride == seg.size):
        raise CorruptSegmentError(
            f"latest value {describe(seg.name, seg.backend)} has impossible sizes in its "
            f"header; remove it with `shmkit rm {seg.name}` and create it again")
    return max_size, slots, stride


# ---------------------------------------------------------------------------------------------
# state snapshots (also for `shmkit inspect`)
# ---------------------------------------------------------------------------------------------


def _read_pair(buf, offset: int) -> tuple[int, int]:
    """A consistent {seq, pos} pair at `offset` (idx, then two {seq, pos} slots)."""
    for _ in range(1000):
        idx = struct.unpack_from("<Q", buf, offset)[0]
        seq, pos = struct.unpack_from("<QQ", buf, offset + 8 + 16 * (idx & 1))
        if struct.unpack_from("<Q", buf, offset)[0] == idx:
            return seq, pos
    return seq, pos


def _broadcast_state(seg: Segment, geom: _Geometry) -> dict:
    buf = seg.buf
    (magic, _version, *_rest) = _GEOMETRY.unpack_from(buf, _CTRL)
    if magic != _MAGIC:
        raise CorruptSegmentError(f"broadcast {describe(seg.name, seg.backend)} has no control "
                                  f"block magic; remove it with `shmkit rm {seg.name}`")
    (pub_word, _pub_start, claims, takeovers, ended, pub_waiting, _wait_pos, _space,
     sub_high, evictions) = _PUBLISHER.unpack_from(buf, _CTRL + 64)
    (_head_pos, _event, _wake, *_pair, published_bytes) = _HEAD.unpack_from(buf, _CTRL + 128)
    head_seq, head_pos = _read_pair(buf, _CTRL + 128 + 16)
    tail_seq, tail_pos = _read_pair(buf, _CTRL + 192 + 8)
    pub_pid = pub_word >> 32
    publisher = None
    if pub_pid:
        publisher = {"pid": pub_pid, "alive": _native.task_alive(pub_pid),
                     "waiting": bool(pub_waiting)}
    subscribers = []
    for i in range(min(sub_high, geom.max_subscribers)):
        (word, read_pos, read_seq, drops, start_seq, _proc_start, joined_ns, waiting,
         tid) = _SLOT.unpack_from(buf, _TABLE + _SLOT_SIZE * i)
        state = word & 0xFF
        if state == 0:
            continue
        pid = word >> 32
        subscribers.append({
            "slot": i, "pid": pid, "tid": tid, "alive": _native.task_alive(pid),
            "state": _STATES.get(state, f"invalid ({state})"),
            "position": read_seq, "lag": max(0, head_seq - read_seq), "drops": drops,
            "received": max(0, read_seq - start_seq - drops), "sleeping": bool(waiting),
            "joined_ns": joined_ns,
        })
    grace = None if geom.grace_ns >= 2**63 - 1 else geom.grace_ns / 1e9
    return {
        "policy": geom.policy, "capacity": geom.capacity, "max_message": geom.max_message,
        "max_subscribers": geom.max_subscribers, "grace": grace,
        "published": head_seq, "published_bytes": published_bytes,
        "retained": max(0, head_seq - tail_seq), "retained_bytes": max(0, head_pos - tail_pos),
        "oldest_seq": tail_seq, "ended": bool(ended),
        "publisher": publisher, "publisher_claims": claims, "takeovers": takeovers,
        "evictions": evictions,
        "sleeping_subscribers": sum(s["sleeping"] for s in subscribers),
        "subscribers": subscribers,
    }


def _latest_state(seg: Segment, max_size: int, slots: int) -> dict:
    buf = seg.buf
    (magic, _v, _max, _slots, _r0, _stride, latest, writer, writer_pid, _wake, _r1,
     steals) = _LATEST_CTRL.unpack_from(buf, _CTRL)
    if magic != _LATEST_MAGIC:
        raise CorruptSegmentError(f"latest value {describe(seg.name, seg.backend)} has no "
                                  f"control block magic; remove it with `shmkit rm {seg.name}`")
    size = written_ns = None
    if latest:
        _seq, size, written_ns = _LATEST_SLOT.unpack_from(
            buf, _CTRL + 64 + (latest % slots) * (64 + _round_up(max_size, 64)))
    return {
        "version": latest, "max_size": max_size, "slots": slots,
        "size": size, "written_ns": written_ns,
        "writer_pid": writer_pid if writer else None, "steals": steals,
    }


def describe_state(seg: Segment, header: layout.Header) -> dict:
    """Live state for `shmkit inspect` of a Broadcast or a Latest (read-only segment is fine).

    Raises:
        CorruptSegmentError: the sizes or control block are damaged.
    """
    if header.kind == Kind.LATEST:
        max_size, slots, _stride = _latest_geometry(seg, header)
        return _latest_state(seg, max_size, slots)
    return _broadcast_state(seg, _Geometry(seg, header))


__all__ = ["Broadcast", "Latest", "Publisher", "Subscriber", "describe_state", "POLICIES",
           "DEFAULT_GRACE"]
