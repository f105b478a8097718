"""shmkit: inter-process communication through shared memory on Linux.

Public names only; each lives in the module named in docs/architecture.md.
"""

from .errors import (
    CorruptSegmentError,
    Empty,
    EvictedError,
    Full,
    KindMismatchError,
    LaggedError,
    LockNotOwnedError,
    MessageTooLargeError,
    PublisherExistsError,
    QueueClosed,
    ResourceLimitError,
    SegmentBusyError,
    SegmentExistsError,
    SegmentNotFoundError,
    SegmentOSError,
    SegmentPermissionError,
    SharedDictFullError,
    ShmkitError,
    WaitTimeoutError,
)
from .broadcast import Broadcast, Latest
from .dict import SharedDict
from .queue import Queue
from .segment import Segment, sysv_key
from .sync import (
    AtomicInt,
    AtomicU32,
    Barrier,
    BrokenBarrierError,
    Condition,
    Event,
    Mutex,
    RWLock,
    Semaphore,
)

__version__ = "0.1.0"


def __getattr__(name):
    # SharedArray needs numpy: import it (and numpy) only when first used.
    if name == "SharedArray":
        from .array import SharedArray
        return SharedArray
    raise AttributeError(f"module 'shmkit' has no attribute {name!r}")


__all__ = [
    "Broadcast",
    "EvictedError",
    "LaggedError",
    "Latest",
    "PublisherExistsError",
    "AtomicInt",
    "AtomicU32",
    "Barrier",
    "BrokenBarrierError",
    "Condition",
    "CorruptSegmentError",
    "Empty",
    "Event",
    "Full",
    "KindMismatchError",
    "LockNotOwnedError",
    "MessageTooLargeError",
    "Mutex",
    "Queue",
    "QueueClosed",
    "RWLock",
    "ResourceLimitError",
    "Segment",
    "SegmentBusyError",
    "SegmentExistsError",
    "SegmentNotFoundError",
    "SegmentOSError",
    "SegmentPermissionError",
    "Semaphore",
    "SharedArray",
    "SharedDict",
    "SharedDictFullError",
    "ShmkitError",
    "WaitTimeoutError",
    "sysv_key",
]
