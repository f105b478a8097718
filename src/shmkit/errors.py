"""Every exception shmkit raises, and the one place errno becomes an exception (lowest layer).

Each class also inherits the matching builtin, so ``except FileNotFoundError`` keeps working
for code that does not know shmkit. ``OSError`` subclasses are built as
``(errno, message, name)`` so that ``e.errno`` and ``e.filename`` are set.
"""

from __future__ import annotations

import errno as _errno
import os as _os
import queue as _queue


class ShmkitError(Exception):
    """Base of every failure shmkit reports about the system or a segment."""


class SegmentNotFoundError(ShmkitError, FileNotFoundError):
    """The named segment does not exist: create it first, or check the name and backend."""


class SegmentExistsError(ShmkitError, FileExistsError):
    """A segment with that name already exists: open it, pick another name, or `shmkit rm` it."""


class SegmentPermissionError(ShmkitError, PermissionError):
    """The segment's mode or owner does not allow this access: ask its owner, or open readonly."""


class ResourceLimitError(ShmkitError, OSError):
    """A system limit was hit (memory, /dev/shm space, shmmax, shmmni, open files).

    The message names the limit and where to read or raise it.
    """


class SegmentBusyError(ShmkitError, BufferError):
    """The mapping cannot be closed while views of it (memoryviews, arrays, locks) are alive.

    Release those views (``del`` them or leave their ``with`` block), then close again.
    """


class WaitTimeoutError(ShmkitError, TimeoutError):
    """A blocking call gave up after its timeout."""


class CorruptSegmentError(ShmkitError):
    """The segment's contents are not what shmkit wrote: foreign, damaged, or half-initialised.

    Shared memory is untrusted input; shmkit checks it and raises this instead of crashing.
    Remove the segment with `shmkit rm NAME` and create it again.
    """


class KindMismatchError(ShmkitError, TypeError):
    """The segment holds another kind of shmkit object (a Queue opened as a Mutex, ...)."""


class LockNotOwnedError(ShmkitError, RuntimeError):
    """A lock was released by a thread that does not hold it."""


class MessageTooLargeError(ShmkitError, ValueError):
    """A message is larger than the channel's limit: split it or create a larger channel."""


class Empty(ShmkitError, _queue.Empty):
    """A non-blocking or timed get found no message."""


class Full(ShmkitError, _queue.Full):
    """A non-blocking or timed put found no room."""


class SharedDictFullError(ShmkitError):
    """A SharedDict has no room for a new entry: its heap or its key limit is used up.

    The message names how many bytes (or keys) are used and how to get more room: delete
    keys, or create the dict again with a larger ``capacity_bytes`` or ``max_keys``.
    """


class QueueClosed(ShmkitError):
    """The channel was closed by its producers and every message has been drained."""


class LaggedError(ShmkitError):
    """A Broadcast subscriber fell behind and the publisher overwrote messages it had not read.

    Raised by receive calls under the "overwrite" policy. ``missed`` is the exact number of
    messages skipped; the subscriber has already moved on to the oldest retained message, so
    the next receive returns it. Read faster, batch with ``receive_many``, create the
    broadcast with a larger capacity, or use the "block" policy.
    """

    def __init__(self, message: str = "", missed: int = 0) -> None:
        super().__init__(message)
        self.missed = missed

    def __reduce__(self):
        return (type(self), (str(self), self.missed))


class EvictedError(ShmkitError):
    """A Broadcast subscriber lost its slot: the publisher evicted it ("block" policy).

    It happens when the publisher waited on the subscriber for longer than the grace period
    without progress. Subscribe again to continue from the newest messages.
    """


class PublisherExistsError(ShmkitError):
    """The Broadcast already has a live publisher, or this process lost the publisher role.

    Only one publisher may hold the role at a time; a dead holder's role is taken over
    automatically by the next ``publisher()`` call. Close the other publisher first.
    """


