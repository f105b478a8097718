"""Segments on both backends: sharing, permissions, errors, lifetime, interop, pickling.

Multi-process behaviour is checked with real, unrelated interpreters (procs.run_python /
spawn_python). Tests that need another user start the child as root and drop to `nobody`
inside it (the interpreter may live where `nobody` cannot execute it).
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import multiprocessing
import os
import pickle
import subprocess
import threading
import time
import types

import pytest
from procs import run_python, spawn_python, stop, wait_for_line

import shmkit
from shmkit import (
    CorruptSegmentError,
    ResourceLimitError,
    Segment,
    SegmentBusyError,
    SegmentExistsError,
    SegmentNotFoundError,
    ShmkitError,
    segment,
)
from shmkit import _native


# -- helpers ------------------------------------------------------------------------------------

def _child(code: str, *args, timeout: float = 30, check: bool = True):
    """Run `code` in a fresh interpreter with Segment, json and sys imported."""
    prelude = "import json, os, sys\nimport shmkit\nfrom shmkit import Segment\n"
    return run_python(prelude + code, *args, timeout=timeout, check=check)


def _as_user(uid: int, code: str, *args, timeout: float = 30):
    """Run `code` in a child that drops from root to `uid` before running it, print JSON."""
    drop = (
        "import os, pwd\n"
        f"_uid = {uid}\n"
        "try:\n"
        "    _gid = pwd.getpwuid(_uid).pw_gid\n"
        "except KeyError:\n"
        "    _gid = _uid\n"
        "os.setgroups([]); os.setgid(_gid); os.setuid(_uid)\n"
        "assert os.geteuid() == _uid\n"
    )
    proc = _child(drop + code, *args, timeout=timeout)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _try_open_code() -> str:
    """Child code defining attempt(readonly, write): what happens when this user opens it."""
    return (
        "def attempt(name, backend, readonly, write=None):\n"
        "    try:\n"
        "        seg = Segment.open(name, backend=backend, readonly=readonly)\n"
        "    except shmkit.ShmkitError as e:\n"
        "        return {'error': type(e).__name__, 'permission': isinstance(e, PermissionError),\n"
        "                'errno': getattr(e, 'errno', None), 'filename': getattr(e, 'filename', None),\n"
        "                'message': str(e)}\n"
        "    out = {'first': seg.buf[0], 'mode': seg.mode}\n"
        "    if write is not None:\n"
        "        try:\n"
        "            seg.buf[1] = write\n"
        "            out['wrote'] = True\n"
        "        except TypeError as e:\n"
        "            out['write_error'] = type(e).__name__\n"
        "    seg.close()\n"
        "    return out\n"
    )


def _sysv_rows() -> dict[int, dict[str, int]]:
    """/proc/sysvipc/shm by shmid, read here independently of shmkit."""
    with open("/proc/sysvipc/shm") as f:
        head = f.readline().split()
        rows = [{col: int(value, 8 if col == "perms" else 10)  # perms is printed in octal
                 for col, value in zip(head, line.split())} for line in f if line.strip()]
    return {row["shmid"]: row for row in rows}


def _system_mode(seg: Segment) -> int:
    """The mode as the system reports it, without asking shmkit."""
    if seg.backend == "posix":
        return os.stat(f"/dev/shm/{seg.name}").st_mode & 0o777
    return _sysv_rows()[seg.shmid]["perms"] & 0o777


def _key_by_documented_rule(name: str) -> int:
    """The System V key rule as docs/segments.md states it, implemented independently."""
    digest = hashlib.blake2b(b"shmkit:" + name.encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True) or 1


class _Holder:
    """An unrelated process that keeps a segment mapped and obeys 'write i v' / 'read i'."""

    CODE = (
        "import sys\n"
        "from shmkit import Segment\n"
        "seg = Segment.open(sys.argv[1], backend=sys.argv[2])\n"
        "print('ready', flush=True)\n"
        "for line in sys.stdin:\n"
        "    cmd = line.split()\n"
        "    if cmd[0] == 'write':\n"
        "        seg.buf[int(cmd[1])] = int(cmd[2])\n"
        "        print('done', flush=True)\n"
        "    elif cmd[0] == 'read':\n"
        "        print('value', seg.buf[int(cmd[1])], flush=True)\n"
        "    else:\n"
        "        break\n"
        "seg.close()\n"
    )

    def __init__(self, name: str, backend: str) -> None:
        self.proc = spawn_python(self.CODE, name, backend, stdin=subprocess.PIPE)
        wait_for_line(self.proc, "ready", timeout=30)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def write(self, index: int, value: int) -> None:
        self.send(f"write {index} {value}")
        wait_for_line(self.proc, "done", timeout=30)

    def expect(self, index: int, value: int) -> None:
        self.send(f"read {index}")
        wait_for_line(self.proc, f"value {value}", timeout=30)

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.send("exit")
        stop(self.proc, timeout=30)


# -- basics and unrelated processes -------------------------------------------------------------

def test_create_reports_exact_size_and_starts_zeroed(backend, seg_name):
    with Segment.create(seg_name, size=5000, backend=backend) as seg:
        assert (seg.name, seg.backend, seg.size, seg.readonly) == (seg_name, backend, 5000, False)
        assert len(seg.buf) == 5000
        assert not any(seg.buf)
        other = Segment.open(seg_name, backend=backend)
        assert other.size == 5000  # not rounded up to pages
        other.close()
        seg.unlink()


def test_write_visible_to_unrelated_process(backend, seg_name):
    with Segment.create(seg_name, size=4096, backend=backend) as seg:
        _child("s = Segment.open(sys.argv[1], backend=sys.argv[2])\n"
               "s.buf[0] = 7\n"
               "s.close()",
               seg_name, backend)
        assert seg.buf[0] == 7
        seg.buf[1] = 9
        out = _child("s = Segment.open(sys.argv[1], backend=sys.argv[2])\n"
                     "print(s.buf[1]); s.close()", seg_name, backend)
        assert out.stdout.strip() == "9"
        seg.unlink()


def test_segment_written_by_one_process_is_read_by_another_after_it_exited(backend, seg_name):
    _child("s = Segment.create(sys.argv[1], 3000, backend=sys.argv[2])\n"
           "s.buf[:5] = b'hello'\n"
           "s.buf[2999] = 42\n"
           "s.close()",
           seg_name, backend)
    out = _child("s = Segment.open(sys.argv[1], backend=sys.argv[2])\n"
                 "print(json.dumps([bytes(s.buf[:5]).decode(), s.buf[2999], s.size]))\n"
                 "s.close()",
                 seg_name, backend)
    assert json.loads(out.stdout) == ["hello", 42, 3000]
    segment.unlink(seg_name, backend=backend)


RACER = """
name, backend = sys.argv[1:3]
made = []
real_create = Segment.create.__func__

