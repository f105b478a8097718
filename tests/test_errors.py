"""The one exception hierarchy: classes, errno translation, messages, pickling."""

from __future__ import annotations

import errno
import pickle
import queue

import pytest

import shmkit
from shmkit import Segment, errors
from shmkit.errors import (
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
    describe,
    format_size,
    from_oserror,
)

BUILTIN_OF = {
    SegmentNotFoundError: FileNotFoundError,
    SegmentExistsError: FileExistsError,
    SegmentPermissionError: PermissionError,
    ResourceLimitError: OSError,
    SegmentOSError: OSError,
    SegmentBusyError: BufferError,
    WaitTimeoutError: TimeoutError,
    KindMismatchError: TypeError,
    LockNotOwnedError: RuntimeError,
    MessageTooLargeError: ValueError,
    Empty: queue.Empty,
    Full: queue.Full,
    CorruptSegmentError: Exception,
    QueueClosed: Exception,
}


@pytest.mark.parametrize("cls", list(BUILTIN_OF), ids=lambda c: c.__name__)
def test_every_error_is_a_shmkit_error_and_its_builtin(cls):
    assert issubclass(cls, ShmkitError) and issubclass(cls, BUILTIN_OF[cls])
    assert getattr(shmkit, cls.__name__) is cls  # exported at the top level
    assert cls.__name__ in shmkit.__all__
    assert cls.__doc__ and len(cls.__doc__.strip()) > 20  # says when it is raised


def test_every_exception_in_errors_is_a_documented_shmkit_error():
    defined = {obj for obj in vars(errors).values()
               if isinstance(obj, type) and issubclass(obj, BaseException)
               and obj.__module__ == errors.__name__}
    assert set(BUILTIN_OF) | {ShmkitError} <= defined
    for cls in defined:
        assert issubclass(cls, ShmkitError), cls
        assert cls.__doc__ and len(cls.__doc__.strip()) > 20, cls


@pytest.mark.parametrize("code, backend, action, cls", [
    (errno.ENOENT, "posix", "open", SegmentNotFoundError),
    (errno.ENOENT, "sysv", "open", SegmentNotFoundError),
    (errno.EIDRM, "sysv", "open", SegmentNotFoundError),
    (errno.EINVAL, "sysv", "open", SegmentNotFoundError),  # shmat/shmctl: id gone meanwhile
    (errno.EEXIST, "posix", "create", SegmentExistsError),
    (errno.EEXIST, "sysv", "create", SegmentExistsError),
    (errno.EACCES, "posix", "open", SegmentPermissionError),
    (errno.EPERM, "sysv", "remove", SegmentPermissionError),
    (errno.ENOSPC, "posix", "create", ResourceLimitError),
    (errno.ENOSPC, "sysv", "create", ResourceLimitError),
    (errno.ENOMEM, "memfd", "create", ResourceLimitError),
    (errno.EFBIG, "posix", "create", ResourceLimitError),
    (errno.EMFILE, "posix", "open", ResourceLimitError),
    (errno.ENFILE, "sysv", "open", ResourceLimitError),
    (errno.EINVAL, "sysv", "create", ResourceLimitError),  # shmget: above kernel.shmmax
    (errno.EINVAL, "posix", "create", SegmentOSError),
    (errno.EISDIR, "posix", "open", SegmentOSError),
])
def test_errno_maps_to_one_class(code, backend, action, cls):
    e = from_oserror(OSError(code, "text"), action=action, name="frames", backend=backend)
    assert type(e) is cls
    assert (e.errno, e.filename) == (code, "frames")
    assert e.strerror.startswith(f"cannot {action} segment 'frames' ({backend}): ")
    assert not e.strerror.endswith(".")


@pytest.mark.parametrize("code, fragments", [
    (errno.ENOENT, ["no such segment", "`shmkit ls`"]),
    (errno.EEXIST, ["already exists", "`shmkit rm frames`"]),
    (errno.EACCES, ["permission denied", "open it readonly"]),
    (errno.EMFILE, ["too many open files", "ulimit -n"]),
])
def test_messages_say_why_and_what_fixes_it(code, fragments):
    e = from_oserror(OSError(code, "x"), action="open", name="frames", backend="posix")
    for fragment in fragments:
        assert fragment in e.strerror


