"""Named shared memory segments on two backends, POSIX and System V (segment layer).

A `Segment` is a plain block of shared bytes: no header, so C programs and
`multiprocessing.shared_memory.SharedMemory` see exactly the bytes shmkit sees. Typed shmkit
objects add a header on top (see layout.py).

Backends:
    posix  `shm_open` + `mmap`; the name is the file /dev/shm/NAME (interoperates with
           `SharedMemory(NAME)` and any C program calling ``shm_open("/NAME")``).
    sysv   `shmget` + `shmat`; the key is `key=` or derived from the name by `sysv_key`.
           `unlink()` is IPC_RMID: the key is gone at once, the memory when the last process
           detaches.
    memfd  `Segment.anonymous(size)`: nameless memory for fork/spawn children.

Lifetime is explicit: nothing here ever removes a segment unless asked (`unlink()`,
`unlink_on_close=True`, `shmkit rm`, `shmkit gc`). There is no resource tracker.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat as _stat
import sys
import threading
import time

import _posixshmem

from . import _native, _proc
from .errors import (
    CorruptSegmentError,
    ResourceLimitError,
    SegmentBusyError,
    SegmentExistsError,
    SegmentNotFoundError,
    describe,
    format_size,
    from_oserror,
)

BACKENDS = ("posix", "sysv")
NAME_MAX = 200  # bytes of UTF-8; /dev/shm allows 255, we keep room for prefixes of tools

# How long `open` waits for a POSIX segment that exists but still has size 0: its creator
# sizes it only once all of its memory is allocated (see `_create_posix`).
OPEN_SIZE_WAIT_SECONDS = 1.0
# How long `open_or_create` keeps retrying while other processes create and remove the name.
OPEN_OR_CREATE_SECONDS = 5.0

_SYSV_KEY_SALT = b"shmkit:"


def validate_name(name: object) -> str:
    """Check a segment name before any syscall and return it.

    Rules: a non-empty `str` of at most 200 UTF-8 bytes, without '/' or NUL, and not '.' or
    '..'. The same name works on both backends.

    Raises:
        TypeError: the name is not a str.
        ValueError: the name breaks a rule; the message names the rule.
    """
    if not isinstance(name, str):
        raise TypeError(f"segment name must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError("segment name must not be empty")
    if "/" in name:
        raise ValueError(f"segment name {name!r} must not contain '/'")
    if "\0" in name:
        raise ValueError(f"segment name {name!r} must not contain NUL characters")
    if name in (".", ".."):
        raise ValueError(f"segment name {name!r} is reserved")
    if len(name.encode()) > NAME_MAX:
        raise ValueError(f"segment name is {len(name.encode())} bytes long; the limit is {NAME_MAX}")
    return name


def validate_backend(backend: object) -> str:
    """Check that `backend` is 'posix' or 'sysv' and return it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    return backend  # type: ignore[return-value]


def validate_mode(mode: object) -> int:
    """Check a permission mode (an int within 0o777) and return it."""
    if not isinstance(mode, int) or isinstance(mode, bool):
        raise TypeError(f"mode must be an int such as 0o600, not {type(mode).__name__}")
    if not 0 <= mode <= 0o777:
        raise ValueError(f"mode must be within 0o000..0o777, not {oct(mode)}")
    return mode


def validate_size(size: object) -> int:
    """Check a segment size (a positive int that fits the address space) and return it."""
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"size must be an int number of bytes, not {type(size).__name__}")
    if size <= 0:
        raise ValueError(f"size must be at least 1 byte, not {size}")
    if size > sys.maxsize:
        raise ValueError(f"size must be at most {sys.maxsize} bytes, not {size}")
    return size