def spying_create(cls, *args, **kwargs):
    seg = real_create(cls, *args, **kwargs)
    made.append(True)
    return seg

Segment.create = classmethod(spying_create)
print("ready", flush=True)
sys.stdin.readline()
seg = Segment.open_or_create(name, 4096, backend=backend)
shmkit._native.add_u32(seg.buf, 0, 1)
print("created" if made else "opened", seg.size, flush=True)
seg.close()
"""


def test_open_or_create_race_exactly_one_process_creates(backend, seg_name):
    prelude = "import sys\nimport shmkit\nfrom shmkit import Segment\n"
    racers = [spawn_python(prelude + RACER, seg_name, backend, stdin=subprocess.PIPE)
              for _ in range(4)]
    try:
        for proc in racers:
            wait_for_line(proc, "ready", timeout=30)
        for proc in racers:  # release them together
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [stop(proc, timeout=30)[0].split() for proc in racers]
    finally:
        for proc in racers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert sorted(r[0] for r in results) == ["created", "opened", "opened", "opened"]
    assert all(r[1] == "4096" for r in results)
    with Segment.open(seg_name, backend=backend) as seg:
        assert _native.load_u32(seg.buf, 0) == 4  # all four worked on the same segment
    segment.unlink(seg_name, backend=backend)


def test_open_or_create_opens_existing_and_refuses_smaller(backend, seg_name):
    with Segment.open_or_create(seg_name, 8192, backend=backend) as first:
        first.buf[0] = 5
        with Segment.open_or_create(seg_name, 100, backend=backend) as second:
            assert second.buf[0] == 5 and second.size == 8192
        with pytest.raises(SegmentExistsError, match="exists with only 8 KiB"):
            Segment.open_or_create(seg_name, 8193, backend=backend)
        first.unlink()


def test_exists_follows_create_and_unlink(backend, seg_name):
    assert not segment.exists(seg_name, backend=backend)
    with Segment.create(seg_name, 1, backend=backend) as seg:
        assert segment.exists(seg_name, backend=backend)
        seg.unlink()
        assert not segment.exists(seg_name, backend=backend)


def test_close_from_many_threads_at_once_is_safe(backend, seg_name):
    seg = Segment.create(seg_name, 4096, backend=backend)
    seg.unlink()
    errors = []
    start = threading.Barrier(8)

    def closer():
        try:
            start.wait(timeout=30)
            seg.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=closer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and seg.closed


# -- permissions --------------------------------------------------------------------------------

def test_default_mode_is_owner_only(backend, seg_name):
    with Segment.create(seg_name, 4096, backend=backend) as seg:
        assert seg.mode == 0o600 == _system_mode(seg)
        seg.unlink()


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_mode_is_exact_whatever_the_umask(backend, names, umask):
    old = os.umask(umask)
    try:
        made = [(mode, Segment.create(names(), 4096, backend=backend, mode=mode))
                for mode in (0o600, 0o640, 0o644, 0o666, 0o400, 0o000)]
    finally:
        os.umask(old)
    for mode, seg in made:
        assert (oct(seg.mode), oct(_system_mode(seg))) == (oct(mode), oct(mode))
        seg.unlink()
        seg.close()


def test_unprivileged_process_is_refused_owner_only_segment(backend, seg_name, nobody):
    with Segment.create(seg_name, 4096, backend=backend, mode=0o600) as seg:
        seg.buf[0] = 11
        out = _as_user(nobody, _try_open_code() +
                       "print(json.dumps([attempt(sys.argv[1], sys.argv[2], False),\n"
                       "                  attempt(sys.argv[1], sys.argv[2], True)]))",
                       seg_name, backend)
        for result in out:
            assert result["error"] == "SegmentPermissionError" and result["permission"]
            assert result["errno"] == errno.EACCES and result["filename"] == seg_name
            assert f"'{seg_name}' ({backend})" in result["message"]
            assert "0o600" in result["message"]  # says which mode refused it
        seg.unlink()


def test_unprivileged_process_reads_0644_readonly_but_cannot_write(backend, seg_name, nobody):
    with Segment.create(seg_name, 4096, backend=backend, mode=0o644) as seg:
        seg.buf[0] = 22
        read_write, read_only = _as_user(
            nobody, _try_open_code() +
            "print(json.dumps([attempt(sys.argv[1], sys.argv[2], False),\n"
            "                  attempt(sys.argv[1], sys.argv[2], True, write=99)]))",
            seg_name, backend)
        assert read_write["error"] == "SegmentPermissionError"
        assert "readonly=True" in read_write["message"]  # the fix it suggests
        assert read_only == {"first": 22, "mode": 0o644, "write_error": "TypeError"}
        assert seg.buf[1] == 0
        seg.unlink()


def test_unprivileged_process_writes_where_mode_allows(backend, seg_name, nobody):
    with Segment.create(seg_name, 4096, backend=backend, mode=0o666) as seg:
        seg.buf[0] = 33
        out = _as_user(nobody, _try_open_code() +
                       "print(json.dumps(attempt(sys.argv[1], sys.argv[2], False, write=44)))",
                       seg_name, backend)
        assert out == {"first": 33, "mode": 0o666, "wrote": True}
        assert seg.buf[1] == 44
        seg.unlink()


def test_chown_gives_segment_to_another_user(backend, seg_name, nobody):
    import pwd

    try:
        gid = pwd.getpwuid(nobody).pw_gid
    except KeyError:
        gid = nobody
    with Segment.create(seg_name, 4096, backend=backend, mode=0o600, uid=nobody,
                        gid=gid) as seg:
        assert (seg.uid, seg.gid, seg.mode) == (nobody, gid, 0o600)
        out = _as_user(nobody, _try_open_code() +
                       "print(json.dumps(attempt(sys.argv[1], sys.argv[2], False, write=55)))",
                       seg_name, backend)
        assert out["wrote"] is True and seg.buf[1] == 55
        seg.unlink()


def test_unprivileged_chown_is_refused_and_leaves_nothing(seg_name, nobody):
    # POSIX only: System V lets an owner give a segment to anyone (IPC_SET), see the docs
    out = _as_user(nobody,
                   "try:\n"
                   "    Segment.create(sys.argv[1], 4096, uid=0)\n"
                   "    print(json.dumps('created'))\n"
                   "except shmkit.SegmentPermissionError as e:\n"
                   "    print(json.dumps([e.errno, str(e)]))",
                   seg_name)
    assert out[0] == errno.EPERM
    assert "uid 0" in out[1] and "leave uid= and gid= unset" in out[1]
    assert not segment.exists(seg_name)


def test_readonly_attach_refuses_every_kind_of_write(backend, seg_name):
    import ctypes

    import numpy as np

    with Segment.create(seg_name, 4096, backend=backend) as seg:
        seg.buf[0] = 1
        ro = Segment.open(seg_name, backend=backend, readonly=True)
        assert ro.readonly and ro.buf.readonly and ro.buf[0] == 1
        with pytest.raises(TypeError):
            ro.buf[0] = 2
        with pytest.raises(TypeError):
            ro.buf[0:4] = b"abcd"
        array = np.frombuffer(ro.buf, dtype=np.uint8)
        with pytest.raises(ValueError):
            array[0] = 3
        with pytest.raises((BufferError, TypeError)):
            _native.store_u32(ro.buf, 0, 5)
        with pytest.raises(TypeError):
            (ctypes.c_char * 4).from_buffer(ro.buf)
        assert _native.load_u32(ro.buf, 0) == 1  # reads still work
        del array
        assert seg.buf[0] == 1
        ro.close()
        seg.unlink()


# -- errors -------------------------------------------------------------------------------------

def test_create_twice_raises_exists(backend, seg_name):
    with Segment.create(seg_name, 4096, backend=backend) as seg:
        with pytest.raises(SegmentExistsError) as info:
            Segment.create(seg_name, 4096, backend=backend)
        e = info.value
        assert isinstance(e, FileExistsError) and isinstance(e, ShmkitError)
        assert (e.errno, e.filename) == (errno.EEXIST, seg_name)
        assert f"'{seg_name}' ({backend}" in str(e) and f"shmkit rm {seg_name}" in str(e)
        assert isinstance(e.__cause__, OSError)
        assert seg.buf[0] == 0  # the first one is untouched
        seg.unlink()


def test_open_missing_raises_not_found(backend, seg_name):
    with pytest.raises(SegmentNotFoundError) as info:
        Segment.open(seg_name, backend=backend)
    e = info.value
    assert isinstance(e, FileNotFoundError) and isinstance(e, ShmkitError)
    assert (e.errno, e.filename) == (errno.ENOENT, seg_name)
    assert f"'{seg_name}' ({backend})" in e.strerror
    assert e.strerror[0].islower() and not e.strerror.endswith(".")
    with pytest.raises(FileNotFoundError):
        segment.unlink(seg_name, backend=backend)


class _NoSyscalls(types.ModuleType):
    def __getattr__(self, attr):
        raise AssertionError(f"syscall {attr} made before validation")


@pytest.fixture
def no_syscalls(monkeypatch):
    monkeypatch.setattr(segment, "_posixshmem", _NoSyscalls("posixshmem"))
    monkeypatch.setattr(segment, "_native", _NoSyscalls("native"))


@pytest.mark.parametrize("name, error, rule", [
    ("", ValueError, "must not be empty"),
    ("/", ValueError, "must not contain '/'"),
    ("a/b", ValueError, "must not contain '/'"),
    ("/leading", ValueError, "must not contain '/'"),
    ("nul\0byte", ValueError, "NUL"),
    (".", ValueError, "reserved"),
    ("..", ValueError, "reserved"),
    ("x" * 201, ValueError, "the limit is 200"),
    ("é" * 101, ValueError, "202 bytes long; the limit is 200"),
    (None, TypeError, "must be a str, not NoneType"),
    (b"bytes", TypeError, "must be a str, not bytes"),
    (42, TypeError, "must be a str, not int"),
])
def test_bad_names_are_rejected_before_any_syscall(backend, no_syscalls, name, error, rule):
    for call in (lambda: Segment.create(name, 4096, backend=backend),
                 lambda: Segment.open(name, backend=backend),
                 lambda: Segment.open_or_create(name, 4096, backend=backend),
                 lambda: segment.unlink(name, backend=backend),
                 lambda: segment.exists(name, backend=backend)):
        with pytest.raises(error, match=rule.replace(".", r"\.")):
            call()


def test_longest_name_is_accepted(backend, names):
    name = names()
    name += "n" * (segment.NAME_MAX - len(name))
    with Segment.create(name, 1, backend=backend) as seg:
        with Segment.open(name, backend=backend) as again:
            assert again.size == 1
        seg.unlink()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"size": 0}, ValueError, "size must be at least 1 byte"),
    ({"size": -1}, ValueError, "size must be at least 1 byte"),
    ({"size": 1.5}, TypeError, "size must be an int"),
    ({"size": True}, TypeError, "size must be an int"),
    ({"size": "4096"}, TypeError, "size must be an int"),
    ({"size": 2**63}, ValueError, "size must be at most"),
    ({"mode": 0o1000}, ValueError, "mode must be within"),
    ({"mode": 0o4755}, ValueError, "mode must be within"),
    ({"mode": -1}, ValueError, "mode must be within"),
    ({"mode": "0600"}, TypeError, "mode must be an int"),
    ({"backend": "shm"}, ValueError, "backend must be one of"),
    ({"uid": -1}, ValueError, "uid must be within"),
    ({"gid": "root"}, TypeError, "gid must be an int"),
    ({"key": 0, "backend": "sysv"}, ValueError, "IPC_PRIVATE"),
    ({"key": 2**32, "backend": "sysv"}, ValueError, "32 bits"),
    ({"key": "k", "backend": "sysv"}, TypeError, "key must be an int"),
    ({"key": 5, "backend": "posix"}, ValueError, "only meaningful with backend='sysv'"),
])
def test_bad_arguments_are_rejected_before_any_syscall(no_syscalls, kwargs, error, match):
    args = {"size": 4096, **kwargs}
    with pytest.raises(error, match=match):
        Segment.create("fine-name", **args)


def test_segment_bigger_than_dev_shm_fails_at_create_and_leaves_nothing(seg_name):
    st = os.statvfs("/dev/shm")
    size = st.f_blocks * st.f_frsize + (1 << 30)
    with pytest.raises(ResourceLimitError) as info:
        Segment.create(seg_name, size)
    e = info.value
    assert e.errno == errno.ENOSPC and e.filename == seg_name
    message = str(e)
    assert f"'{seg_name}' (posix" in message
    assert "/dev/shm" in message and "df -h /dev/shm" in message and "free" in message
    assert not segment.exists(seg_name)
    assert seg_name not in os.listdir("/dev/shm")


def test_allocation_is_real_not_sparse(seg_name):
    size = 8 << 20
    with Segment.create(seg_name, size) as seg:
        # posix_fallocate: every page exists now, so a later touch cannot SIGBUS
        assert os.stat(f"/dev/shm/{seg_name}").st_blocks * 512 >= size
        seg.unlink()


NAMESPACE_LIMITS = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x08000000) != 0:  # CLONE_NEWIPC: limits and segments below are private
    print(json.dumps({"skip": os.strerror(ctypes.get_errno())}))
    sys.exit(0)
from shmkit import ResourceLimitError, segment

def set_limit(name, value):
    with open(f"/proc/sys/kernel/{name}", "w") as f:
        f.write(str(value))

def attempt(name, size):
    try:
        Segment.create(name, size, backend="sysv").close()
    except ResourceLimitError as e:
        return {"errno": e.errno, "message": str(e), "filename": e.filename,
                "left": segment.exists(name, backend="sysv")}
    return "created"

name = sys.argv[1]
out = {}
set_limit("shmmax", 1 << 20)
out["shmmax"] = attempt(name, 2 << 20)
set_limit("shmmax", 1 << 30)
set_limit("shmall", 256)
out["shmall"] = attempt(name, 2 << 20)
set_limit("shmall", 1 << 20)
set_limit("shmmni", 1)
first = Segment.create(name + "-first", 4096, backend="sysv")
out["shmmni"] = attempt(name, 4096)
first.unlink()
first.close()
with open("/proc/sysvipc/shm") as f:
    out["left"] = f.read().splitlines()[1:]
print(json.dumps(out))
"""