def describe(name: str, backend: str) -> str:
    """The way every message names a segment: `'frames' (posix)`."""
    return f"{name!r} ({backend})"


def _limit_hint(backend: str) -> str:
    if backend == "sysv":
        return ("System V limits: size per segment /proc/sys/kernel/shmmax, segments "
                "/proc/sys/kernel/shmmni, total pages /proc/sys/kernel/shmall; raise them with sysctl "
                "or use backend='posix'")
    return "free space in /dev/shm (see `df -h /dev/shm`) and memory; remove unused segments with `shmkit gc`"


def from_oserror(exc: OSError, *, action: str, name: str, backend: str,
                 size: int | None = None, reason: str | None = None) -> ShmkitError:
    """Translate an OSError from a segment operation into the matching shmkit exception.

    The class follows ``exc.errno`` (see `_class_for`); the message says what was tried, on
    which segment, why it failed and what fixes it.

    Args:
        exc: the error raised by the syscall.
        action: what was tried, as a verb phrase ("create", "open", "remove").
        name: the segment name (or key for System V).
        backend: "posix", "sysv" or "memfd".
        size: the requested size in bytes, when it matters.
        reason: the caller's more precise explanation (which limit, how much is free),
            replacing the generic one for this errno.

    Returns:
        An exception to raise ``from exc``.
    """
    what = f"cannot {action} segment {describe(name, backend)}"
    if size is not None:
        what = f"cannot {action} segment {name!r} ({backend}, {format_size(size)})"
    code = exc.errno
    cls = _class_for(code, backend, action)
    if reason is None:
        reason = _default_reason(cls, code, name, backend, exc.strerror)
    return cls(code, f"{what}: {reason}", name)


class SegmentOSError(ShmkitError, OSError):
    """Any other operating-system failure on a segment; the message carries errno's text."""


def _class_for(code: int | None, backend: str, action: str) -> type:
    """The shmkit exception class for an errno: the one errno -> class table."""
    if code in (_errno.ENOENT, _errno.EIDRM):
        return SegmentNotFoundError
    if code == _errno.EEXIST:
        return SegmentExistsError
    if code in (_errno.EACCES, _errno.EPERM):
        return SegmentPermissionError
    if code in (_errno.ENOSPC, _errno.ENOMEM, _errno.EFBIG, _errno.EMFILE, _errno.ENFILE):
        return ResourceLimitError
    if code == _errno.EINVAL and backend == "sysv":
        # shmget(2) while creating: the size is below SHMMIN or above kernel.shmmax.
        # shmctl(2)/shmat(2) on an existing id: the id is no longer valid (removed meanwhile).
        return ResourceLimitError if action == "create" else SegmentNotFoundError
    return SegmentOSError


def _default_reason(cls: type, code: int | None, name: str, backend: str,
                    strerror: str | None) -> str:
    if cls is SegmentNotFoundError:
        return "no such segment; create it first or check the name and backend (`shmkit ls` lists segments)"
    if code == _errno.EEXIST:
        return f"it already exists; open it, choose another name, or remove it with `shmkit rm {name}`"
    if code in (_errno.EACCES, _errno.EPERM):
        return "permission denied by its mode or owner; ask its owner to widen the mode, or open it readonly"
    if code in (_errno.ENOSPC, _errno.ENOMEM, _errno.EFBIG):
        return f"not enough shared memory ({strerror}); check {_limit_hint(backend)}"
    if code in (_errno.EMFILE, _errno.ENFILE):
        return "too many open files; raise `ulimit -n` or close segments you no longer use"
    if code == _errno.EINVAL and backend == "sysv":
        return f"size is outside the kernel's limits; check {_limit_hint(backend)}"
    return strerror or (_os.strerror(code) if code else "unknown error")


def format_size(n: int) -> str:
    """Human size with binary units, as used in messages and the CLI: `2 GiB`, `4 KiB`, `100 B`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            if unit == "B" or n == int(n):
                return f"{int(n)} {unit}"
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