def validate_key(key: object) -> int:
    """Check a System V key and return it as the signed 32-bit value the kernel shows.

    Any non-zero 32-bit value, written signed (-2**31..2**31-1) or unsigned (..2**32-1).
    0 is IPC_PRIVATE, which would create a new unnamed segment on every call.

    Raises:
        TypeError: the key is not an int.
        ValueError: the key is 0 or does not fit in 32 bits.
    """
    if not isinstance(key, int) or isinstance(key, bool):
        raise TypeError(f"key must be an int System V key, not {type(key).__name__}")
    if not -2**31 <= key < 2**32:
        raise ValueError(f"key must fit in 32 bits (-2**31..2**32-1), not {key}")
    if key == 0:
        raise ValueError("key must not be 0 (IPC_PRIVATE makes a new unnamed segment every time)")
    return key - 2**32 if key >= 2**31 else key


def _validate_owner(value: object, what: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int or None, not {type(value).__name__}")
    if not 0 <= value < 2**32 - 1:
        raise ValueError(f"{what} must be within 0..{2**32 - 2}, not {value}")
    return value


def sysv_key(name: str) -> int:
    """The System V key shmkit derives from a name: a stable, documented rule.

    key = the first 4 bytes of BLAKE2b(b"shmkit:" + UTF-8 name), read as a signed big-endian
    int; 0 (IPC_PRIVATE) becomes 1. Any program can compute it, in any language.
    """
    digest = hashlib.blake2b(_SYSV_KEY_SALT + validate_name(name).encode(), digest_size=4).digest()
    key = int.from_bytes(digest, "big", signed=True)
    return key or 1


def _posix_path(name: str) -> str:
    return "/" + name


class Segment:
    """A block of shared memory mapped into this process.

    Create one with `Segment.create`, attach to an existing one with `Segment.open`, or make a
    nameless one for child processes with `Segment.anonymous`. Several processes (related or
    not) that open the same name see the same bytes through `buf`.

    A Segment is safe to share between threads; `close()` ends only this process's mapping.
    """

    def __init__(self, *, name: str, backend: str, size: int, readonly: bool,
                 mapping, fd: int | None = None, shmid: int | None = None,
                 key: int | None = None, unlink_on_close: bool = False) -> None:
        """Internal: use `create`, `open`, `open_or_create` or `anonymous`."""
        self._name = name
        self._backend = backend
        self._size = size
        self._readonly = readonly
        self._mapping = mapping
        self._fd = fd
        self._shmid = shmid
        self._key = key
        self._unlink_on_close = unlink_on_close
        # unlink_on_close belongs to this process: a forked child closing its inherited copy
        # must not remove the name under its parent
        self._owner_pid = os.getpid()
        self._buf: memoryview | None = memoryview(mapping)
        self._lock = threading.Lock()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, size: int, *, backend: str = "posix", mode: int = 0o600,
               uid: int | None = None, gid: int | None = None, key: int | None = None,
               unlink_on_close: bool = False) -> "Segment":
        """Create a new segment of `size` bytes and map it read-write.

        The segment gets exactly `mode`, whatever the umask, and optionally the owner
        `uid`/`gid` (POSIX: needs root or CAP_CHOWN; System V: the creator may give it to
        anyone). POSIX memory is allocated now: if /dev/shm cannot hold `size` bytes this
        raises instead of crashing with SIGBUS on first touch later; an `open` racing with
        the allocation waits for it. Contents start zeroed. Any process may open it as soon as
        this returns; it lives until someone unlinks it.

        Args:
            name: see `validate_name`.
            size: bytes; the exact value is reported by `.size` in every process.
            backend: "posix" or "sysv".
            mode: permission bits, default owner-only 0o600.
            uid, gid: owner to set after creation (None keeps the caller's).
            key: System V only: use this key instead of `sysv_key(name)`.
            unlink_on_close: remove the name when this object closes (opt-in only).

        Raises:
            SegmentExistsError: the name (or key) is taken.
            ResourceLimitError: not enough memory or a kernel limit (the message names it).
            SegmentPermissionError: chown was not permitted.
            ValueError, TypeError: bad arguments, before any syscall.
        """
        validate_name(name)
        validate_size(size)
        validate_mode(mode)
        validate_backend(backend)
        uid = _validate_owner(uid, "uid")
        gid = _validate_owner(gid, "gid")
        if key is not None:
            if backend != "sysv":
                raise ValueError("key= is only meaningful with backend='sysv'")
            key = validate_key(key)
        if backend == "posix":
            return cls._create_posix(name, size, mode, uid, gid, unlink_on_close)
        return cls._create_sysv(name, size, mode, uid, gid, key, unlink_on_close)

    @classmethod
    def _create_posix(cls, name, size, mode, uid, gid, unlink_on_close) -> "Segment":
        path = _posix_path(name)
        try:
            fd = _posixshmem.shm_open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
        except OSError as exc:
            raise from_oserror(exc, action="create", name=name, backend="posix", size=size) from exc
        step = "mode"
        try:
            os.fchmod(fd, mode)  # the umask may have cleared bits the caller asked for
            if uid is not None or gid is not None:
                step = "owner"
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            # Allocate before the size is visible: fallocate(2) on tmpfs sets the size only
            # once every page exists, so an opener sees size 0 (and waits) or the whole
            # segment, and nobody can map pages that later fail with SIGBUS.
            step = "allocate"
            os.posix_fallocate(fd, 0, size)
            os.ftruncate(fd, size)  # already that size; kept for file systems that emulate
            step = "map"
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            _discard_posix(fd, path)
            reason = None
            if step == "owner" and exc.errno in (errno.EPERM, errno.EACCES):
                reason = _chown_reason(uid, gid)
            elif step == "allocate" and exc.errno in (errno.ENOSPC, errno.EFBIG):
                reason = _dev_shm_reason(size)
            raise from_oserror(exc, action="create", name=name, backend="posix", size=size,
                               reason=reason) from exc
        except BaseException:
            _discard_posix(fd, path)
            raise
        return cls(name=name, backend="posix", size=size, readonly=False, mapping=mapping, fd=fd,
                   unlink_on_close=unlink_on_close)

    @classmethod
    def _create_sysv(cls, name, size, mode, uid, gid, key, unlink_on_close) -> "Segment":
        key = sysv_key(name) if key is None else key
        try:
            # shmget(2) ignores the umask: the segment gets exactly `mode` from the start
            shmid = _native.shmget(key, size, _native.IPC_CREAT | _native.IPC_EXCL | mode)
        except OSError as exc:
            raise from_oserror(exc, action="create", name=name, backend="sysv", size=size,
                               reason=_sysv_create_reason(exc.errno, name, key, size)) from exc
        try:
            if uid is not None or gid is not None:
                info = _native.shm_stat(shmid)
                _native.shm_set(shmid, info["uid"] if uid is None else uid,
                                info["gid"] if gid is None else gid, mode)
            mapping = _native.SysVAttachment(shmid, readonly=False)
        except OSError as exc:
            _discard_sysv(shmid)
            raise from_oserror(exc, action="create", name=name, backend="sysv", size=size) from exc
        except BaseException:
            _discard_sysv(shmid)
            raise
        return cls(name=name, backend="sysv", size=size, readonly=False, mapping=mapping,
                   shmid=shmid, key=key, unlink_on_close=unlink_on_close)

    @classmethod
    def open(cls, name: str, *, backend: str = "posix", readonly: bool = False,
             key: int | None = None, unlink_on_close: bool = False) -> "Segment":
        """Map an existing segment by name (or System V key).

        Any process may open it, related to its creator or not, if the segment's mode allows
        it. `readonly=True` maps it read-only: writes through `buf` raise TypeError, never
        crash. A POSIX segment whose creator is still allocating it has size 0 until it is
        done; `open` waits up to `OPEN_SIZE_WAIT_SECONDS` for it.

        Args:
            name: see `validate_name`.
            backend: "posix" or "sysv".
            readonly: map without write permission (needs only read permission).
            key: System V only: open this key instead of `sysv_key(name)`.
            unlink_on_close: remove the name when this object closes (opt-in only).

        Raises:
            SegmentNotFoundError: no segment has that name.
            SegmentPermissionError: the mode does not allow this access (the message shows
                the mode and owner).
            CorruptSegmentError: a POSIX segment that still has size 0 after the wait
                (foreign, or its creator died before sizing it).
            ValueError, TypeError: bad arguments, before any syscall.
        """
        validate_name(name)
        validate_backend(backend)
        if key is not None:
            if backend != "sysv":
                raise ValueError("key= is only meaningful with backend='sysv'")
            key = validate_key(key)
        if backend == "posix":
            return cls._open_posix(name, readonly, unlink_on_close)
        return cls._open_sysv(name, readonly, key, unlink_on_close)

    @classmethod
    def _open_posix(cls, name, readonly, unlink_on_close) -> "Segment":
        try:
            fd = _posixshmem.shm_open(_posix_path(name), os.O_RDONLY if readonly else os.O_RDWR, 0)
        except OSError as exc:
            reason = None
            if exc.errno == errno.EACCES:
                reason = _permission_reason(name, "posix", None, readonly)
            raise from_oserror(exc, action="open", name=name, backend="posix",
                               reason=reason) from exc
        try:
            size = _wait_for_size(fd)
            if size == 0:
                raise CorruptSegmentError(f"cannot open segment {describe(name, 'posix')}: it has "
                                          f"size 0 (its creator has not sized it yet, or died "
                                          f"before); remove it with `shmkit rm {name}`")
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        except OSError as exc:
            os.close(fd)
            raise from_oserror(exc, action="open", name=name, backend="posix") from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(name=name, backend="posix", size=size, readonly=readonly, mapping=mapping,
                   fd=fd, unlink_on_close=unlink_on_close)

    @classmethod
    def _open_sysv(cls, name, readonly, key, unlink_on_close) -> "Segment":
        key = sysv_key(name) if key is None else key
        try:
            shmid = _native.shmget(key, 0, 0)
            mapping = _native.SysVAttachment(shmid, readonly=readonly)
        except OSError as exc:
            reason = None
            if exc.errno == errno.EACCES:
                reason = _permission_reason(name, "sysv", key, readonly)
            raise from_oserror(exc, action="open", name=name, backend="sysv",
                               reason=reason) from exc
        return cls(name=name, backend="sysv", size=mapping.size, readonly=readonly,
                   mapping=mapping, shmid=shmid, key=key, unlink_on_close=unlink_on_close)

    @classmethod
    def open_or_create(cls, name: str, size: int, *, backend: str = "posix", mode: int = 0o600,
                       key: int | None = None, uid: int | None = None,
                       gid: int | None = None) -> "Segment":
        """Open `name` if it exists, otherwise create it with `size` bytes and `mode`.

        Safe against races: when several processes call it at once, exactly one creates and
        the others open what it created. `mode`, `uid` and `gid` apply only when this call
        creates the segment.

        Raises:
            SegmentExistsError: it exists but is smaller than `size`, or other processes kept
                creating and removing the name for several seconds.
            (and whatever `create` or `open` raise)
        """
        validate_name(name)
        validate_size(size)
        validate_mode(mode)
        validate_backend(backend)
        deadline = time.monotonic() + OPEN_OR_CREATE_SECONDS
        delay = 0.0005
        while True:
            try:
                return cls.create(name, size, backend=backend, mode=mode, key=key, uid=uid,
                                  gid=gid)
            except SegmentExistsError:
                pass
            try:
                seg = cls.open(name, backend=backend, key=key)
            except SegmentNotFoundError:
                # removed between our two calls: try to create it again
                if time.monotonic() >= deadline:
                    raise SegmentExistsError(
                        errno.EEXIST,
                        f"cannot open or create segment {describe(name, backend)}: it keeps "
                        f"appearing and disappearing (other processes create and remove it)",
                        name) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            if seg.size < size:
                seg.close()
                raise SegmentExistsError(
                    errno.EEXIST,
                    f"cannot open segment {describe(name, backend)} with {format_size(size)}: "
                    f"it exists with only {format_size(seg.size)}; remove it or ask for less",
                    name)
            return seg

    @classmethod
    def anonymous(cls, size: int) -> "Segment":
        """Create nameless shared memory (a memfd) for this process and its children.

        Hand it to `multiprocessing` workers (spawn or fork): it pickles by passing its file
        descriptor while a process is being started, and otherwise by /proc/PID/fd/N, which
        works while this process keeps the segment open (and only for processes of the same
        user). It vanishes when the last process closes it; `unlink()` does nothing.

        Raises:
            ResourceLimitError: `size` exceeds this machine's memory, or allocation failed.
        """
        validate_size(size)
        label = "anonymous"
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if size > physical:
            # memfd has no size limit of its own: fallocate would call the OOM killer
            raise ResourceLimitError(
                errno.ENOMEM,
                f"cannot create segment {label!r} (memfd, {format_size(size)}): larger than this "
                f"machine's memory ({format_size(physical)}); ask for less", label)
        try:
            fd = os.memfd_create("shmkit-anonymous", os.MFD_CLOEXEC)
        except OSError as exc:
            raise from_oserror(exc, action="create", name=label, backend="memfd",
                               size=size) from exc
        try:
            os.posix_fallocate(fd, 0, size)
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            raise from_oserror(exc, action="create", name=label, backend="memfd",
                               size=size) from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(name=f"memfd:{os.getpid()}:{fd}", backend="memfd", size=size, readonly=False,
                   mapping=mapping, fd=fd)

    @classmethod
    def _from_fd(cls, fd: int, readonly: bool) -> "Segment":
        """Map an anonymous segment from a file descriptor this object then owns."""
        name = f"memfd:{os.getpid()}:{fd}"
        try:
            size = os.fstat(fd).st_size
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        except OSError as exc:
            os.close(fd)
            raise from_oserror(exc, action="open", name=name, backend="memfd") from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(name=name, backend="memfd", size=size, readonly=readonly, mapping=mapping,
                   fd=fd)

    # -- pickling: by name (or by fd for anonymous segments) ----------------------------------

    def __reduce__(self):
        if self._backend != "memfd":
            return (_reopen, (self._name, self._backend, self._readonly, self._key))
        self._check_open()
        from multiprocessing import context
        popen = context.get_spawning_popen()
        if popen is not None:
            # being sent to a process that is starting (spawn, forkserver): the fd travels
            # with it; duplicate_for_child is what makes multiprocessing pass it on
            return (_from_dup_fd, (popen.DupFd(popen.duplicate_for_child(self._fd)),
                                   self._readonly))
        st = os.fstat(self._fd)
        return (_from_proc_fd, (os.getpid(), self._fd, self._readonly, (st.st_dev, st.st_ino)))

    # -- properties ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The segment's name ('memfd:PID:FD' for anonymous segments)."""
        return self._name

    @property
    def backend(self) -> str:
        """'posix', 'sysv' or 'memfd'."""
        return self._backend

    @property
    def size(self) -> int:
        """The size in bytes the creator asked for (not rounded up to pages)."""
        return self._size

    @property
    def readonly(self) -> bool:
        """Whether this process mapped it read-only."""
        return self._readonly

    @property
    def key(self) -> int | None:
        """The System V key (None on other backends)."""
        return self._key

    @property
    def shmid(self) -> int | None:
        """The System V segment id (None on other backends)."""
        return self._shmid

    @property
    def closed(self) -> bool:
        """Whether `close()` has ended this process's mapping."""
        return self._buf is None

    @property
    def buf(self) -> memoryview:
        """The shared bytes. Read-only when opened with readonly=True.

        Raises:
            ValueError: the segment was closed.
        """
        buf = self._buf
        if buf is None:
            raise ValueError(f"segment {describe(self._name, self._backend)} is closed")
        return buf

    @property
    def address(self) -> int:
        """Where the segment is mapped in this process (differs between processes)."""
        return _native.buffer_address(self.buf)

    def _stat(self) -> dict:
        if self._backend == "sysv":
            try:
                return _native.shm_stat(self._shmid)
            except OSError as exc:
                raise from_oserror(exc, action="stat", name=self._name, backend="sysv") from exc
        self._check_open()
        st = os.fstat(self._fd)
        return {"mode": _stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}

    @property
    def mode(self) -> int:
        """Current permission bits, read from the system (0o600 by default)."""
        return self._stat()["mode"]

    @property
    def uid(self) -> int:
        """Current owner uid."""
        return self._stat()["uid"]

    @property
    def gid(self) -> int:
        """Current owner gid."""
        return self._stat()["gid"]

    @property
    def attach_count(self) -> int:
        """System V only: how many attachments the segment has across all processes (nattch)."""
        if self._backend != "sysv":
            raise ValueError(f"attach_count is only known for System V segments; use "
                             f"`shmkit inspect {self._name}` to see who maps a {self._backend} one")
        return self._stat()["nattch"]

    # -- lifetime -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._buf is None:
            raise ValueError(f"segment {describe(self._name, self._backend)} is closed")

    def close(self) -> None:
        """End this process's mapping; other processes and the name are unaffected.

        Refuses while views of the memory are alive (memoryview slices, numpy arrays, shmkit
        locks placed in it), so no object can ever point into unmapped memory. Closing twice
        is allowed. With `unlink_on_close=True` the name is removed too (only by the process
        that opened it, not by a forked child holding a copy).

        Raises:
            SegmentBusyError: views are alive; release them and close again.
        """
        with self._lock:
            if self._buf is None:
                return
            try:
                self._buf.release()
                self._close_mapping()
            except BufferError as exc:
                self._buf = memoryview(self._mapping)
                raise SegmentBusyError(
                    f"cannot close segment {describe(self._name, self._backend)}: views of its "
                    f"memory are still alive (memoryview slices, arrays or objects placed in "
                    f"it); delete them first") from exc
            self._buf = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self._unlink_on_close and self._owner_pid == os.getpid():
            try:
                self.unlink()
            except SegmentNotFoundError:
                pass  # someone removed it already: the outcome the caller asked for

    def _close_mapping(self) -> None:
        if self._backend == "sysv":
            self._mapping.detach()
        else:
            self._mapping.close()

    def unlink(self) -> None:
        """Remove the segment's name so no new process can open it.

        Processes that already have it open keep their mapping; the memory is freed when the
        last of them closes it. For System V this is IPC_RMID. Anonymous segments have no
        name: this does nothing.

        Raises:
            SegmentNotFoundError: the name was already removed.
            SegmentPermissionError: only the owner, the creator or root may remove it.
        """
        if self._backend == "memfd":
            return
        unlink(self._name, backend=self._backend,
               key=self._key if self._backend == "sysv" else None, shmid=self._shmid)

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten Segment never invalidates views that are still referenced (its own
        # `buf` included, as in `Segment.open(name).buf`): the mapping object stays alive as
        # long as any view of it and is unmapped with the last one. Only the descriptor is
        # closed here, and the name is never removed unless the user asked (unlink_on_close).
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            try:
                os.close(fd)
            except OSError:
                pass
        if (getattr(self, "_unlink_on_close", False) and self._buf is not None
                and self._owner_pid == os.getpid()):
            try:
                self.unlink()
            except Exception:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._buf is None else ("readonly" if self._readonly else "open")
        return f"<Segment {self._name!r} backend={self._backend} size={self._size} {state}>"


def unlink(name: str, *, backend: str = "posix", key: int | None = None,
           shmid: int | None = None) -> None:
    """Remove a segment's name without opening it (what `shmkit rm` does).

    Processes that have it open keep their mapping. System V: IPC_RMID; the key is free at
    once, the memory is freed when the last process detaches.

    Raises:
        SegmentNotFoundError: no such segment (or it was already removed).
        SegmentPermissionError: not allowed to remove it (only its owner, creator or root).
    """
    validate_name(name)
    validate_backend(backend)
    if key is not None:
        key = validate_key(key)
    try:
        if backend == "posix":
            _posixshmem.shm_unlink(_posix_path(name))
            return
        if shmid is None:
            key = sysv_key(name) if key is None else key
            shmid = _native.shmget(key, 0, 0)
        elif _sysv_removed(shmid):
            # IPC_RMID on an id that is only waiting for its last detach succeeds again;
            # report it like POSIX reports a second shm_unlink
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        _native.shm_rmid(shmid)
    except OSError as exc:
        raise from_oserror(exc, action="remove", name=name, backend=backend) from exc


def exists(name: str, *, backend: str = "posix", key: int | None = None) -> bool:
    """Whether a segment with this name (or System V key) exists now."""
    validate_name(name)
    validate_backend(backend)
    if key is not None:
        key = validate_key(key)
    if backend == "posix":
        return os.path.exists(os.path.join(_proc.SHM_DIR, name))
    try:
        _native.shmget(sysv_key(name) if key is None else key, 0, 0)
    except OSError:
        return False
    return True


def _sysv_removed(shmid: int) -> bool:
    try:
        return bool(_native.shm_stat(shmid)["removed"])
    except OSError as exc:
        if exc.errno == errno.EACCES:
            return False  # may remove but not read it (mode without read for the owner)
        raise


def _discard_posix(fd: int, path: str) -> None:
    """Undo a half-made POSIX segment, keeping the original error the one that surfaces."""
    os.close(fd)
    try:
        _posixshmem.shm_unlink(path)
    except OSError:
        pass


def _discard_sysv(shmid: int) -> None:
    try:
        _native.shm_rmid(shmid)
    except OSError:
        pass


def _wait_for_size(fd: int) -> int:
    """The size of a POSIX segment, waiting briefly while its creator is still allocating it."""
    deadline = time.monotonic() + OPEN_SIZE_WAIT_SECONDS
    delay = 0.0005
    while True:
        size = os.fstat(fd).st_size
        if size or time.monotonic() >= deadline:
            return size
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _chown_reason(uid: int | None, gid: int | None) -> str:
    owner = " and ".join(f"{what} {value}" for what, value in (("uid", uid), ("gid", gid))
                         if value is not None)
    return (f"not permitted to give it to {owner} (changing the owner needs root or "
            f"CAP_CHOWN); leave uid= and gid= unset")


def _dev_shm_reason(size: int) -> str:
    try:
        st = os.statvfs(_proc.SHM_DIR)
    except OSError:
        return ("not enough free space in /dev/shm (see `df -h /dev/shm`); remove unused "
                "segments with `shmkit gc`, or ask for less")
    free = st.f_bavail * st.f_frsize
    total = st.f_blocks * st.f_frsize
    return (f"/dev/shm has only {format_size(free)} free of {format_size(total)} (see "
            f"`df -h /dev/shm`); remove unused segments with `shmkit gc`, enlarge /dev/shm, or "
            f"ask for less")


def _sysv_create_reason(code: int | None, name: str, key: int, size: int) -> str | None:
    """Which System V limit refused a shmget(2), read back from /proc/sys/kernel."""
    if code == errno.EEXIST:
        return (f"key {key} ({key & 0xFFFFFFFF:#010x}) is already taken; open it, choose "
                f"another name or key=, or remove it with `shmkit rm {name}`")
    if code == errno.EINVAL:
        shmmax = _proc.read_limit("shmmax")
        if shmmax is not None and size > shmmax:
            return (f"exceeds kernel.shmmax ({format_size(shmmax)}, see /proc/sys/kernel/shmmax); "
                    f"raise it with `sysctl kernel.shmmax=...` or use backend='posix'")
        return None
    if code == errno.ENOSPC:
        rows = _proc.sysv_segments()
        shmmni = _proc.read_limit("shmmni")
        if shmmni is not None and len(rows) >= shmmni:
            return (f"all {shmmni} System V segment ids are in use (kernel.shmmni, see "
                    f"/proc/sys/kernel/shmmni); remove unused segments with `shmkit gc` or "
                    f"raise it with `sysctl kernel.shmmni=...`")
        shmall = _proc.read_limit("shmall")
        page = mmap.PAGESIZE
        if shmall is not None:
            used = sum(-(-row.get("size", 0) // page) for row in rows)
            return (f"System V segments would use more than kernel.shmall ({shmall} pages of "
                    f"{page} bytes, {used} in use; see /proc/sys/kernel/shmall); remove unused "
                    f"segments with `shmkit gc`, raise it with `sysctl kernel.shmall=...`, or "
                    f"use backend='posix'")
        return None
    if code == errno.ENOMEM:
        return (f"the kernel cannot commit {format_size(size)} of memory for it (see "
                f"/proc/meminfo and vm.overcommit_memory); free memory or ask for less")
    return None


def _permission_reason(name: str, backend: str, key: int | None, readonly: bool) -> str:
    """Why an open was refused: the segment's mode and owner against who we are."""
    mode = uid = gid = None
    if backend == "posix":
        try:
            st = os.stat(os.path.join(_proc.SHM_DIR, name))
            mode, uid, gid = _stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        except OSError:
            pass
    else:
        for row in _proc.sysv_segments():
            if row.get("key") == key:
                mode, uid, gid = row.get("perms", 0) & 0o777, row.get("uid"), row.get("gid")
                break
    access = "read" if readonly else "read and write"
    fix = "ask its owner to widen the mode or give it to you"
    if not readonly:
        fix += ", or open it with readonly=True"
    if mode is None:
        return f"permission denied to {access} it; {fix}"
    return (f"its mode {mode:#05o} (owner uid {uid}, gid {gid}) does not let uid {os.geteuid()} "
            f"{access} it; {fix}")


def _reopen(name: str, backend: str, readonly: bool, key: int | None) -> Segment:
    return Segment.open(name, backend=backend, readonly=readonly, key=key)


def _from_dup_fd(dup, readonly: bool) -> Segment:
    fd = dup.detach()
    os.set_inheritable(fd, False)  # spawn passed it inheritable; keep it out of later execs
    return Segment._from_fd(fd, readonly)


def _from_proc_fd(pid: int, fd: int, readonly: bool,
                  identity: tuple[int, int] | None = None) -> Segment:
    label = f"memfd:{pid}:{fd}"
    gone = (f"cannot open anonymous segment {label}: its creator closed it or exited; "
            f"anonymous segments can be handed on only while their creator keeps them open, "
            f"or to a process it starts — use a named Segment instead")
    try:
        new_fd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY if readonly else os.O_RDWR)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise from_oserror(exc, action="open", name=label, backend="memfd",
                               reason="only processes of the same user (that may ptrace its "
                                      "creator) can open an anonymous segment through /proc; "
                                      "use a named Segment instead") from exc
        raise SegmentNotFoundError(errno.ENOENT, f"{gone} ({exc.strerror})", label) from exc
    try:
        st = os.fstat(new_fd)
    except BaseException:
        os.close(new_fd)
        raise
    if identity is not None and (st.st_dev, st.st_ino) != tuple(identity):
        # the creator exited or closed it and the pid or fd number now names something else
        os.close(new_fd)
        raise SegmentNotFoundError(errno.ENOENT, gone, label)
    return Segment._from_fd(new_fd, readonly)