def test_resource_messages_name_the_limit_and_where_to_read_it():
    posix = from_oserror(OSError(errno.ENOSPC, "No space left on device"), action="create",
                         name="frames", backend="posix", size=2 << 30)
    assert posix.strerror.startswith("cannot create segment 'frames' (posix, 2 GiB): ")
    assert "df -h /dev/shm" in posix.strerror and "shmkit gc" in posix.strerror
    sysv = from_oserror(OSError(errno.EINVAL, "Invalid argument"), action="create",
                        name="frames", backend="sysv", size=2 << 30)
    for limit in ("/proc/sys/kernel/shmmax", "/proc/sys/kernel/shmmni",
                  "/proc/sys/kernel/shmall", "backend='posix'"):
        assert limit in sysv.strerror


def test_a_precise_reason_replaces_the_generic_one_but_not_the_class():
    e = from_oserror(OSError(errno.ENOSPC, "x"), action="create", name="frames",
                     backend="sysv", size=4096, reason="exceeds kernel.shmall (1 page)")
    assert type(e) is ResourceLimitError
    assert e.strerror == "cannot create segment 'frames' (sysv, 4 KiB): exceeds kernel.shmall (1 page)"


def test_unknown_errno_keeps_the_system_text():
    e = from_oserror(OSError(errno.EROFS, "Read-only file system"), action="create",
                     name="frames", backend="posix")
    assert type(e) is SegmentOSError and e.strerror.endswith(": Read-only file system")
    bare = from_oserror(OSError(errno.EROFS, None), action="create", name="f", backend="posix")
    assert bare.strerror.endswith("Read-only file system")


def test_real_failures_chain_the_original_error(seg_name):
    with pytest.raises(SegmentNotFoundError) as info:
        Segment.open(seg_name)
    cause = info.value.__cause__
    assert type(cause) is FileNotFoundError and cause.errno == errno.ENOENT
    try:
        Segment.open(seg_name, backend="sysv")
    except FileNotFoundError as e:  # code that knows nothing of shmkit still works
        assert isinstance(e, ShmkitError)


@pytest.mark.parametrize("error", [
    SegmentNotFoundError(errno.ENOENT, "cannot open segment 'f' (posix): no such segment", "f"),
    SegmentExistsError(errno.EEXIST, "cannot create segment 'f' (posix): it exists", "f"),
    SegmentPermissionError(errno.EACCES, "cannot open segment 'f' (sysv): denied", "f"),
    ResourceLimitError(errno.ENOSPC, "cannot create segment 'f' (posix, 1 GiB): full", "f"),
    SegmentOSError(errno.EIO, "cannot open segment 'f' (posix): I/O error", "f"),
    CorruptSegmentError("segment 'f' (posix) is not a shmkit object"),
    KindMismatchError("segment 'f' (posix) is a Queue, not a Mutex"),
    SegmentBusyError("cannot close segment 'f' (posix): views are alive"),
    WaitTimeoutError("timed out"),
    Empty("empty"),
], ids=lambda e: type(e).__name__)
def test_errors_survive_pickling_for_multiprocessing(error):
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error) and str(clone) == str(error)
    if isinstance(error, OSError):
        assert (clone.errno, clone.strerror, clone.filename) == \
            (error.errno, error.strerror, error.filename)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (100, "100 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"),
    (4096, "4 KiB"), (32 << 20, "32 MiB"), (2 << 30, "2 GiB"), (3 << 40, "3 TiB"),
    (5000 << 40, "5000 TiB"),
])
def test_format_size_uses_binary_units(n, text):
    assert format_size(n) == text


def test_describe_names_segment_and_backend():
    assert describe("frames", "sysv") == "'frames' (sysv)"