def test_sysv_limits_give_resource_limit_error_naming_the_limit(seg_name):
    if os.geteuid() != 0:
        pytest.skip("changing kernel.shm* in a private IPC namespace needs root")
    out = json.loads(_child(NAMESPACE_LIMITS, seg_name).stdout)
    if "skip" in out:
        pytest.skip(f"cannot enter a new IPC namespace: {out['skip']}")
    limits = {"shmmax": (errno.EINVAL, "/proc/sys/kernel/shmmax"),
              "shmall": (errno.ENOSPC, "/proc/sys/kernel/shmall"),
              "shmmni": (errno.ENOSPC, "/proc/sys/kernel/shmmni")}
    for limit, (code, where) in limits.items():
        result = out[limit]
        assert result != "created", limit
        assert result["errno"] == code and result["filename"] == seg_name
        assert f"kernel.{limit}" in result["message"] and where in result["message"]
        assert f"'{seg_name}' (sysv" in result["message"]
        assert result["left"] is False
    assert "exceeds kernel.shmmax (1 MiB" in out["shmmax"]["message"]
    assert out["left"] == []
    assert not segment.exists(seg_name, backend="sysv")


def test_anonymous_segment_bigger_than_memory_is_refused():
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with pytest.raises(ResourceLimitError, match="larger than this machine's memory"):
        Segment.anonymous(physical + 1)


