"""shmkit: inter-process communication through shared memory on Linux.

Public names only; each lives in the module named in docs/architecture.md.
"""

from .errors import (
    CorruptSegmentError,
    Empty,
    Full,
    KindMismatchError,
    LockNotOwnedError,
    MessageTooLargeError,
    QueueClosed,
    ResourceLimitError,
    SegmentBusyError,
    SegmentExistsError,
    SegmentNotFoundError,
    SegmentOSError,
    SegmentPermissionError,
    ShmkitError,
    WaitTimeoutError,
)
from .segment import Segment, sysv_key

__version__ = "0.1.0"

__all__ = [
    "CorruptSegmentError",
    "Empty",
    "Full",
    "KindMismatchError",
    "LockNotOwnedError",
    "MessageTooLargeError",
    "QueueClosed",
    "ResourceLimitError",
    "Segment",
    "SegmentBusyError",
    "SegmentExistsError",
    "SegmentNotFoundError",
    "SegmentOSError",
    "SegmentPermissionError",
    "ShmkitError",
    "WaitTimeoutError",
    "sysv_key",
]
