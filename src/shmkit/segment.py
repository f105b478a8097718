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

import hashlib
import mmap
import os
import stat as _stat
import threading

import _posixshmem

from . import _native, _proc
from .errors import (
    CorruptSegmentError,
    SegmentBusyError,
    SegmentExistsError,
    SegmentNotFoundError,
    describe,
    format_size,
    from_oserror,
)

BACKENDS = ("posix", "sysv")
NAME_MAX = 200  # bytes of UTF-8; /dev/shm allows 255, we keep room for prefixes of tools

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
    """Check a segment size (a positive int) and return it."""
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"size must be an int number of bytes, not {type(size).__name__}")
    if size <= 0:
        raise ValueError(f"size must be at least 1 byte, not {size}")
    return size


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
        self._buf: memoryview | None = memoryview(mapping)
        self._lock = threading.Lock()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, size: int, *, backend: str = "posix", mode: int = 0o600,
               uid: int | None = None, gid: int | None = None, key: int | None = None,
               unlink_on_close: bool = False) -> "Segment":
        """Create a new segment of `size` bytes and map it read-write.

        The segment gets exactly `mode`, whatever the umask, and optionally the owner
        `uid`/`gid` (needs the privilege to chown). Memory is allocated now: if /dev/shm cannot
        hold `size` bytes this raises instead of crashing with SIGBUS on first touch later.
        Contents start zeroed.

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
        if key is not None and backend != "sysv":
            raise ValueError("key= is only meaningful with backend='sysv'")
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
        try:
            os.fchmod(fd, mode)  # the umask may have cleared bits the caller asked for
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            _posixshmem.shm_unlink(path)
            raise from_oserror(exc, action="create", name=name, backend="posix", size=size) from exc
        except BaseException:
            os.close(fd)
            _posixshmem.shm_unlink(path)
            raise
        return cls(name=name, backend="posix", size=size, readonly=False, mapping=mapping, fd=fd,
                   unlink_on_close=unlink_on_close)

    @classmethod
    def _create_sysv(cls, name, size, mode, uid, gid, key, unlink_on_close) -> "Segment":
        key = sysv_key(name) if key is None else key
        try:
            shmid = _native.shmget(key, size, _native.IPC_CREAT | _native.IPC_EXCL | mode)
        except OSError as exc:
            raise from_oserror(exc, action="create", name=name, backend="sysv", size=size) from exc
        try:
            info = _native.shm_stat(shmid)
            _native.shm_set(shmid, info["uid"] if uid is None else uid,
                            info["gid"] if gid is None else gid, mode)
            mapping = _native.SysVAttachment(shmid, readonly=False)
        except OSError as exc:
            _native.shm_rmid(shmid)
            raise from_oserror(exc, action="create", name=name, backend="sysv", size=size) from exc
        except BaseException:
            _native.shm_rmid(shmid)
            raise
        return cls(name=name, backend="sysv", size=size, readonly=False, mapping=mapping,
                   shmid=shmid, key=key, unlink_on_close=unlink_on_close)

    @classmethod
    def open(cls, name: str, *, backend: str = "posix", readonly: bool = False,
             key: int | None = None, unlink_on_close: bool = False) -> "Segment":
        """Map an existing segment by name (or System V key).

        `readonly=True` maps it read-only: writes through `buf` raise TypeError, never crash.

        Raises:
            SegmentNotFoundError: no segment has that name.
            SegmentPermissionError: the mode does not allow this access.
            CorruptSegmentError: the segment has size 0 (foreign, or still being created).
        """
        validate_name(name)
        validate_backend(backend)
        if key is not None and backend != "sysv":
            raise ValueError("key= is only meaningful with backend='sysv'")
        if backend == "posix":
            return cls._open_posix(name, readonly, unlink_on_close)
        return cls._open_sysv(name, readonly, key, unlink_on_close)

    @classmethod
    def _open_posix(cls, name, readonly, unlink_on_close) -> "Segment":
        try:
            fd = _posixshmem.shm_open(_posix_path(name), os.O_RDONLY if readonly else os.O_RDWR, 0)
        except OSError as exc:
            raise from_oserror(exc, action="open", name=name, backend="posix") from exc
        try:
            size = os.fstat(fd).st_size
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
            raise from_oserror(exc, action="open", name=name, backend="sysv") from exc
        return cls(name=name, backend="sysv", size=mapping.size, readonly=readonly,
                   mapping=mapping, shmid=shmid, key=key, unlink_on_close=unlink_on_close)

    @classmethod
    def open_or_create(cls, name: str, size: int, *, backend: str = "posix", mode: int = 0o600,
                       key: int | None = None) -> "Segment":
        """Open `name` if it exists, otherwise create it with `size` bytes and `mode`.

        Safe against races: when several processes call it at once, exactly one creates.

        Raises:
            SegmentExistsError: it exists but is smaller than `size`.
            (and whatever `create` or `open` raise)
        """
        validate_size(size)
        for _ in range(100):
            try:
                seg = cls.create(name, size, backend=backend, mode=mode, key=key)
                return seg
            except SegmentExistsError:
                pass
            try:
                seg = cls.open(name, backend=backend, key=key)
            except (SegmentNotFoundError, CorruptSegmentError):
                continue  # removed or not yet sized between our two calls: try again
            if seg.size < size:
                seg.close()
                raise SegmentExistsError(
                    17, f"cannot open segment {describe(name, backend)} with {format_size(size)}: "
                        f"it exists with only {format_size(seg.size)}; remove it or ask for less", name)
            return seg
        raise SegmentExistsError(17, f"cannot open or create segment {describe(name, backend)}: it "
                                     f"keeps appearing and disappearing (another process is racing)",
                                 name)

    @classmethod
    def anonymous(cls, size: int) -> "Segment":
        """Create nameless shared memory (a memfd) for this process and its children.

        Hand it to `multiprocessing` workers (spawn or fork): it pickles by passing its file
        descriptor while a process is being started, and otherwise by /proc/PID/fd/N, which
        works while this process keeps the segment open. It vanishes when the last process
        closes it; `unlink()` does nothing.
        """
        validate_size(size)
        try:
            fd = os.memfd_create("shmkit-anonymous", os.MFD_CLOEXEC)
        except OSError as exc:
            raise from_oserror(exc, action="create", name="anonymous", backend="memfd",
                               size=size) from exc
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            raise from_oserror(exc, action="create", name="anonymous", backend="memfd",
                               size=size) from exc
        return cls(name=f"memfd:{os.getpid()}:{fd}", backend="memfd", size=size, readonly=False,
                   mapping=mapping, fd=fd)

    @classmethod
    def _from_fd(cls, fd: int, readonly: bool) -> "Segment":
        size = os.fstat(fd).st_size
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        return cls(name=f"memfd:{os.getpid()}:{fd}", backend="memfd", size=size,
                   readonly=readonly, mapping=mapping, fd=fd)

    # -- pickling: by name (or by fd for anonymous segments) ----------------------------------

    def __reduce__(self):
        if self._backend != "memfd":
            return (_reopen, (self._name, self._backend, self._readonly, self._key))
        self._check_open()
        from multiprocessing import context
        popen = context.get_spawning_popen()
        if popen is not None:
            return (_from_dup_fd, (popen.DupFd(self._fd), self._readonly))
        return (_from_proc_fd, (os.getpid(), self._fd, self._readonly))

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
        is allowed. With `unlink_on_close=True` the name is removed too.

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
        if self._unlink_on_close:
            self.unlink()

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
        # Only drop the mapping of a forgotten object; never unlink behind the user's back
        # (unless they asked for unlink_on_close).
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._buf is None else ("readonly" if self._readonly else "open")
        return f"<Segment {self._name!r} backend={self._backend} size={self._size} {state}>"


def unlink(name: str, *, backend: str = "posix", key: int | None = None,
           shmid: int | None = None) -> None:
    """Remove a segment's name without opening it (what `shmkit rm` does).

    Raises:
        SegmentNotFoundError: no such segment.
        SegmentPermissionError: not allowed to remove it.
    """
    validate_backend(backend)
    try:
        if backend == "posix":
            _posixshmem.shm_unlink(_posix_path(validate_name(name)))
        else:
            if shmid is None:
                shmid = _native.shmget(sysv_key(name) if key is None else key, 0, 0)
            _native.shm_rmid(shmid)
    except OSError as exc:
        raise from_oserror(exc, action="remove", name=name, backend=backend) from exc


def exists(name: str, *, backend: str = "posix", key: int | None = None) -> bool:
    """Whether a segment with this name (or System V key) exists now."""
    validate_backend(backend)
    if backend == "posix":
        return os.path.exists(os.path.join(_proc.SHM_DIR, validate_name(name)))
    try:
        _native.shmget(sysv_key(name) if key is None else key, 0, 0)
    except OSError:
        return False
    return True


def _reopen(name: str, backend: str, readonly: bool, key: int | None) -> Segment:
    return Segment.open(name, backend=backend, readonly=readonly, key=key)


def _from_dup_fd(dup, readonly: bool) -> Segment:
    return Segment._from_fd(dup.detach(), readonly)


def _from_proc_fd(pid: int, fd: int, readonly: bool) -> Segment:
    try:
        new_fd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY if readonly else os.O_RDWR)
    except OSError as exc:
        raise SegmentNotFoundError(
            exc.errno, f"cannot open anonymous segment memfd:{pid}:{fd}: its creator closed it or "
                       f"exited ({exc.strerror}); anonymous segments can be handed on only while "
                       f"their creator keeps them open — use a named Segment instead",
            f"memfd:{pid}:{fd}") from exc
    return Segment._from_fd(new_fd, readonly)