def test_open_refuses_a_segment_nobody_ever_sized(seg_name, monkeypatch):
    monkeypatch.setattr(segment, "OPEN_SIZE_WAIT_SECONDS", 0.01)
    os.close(os.open(f"/dev/shm/{seg_name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    with pytest.raises(CorruptSegmentError, match=f"size 0.*shmkit rm {seg_name}"):
        Segment.open(seg_name)
    with pytest.raises(CorruptSegmentError):
        Segment.open_or_create(seg_name, 4096)


def test_open_waits_for_a_creator_that_is_still_allocating(seg_name, monkeypatch):
    path = f"/dev/shm/{seg_name}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    waiting = threading.Event()

    def sleep(seconds):  # the opener is now waiting: let the "creator" finish
        waiting.set()
        time.sleep(seconds)
    monkeypatch.setattr(segment, "OPEN_SIZE_WAIT_SECONDS", 60.0)
    monkeypatch.setattr(segment, "time", types.SimpleNamespace(monotonic=time.monotonic,
                                                               sleep=sleep))
    result = {}
    opener = threading.Thread(target=lambda: result.update(seg=Segment.open(seg_name)))
    opener.start()
    assert waiting.wait(timeout=30)
    os.ftruncate(fd, 4096)
    os.close(fd)
    opener.join(timeout=30)
    assert result["seg"].size == 4096
    result["seg"].close()


# -- close, unlink, lifetime --------------------------------------------------------------------

def _views():
    import ctypes

    import numpy as np

    return {
        "memoryview slice": lambda buf: buf[10:20],
        "numpy array": lambda buf: np.frombuffer(buf, dtype=np.uint8),
        "numpy array of a slice": lambda buf: np.frombuffer(buf[8:], dtype=np.uint64),
        "ctypes object": lambda buf: (ctypes.c_char * 16).from_buffer(buf),
        "cast memoryview": lambda buf: buf.cast("I"),
    }


@pytest.mark.parametrize("view", list(_views()))
def test_close_refuses_while_views_are_alive_then_succeeds(backend, seg_name, view):
    seg = Segment.create(seg_name, 4096, backend=backend)
    alive = _views()[view](seg.buf)
    with pytest.raises(SegmentBusyError) as info:
        seg.close()
    assert isinstance(info.value, BufferError)
    assert f"'{seg_name}' ({backend})" in str(info.value)
    assert not seg.closed
    seg.buf[0] = 77  # still fully usable after the refusal
    assert Segment.open(seg_name, backend=backend).buf[0] == 77
    del alive
    seg.close()
    assert seg.closed
    segment.unlink(seg_name, backend=backend)


def test_double_close_is_fine_and_buf_after_close_raises(backend, seg_name):
    seg = Segment.create(seg_name, 4096, backend=backend)
    early = seg.buf  # the very memoryview, not a slice: released by close()
    seg.close()
    seg.close()
    assert seg.closed and "closed" in repr(seg)
    with pytest.raises(ValueError, match=f"'{seg_name}' \\({backend}\\) is closed"):
        seg.buf
    with pytest.raises(ValueError):
        early[0]
    with pytest.raises(ValueError):
        seg.address
    seg.unlink()  # unlink still works on a closed segment


def test_context_manager_closes_but_keeps_the_name(backend, seg_name):
    with Segment.create(seg_name, 4096, backend=backend) as seg:
        seg.buf[0] = 3
    assert seg.closed
    with Segment.open(seg_name, backend=backend) as again:
        assert again.buf[0] == 3
    segment.unlink(seg_name, backend=backend)


def test_unlink_keeps_existing_mappings_in_other_processes(backend, seg_name):
    seg = Segment.create(seg_name, 4096, backend=backend)
    holder = _Holder(seg_name, backend)
    try:
        seg.unlink()
        assert not segment.exists(seg_name, backend=backend)
        with pytest.raises(SegmentNotFoundError):
            Segment.open(seg_name, backend=backend)
        seg.buf[1] = 42
        holder.expect(1, 42)
        holder.write(2, 43)
        assert seg.buf[2] == 43
        # the name is free again: a new segment under it is a different one
        with Segment.create(seg_name, 4096, backend=backend) as fresh:
            assert fresh.buf[1] == 0
            fresh.unlink()
        holder.expect(1, 42)
    finally:
        holder.finish()
    seg.close()


def test_sysv_memory_stays_until_the_last_process_detaches(seg_name):
    seg = Segment.create(seg_name, 4096, backend="sysv")
    shmid = seg.shmid
    holder = _Holder(seg_name, "sysv")
    try:
        assert seg.attach_count == 2
        seg.buf[1] = 42
        seg.unlink()  # IPC_RMID
        assert shmid in _sysv_rows()  # marked for removal, still there
        assert seg.attach_count == 2
        with pytest.raises(SegmentNotFoundError):
            seg.unlink()  # a second removal is reported like POSIX reports it
        seg.close()
        assert shmid in _sysv_rows()
        holder.expect(1, 42)  # the memory outlives its name and its creator's mapping
        holder.write(3, 5)
        holder.expect(3, 5)
    finally:
        holder.finish()
    assert shmid not in _sysv_rows()  # freed with the last detach


def test_sysv_attach_count_counts_attachments(seg_name):
    with Segment.create(seg_name, 4096, backend="sysv") as seg:
        assert seg.attach_count == 1
        second = Segment.open(seg_name, backend="sysv")
        assert seg.attach_count == 2 == second.attach_count
        second.close()
        assert seg.attach_count == 1
        seg.unlink()


def test_attach_count_is_refused_for_posix(seg_name):
    with Segment.create(seg_name, 4096) as seg:
        with pytest.raises(ValueError, match="shmkit inspect"):
            seg.attach_count
        seg.unlink()


def test_unlink_twice_raises_not_found(backend, seg_name):
    seg = Segment.create(seg_name, 4096, backend=backend)
    seg.unlink()
    with pytest.raises(SegmentNotFoundError):
        seg.unlink()
    with pytest.raises(SegmentNotFoundError):
        segment.unlink(seg_name, backend=backend)
    seg.close()


def test_unlink_on_close_is_opt_in(backend, names):
    kept, removed = names(), names()
    Segment.create(kept, 4096, backend=backend).close()
    assert segment.exists(kept, backend=backend)
    Segment.create(removed, 4096, backend=backend, unlink_on_close=True).close()
    assert not segment.exists(removed, backend=backend)


def test_unlink_on_close_tolerates_a_name_already_removed(backend, seg_name):
    seg = Segment.create(seg_name, 4096, backend=backend, unlink_on_close=True)
    segment.unlink(seg_name, backend=backend)
    seg.close()
    assert seg.closed


def test_garbage_collection_never_unlinks(backend, seg_name):
    seg = Segment.create(seg_name, 4096, backend=backend)
    seg.buf[0] = 9
    del seg
    gc.collect()
    assert segment.exists(seg_name, backend=backend)
    with Segment.open(seg_name, backend=backend) as again:
        assert again.buf[0] == 9
    segment.unlink(seg_name, backend=backend)


def test_garbage_collection_unlinks_only_when_asked(backend, seg_name):
    seg = Segment.create(seg_name, 4096, backend=backend, unlink_on_close=True)
    del seg
    gc.collect()
    assert not segment.exists(seg_name, backend=backend)


def test_buf_of_a_temporary_segment_stays_usable(backend, seg_name):
    with Segment.create(seg_name, 4096, backend=backend) as seg:
        buf = Segment.open(seg_name, backend=backend).buf  # the Segment itself is dropped
        gc.collect()
        buf[0] = 4
        assert seg.buf[0] == 4 and Segment.open(seg_name, backend=backend).buf[0] == 4
        del buf
        seg.unlink()


def test_views_outliving_a_collected_segment_stay_valid(backend, seg_name):
    import numpy as np

    seg = Segment.create(seg_name, 4096, backend=backend)
    array = np.frombuffer(seg.buf, dtype=np.uint8)
    del seg
    gc.collect()
    array[0] = 5  # the mapping lives as long as the view: no crash
    with Segment.open(seg_name, backend=backend) as again:
        assert again.buf[0] == 5
    del array
    segment.unlink(seg_name, backend=backend)


def test_forked_child_closing_its_copy_does_not_unlink(backend, seg_name):
    seg = Segment.create(seg_name, 4096, backend=backend, unlink_on_close=True)
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            seg.close()
            code = 0 if segment.exists(seg_name, backend=backend) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert segment.exists(seg_name, backend=backend)
    seg.close()  # the parent asked for it, so the parent's close removes it
    assert not segment.exists(seg_name, backend=backend)


# -- System V keys ------------------------------------------------------------------------------

def test_sysv_key_follows_the_documented_rule(names):
    for name in ("frames", "a", "é-unicode", names()):
        assert shmkit.sysv_key(name) == _key_by_documented_rule(name)
    assert shmkit.sysv_key("frames") == segment.sysv_key("frames")  # stable across calls


def test_sysv_explicit_key_and_unsigned_spelling(seg_name):
    key = 0x80000000 | (int.from_bytes(os.urandom(3), "big") << 4) | 0x5
    signed = key - 2**32
    seg = Segment.create(seg_name, 4096, backend="sysv", key=key)
    try:
        assert seg.key == signed
        assert signed in {row["key"] for row in _sysv_rows().values()}
        with Segment.open("any-label", backend="sysv", key=signed) as other:
            assert other.shmid == seg.shmid
        assert segment.exists("any-label", backend="sysv", key=key)
        assert not segment.exists(seg_name, backend="sysv")  # the name's own key is unused
    finally:
        segment.unlink("any-label", backend="sysv", key=key)
        seg.close()


SYSV_C_READER = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
key, mode = int(sys.argv[1]), sys.argv[2]
if mode == "create":
    shmid = libc.shmget(key, 4096, 0o1000 | 0o2000 | 0o600)
else:
    shmid = libc.shmget(key, 0, 0)
assert shmid >= 0, ctypes.get_errno()
addr = libc.shmat(shmid, None, 0)
assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
print(ctypes.string_at(addr, 5).decode("latin-1"))
ctypes.memmove(addr + 5, b"world", 5)
libc.shmdt(addr)
"""


def test_sysv_segment_interoperates_with_plain_shmget_callers(names):
    ours, theirs = names(), names()
    with Segment.create(ours, 4096, backend="sysv") as seg:
        seg.buf[:5] = b"hello"
        out = run_python(SYSV_C_READER, _key_by_documented_rule(ours), "open", timeout=30)
        assert out.stdout.strip() == "hello" and bytes(seg.buf[5:10]) == b"world"
        seg.unlink()
    # and a segment made by another program opens by name when it used shmkit's key rule
    run_python(SYSV_C_READER, _key_by_documented_rule(theirs), "create", timeout=30)
    with Segment.open(theirs, backend="sysv") as seg:
        assert seg.size == 4096 and bytes(seg.buf[5:10]) == b"world"
        seg.unlink()


# -- interop with multiprocessing.shared_memory ------------------------------------------------

SHARED_MEMORY_ATTACH = """
from multiprocessing import resource_tracker, shared_memory

def attach(name):
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # Python >= 3.13
    except TypeError:
        shm = shared_memory.SharedMemory(name=name)
        # before 3.13 attaching registers too, and the tracker would unlink it at our exit
        resource_tracker.unregister(shm._name, "shared_memory")
        return shm
"""


def test_posix_segment_opens_with_shared_memory(seg_name):
    with Segment.create(seg_name, 5000) as seg:
        seg.buf[:5] = b"hello"
        out = _child(SHARED_MEMORY_ATTACH +
                     "shm = attach(sys.argv[1])\n"
                     "print(json.dumps([bytes(shm.buf[:5]).decode(), shm.size]))\n"
                     "shm.buf[5:10] = b'world'\n"
                     "shm.close()",
                     seg_name)
        assert json.loads(out.stdout) == ["hello", 5000]
        assert "leaked" not in out.stderr and "Traceback" not in out.stderr
        assert bytes(seg.buf[5:10]) == b"world"
        assert segment.exists(seg_name)  # the stdlib's tracker did not remove our segment
        seg.unlink()


def test_shared_memory_segment_opens_as_segment(seg_name):
    out = _child("from multiprocessing import resource_tracker, shared_memory\n"
                 "shm = shared_memory.SharedMemory(name=sys.argv[1], create=True, size=3000)\n"
                 "shm.buf[:5] = b'hello'\n"
                 "resource_tracker.unregister(shm._name, 'shared_memory')  # handed over\n"
                 "shm.close()",
                 seg_name)
    assert "leaked" not in out.stderr
    with Segment.open(seg_name) as seg:
        assert seg.size == 3000 and bytes(seg.buf[:5]) == b"hello"
        assert seg.mode == 0o600
        seg.unlink()


# -- pickling and multiprocessing ---------------------------------------------------------------

def _worker_roundtrip(seg: Segment, offset: int, value: int) -> list:
    """Runs in a multiprocessing worker: read what the parent wrote, write a value back."""
    seen = [seg.name, seg.backend, seg.size, seg.buf[0]]
    seg.buf[offset] = value
    seg.close()
    return seen


def _worker_process(seg: Segment, offset: int, value: int) -> None:
    seen = _worker_roundtrip(seg, offset, value)
    if seen[3] != 1:
        raise SystemExit(3)


def test_pickle_reopens_by_name_and_backend(backend, seg_name):
    with Segment.create(seg_name, 4096, backend=backend) as seg:
        data = pickle.dumps(seg)
        assert seg_name.encode() in data and len(data) < 300  # a name, not the bytes
        clone = pickle.loads(data)
        assert (clone.name, clone.backend, clone.size) == (seg_name, backend, 4096)
        clone.buf[0] = 8
        assert seg.buf[0] == 8
        clone.close()
        ro = pickle.loads(pickle.dumps(Segment.open(seg_name, backend=backend, readonly=True)))
        assert ro.readonly
        ro.close()
        seg.unlink()


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_multiprocessing_workers_reopen_pickled_segments(backend, seg_name, method):
    ctx = multiprocessing.get_context(method)
    with Segment.create(seg_name, 4096, backend=backend) as seg:
        seg.buf[0] = 1
        with ctx.Pool(1) as pool:  # arguments travel pickled in both contexts
            seen = pool.apply_async(_worker_roundtrip, (seg, 1, 99)).get(timeout=60)
        assert seen == [seg_name, backend, 4096, 1]
        assert seg.buf[1] == 99
        seg.unlink()


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_anonymous_segment_reaches_process_children(method):
    ctx = multiprocessing.get_context(method)
    with Segment.anonymous(4096) as seg:
        assert seg.backend == "memfd" and seg.name.startswith("memfd:")
        seg.buf[0] = 1
        child = ctx.Process(target=_worker_process, args=(seg, 2, 123))
        child.start()  # spawn: the fd is passed along with the start
        child.join(timeout=60)
        assert child.exitcode == 0
        assert seg.buf[2] == 123


def test_anonymous_segment_through_a_pool_uses_proc_fd():
    ctx = multiprocessing.get_context("fork")
    with Segment.anonymous(4096) as seg:
        seg.buf[0] = 1
        with ctx.Pool(1) as pool:  # pickled after the worker started: /proc/PID/fd
            seen = pool.apply_async(_worker_roundtrip, (seg, 3, 77)).get(timeout=60)
        assert seen[1:] == ["memfd", 4096, 1]
        assert seg.buf[3] == 77


def test_anonymous_segment_pickled_to_an_unrelated_process():
    with Segment.anonymous(4096) as seg:
        seg.buf[0] = 6
        _child("import pickle\n"
               "s = pickle.loads(bytes.fromhex(sys.argv[1]))\n"
               "assert s.buf[0] == 6 and s.size == 4096\n"
               "s.buf[1] = 7\n"
               "s.close()",
               pickle.dumps(seg).hex())
        assert seg.buf[1] == 7


def test_anonymous_segment_whose_creator_exited_gives_clear_error():
    out = _child("import pickle\n"
                 "s = Segment.anonymous(4096)\n"
                 "print(pickle.dumps(s).hex())")
    with pytest.raises(SegmentNotFoundError, match="its creator closed it or exited"):
        pickle.loads(bytes.fromhex(out.stdout.strip()))


def test_anonymous_segment_closed_by_creator_never_maps_another_file():
    seg = Segment.anonymous(4096)
    data = pickle.dumps(seg)
    seg.close()
    impostor = os.memfd_create("impostor")  # most likely reuses the same fd number
    try:
        os.ftruncate(impostor, 4096)
        with pytest.raises(SegmentNotFoundError, match="creator closed it"):
            pickle.loads(data)
    finally:
        os.close(impostor)
    with pytest.raises(ValueError, match="closed"):
        pickle.dumps(seg)


def test_anonymous_segment_has_no_name_to_unlink():
    with Segment.anonymous(100) as seg:
        seg.unlink()
        assert seg.size == 100 and seg.mode & 0o700
