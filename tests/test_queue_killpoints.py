"""Queue: SIGKILL a process exactly at each state transition of the ring, not at random times.

A victim interpreter loops over every put and get path (put, put_many, reserve, get,
get_many, get_view) on a small ring that wraps constantly. gdb stops it at a chosen line of
ring.c (every line that stores or CASes shared memory, and the line after it, so both sides
of each transition), and the victim is SIGKILLed there. The survivor (this test) then
drains the queue and checks the crash contract of docs/queue.md: nothing torn, nothing
twice, per-producer order kept, nothing acknowledged lost beyond what the killed consumer had
taken, no wait longer than the recovery slice, and the ring fully usable afterwards.

Slow (an interpreter start and a gdb attach per kill point): soak only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import shlex
import subprocess
import sys
import threading
import zlib

import pytest

import shmkit
from shmkit.errors import Empty
from shmkit.queue import Queue
from procs import kill, spawn_python, wait_for_line

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed"),
]

RING_C = os.path.join(os.path.dirname(shmkit.__file__), "_native", "ring.c")
HEAD = struct.Struct("<IIII")   # producer tag, 0, sequence, crc32 of the body

VICTIM = r"""
import os, struct, sys, zlib
from shmkit.queue import Queue, Empty, Full
name, tmp = sys.argv[1], sys.argv[2]
head = struct.Struct("<IIII")
q = Queue.open(name)
acks = os.open(os.path.join(tmp, "acks"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
log = os.open(os.path.join(tmp, "log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
seq = 0

def msg(n):
    body = bytes([n % 251]) * (n * 37 % 300)
    return head.pack(1, 0, n, zlib.crc32(body)) + body

def taken(msgs):
    os.write(log, b"".join(b"%d\n" % head.unpack_from(m)[2] for m in msgs))

print("ready", flush=True)
while True:
    try:
        q.put(msg(seq), timeout=0.2)
        os.write(acks, b"%d\n" % seq)
        seq += 1
        batch = [msg(seq + k) for k in range(20)]
        try:
            q.put_many(batch, timeout=0.2)
            done = 20
        except Full as exc:
            done = exc.put_count
        os.write(acks, b"".join(b"%d\n" % (seq + k) for k in range(done)))
        seq += done
        m = msg(seq)
        with q.reserve(len(m), timeout=0.2) as buf:
            buf[:] = m
        os.write(acks, b"%d\n" % seq)
        seq += 1
    except Full:
        pass
    for _ in range(3):
        try:
            taken([q.get(timeout=0.2)])
            taken(q.get_many(8, timeout=0.2))
            with q.get_view(timeout=0.2) as view:
                m = bytes(view)
            taken([m])
        except Empty:
            pass
"""


def _kill_points() -> list[int]:
    """Lines of the hot paths that write shared memory, and the line after each."""
    text = open(RING_C).read().split("\n")
    hot = ("try_reserve", "finish_reserved", "give_back", "try_take", "release_taken",
           "help_free", "help_head", "Ring_put_many", "put_one", "copy_taken")
    lines, current = [], None
    for number, line in enumerate(text, 1):
        m = re.match(r"^static [^(]*\b(\w+)\(", line)
        if m:
            current = m.group(1)
        if current in hot and re.search(r"\b(cas64|cas64_v|st_rel|st_rlx|atomic_store)\(", line):
            lines += [number, number + 1]
    return sorted(set(lines))


def _ints(path) -> list[int]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.parametrize("line", _kill_points())
def test_sigkill_at_each_ring_transition(seg_name, tmp_path, line):
    q = Queue.create(seg_name, capacity=4096)
    victim = spawn_python(VICTIM, seg_name, tmp_path)
    try:
        wait_for_line(victim, "ready", timeout=30)
        try:
            gdb = subprocess.run(
                ["gdb", "-p", str(victim.pid), "-batch", "-nx",
                 "-ex", "set breakpoint pending off", "-ex", f"break ring.c:{line}",
                 "-ex", "continue", "-ex", "signal SIGKILL"],
                capture_output=True, text=True, timeout=20)
            stopped = re.search(r"Breakpoint 1(\.\d+)?, ", gdb.stdout) is not None
        except subprocess.TimeoutExpired:
            stopped = False   # this path never ran within the time: nothing to test here
        kill(victim)
        if not stopped:
            pytest.skip(f"ring.c:{line} was not reached")
        assert victim.returncode == -signal.SIGKILL

        drained = []
        while True:   # survivors wait at most a recovery slice per dead record
            try:
                drained.extend(q.get_many(100, timeout=2))
            except Empty:
                break
        received = _ints(tmp_path / "log")
        for m in drained:
            _, _, seq, crc = HEAD.unpack_from(m)
            assert zlib.crc32(m[HEAD.size:]) == crc, f"torn message {seq}"
            received.append(seq)
        assert len(received) == len(set(received)), "a message was delivered twice"
        drained_seqs = [HEAD.unpack_from(m)[2] for m in drained]
        assert drained_seqs == sorted(drained_seqs), "per-producer order broken"
        lost = set(_ints(tmp_path / "acks")) - set(received)
        assert len(lost) <= 8, f"acknowledged messages lost: {sorted(lost)}"

        for _ in range(3):   # the whole ring works again
            q.put_many([b"x" * 100] * 30, timeout=5)
            assert q.get_many(100, timeout=5) == [b"x" * 100] * 30
        stats = q.stats()
        assert stats["being_written"] == 0 and stats["being_read"] == 0
        assert "problem" not in stats
    finally:
        if victim.poll() is None:
            kill(victim)
        q.unlink()
        q.detach()


# -- the tag-wrap (ABA) guards: a process stalled between reading a header and its CAS ---------

TAG_PERIOD = 1 << 42   # tags are pos >> 4 on 38 bits: the same words come back every 2^42 bytes
CTRL = 128
RING = 4096


def _word(pos: int, state: int, owner: int = 0) -> int:
    return (((pos >> 4) & ((1 << 38) - 1)) << 26) | (state << 22) | owner


def _line_of(pattern: str) -> int:
    """The line of ring.c that matches the regular expression `pattern`."""
    for number, line in enumerate(open(RING_C).read().split("\n"), 1):
        if re.search(pattern, line):
            return number
    raise AssertionError(f"{pattern!r} not in ring.c")


def _stall_and_rewrite(victim, line: int, rewrite_code: str, *args) -> None:
    """Attach gdb to the victim (which waits for a line on stdin), stop it at ring.c:line,
    run `rewrite_code` (a script rewriting the segment) while it is stopped, then let it go on."""
    script = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-c", rewrite_code, *args))
    marker = f"/tmp/shmkit-gdb-ready-{victim.pid}"
    gdb = subprocess.Popen(
        ["gdb", "-p", str(victim.pid), "-batch", "-nx", "-ex", "set breakpoint pending off",
         "-ex", f"break ring.c:{line}", "-ex", f"shell touch {marker}", "-ex", "continue",
         "-ex", f"shell {script}", "-ex", "delete", "-ex", "detach"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3000):
            if os.path.exists(marker) or gdb.poll() is not None:
                break
            threading.Event().wait(0.01)
        victim.stdin.write("go\n")   # now run into the breakpoint
        victim.stdin.flush()
        out, err = gdb.communicate(timeout=60)
    finally:
        if gdb.poll() is None:
            gdb.kill()
            gdb.wait(10)
        if os.path.exists(marker):
            os.unlink(marker)
    assert re.search(r"Breakpoint 1(\.\d+)?, ", out), out + err


REWRITE_TAKE = r"""
import sys
from shmkit import _native
from shmkit.queue import Queue
q = Queue.open(sys.argv[1])
buf, cap, lap = q.segment.buf, q.capacity, 1 << 42
def word(pos, st): return (((pos >> 4) & ((1 << 38) - 1)) << 26) | (st << 22)
# The stalled consumer read the COMMITTED header at 0 (a 100-byte message). Exactly 2^42
# bytes later the same slot holds another COMMITTED record (the identical word) of 50 bytes.
_native.store_u64(buf, 4096 + 8, 50)
buf[4096 + 16:4096 + 16 + 50] = b"B" * 50
_native.store_u64(buf, 4096 + 80, word(lap + 80, 1))     # VACANT at its end
for off, value in ((64, lap + 80), (128, lap), (192, lap)):   # tail, head, free
    _native.store_u64(buf, 128 + off, value)
q.detach()
"""


def test_stale_take_across_a_tag_wrap_is_given_back(seg_name):
    q = Queue.create(seg_name, capacity=4096)
    try:
        q.put(b"A" * 100)
        victim = spawn_python(
            "import sys\nfrom shmkit.queue import Queue\n"
            "q = Queue.open(sys.argv[1])\n"
            "print('ready', flush=True)\n"
            "sys.stdin.readline()\n"
            "print(q.get(timeout=20).hex(), flush=True)\n", seg_name, stdin=subprocess.PIPE)
        wait_for_line(victim, "ready")
        _stall_and_rewrite(victim, _line_of(r"cas64\(rp, &w, mkw\(p, ST_TAKEN, \w+\)\)"), REWRITE_TAKE, seg_name)
        out, err = victim.communicate(timeout=30)
        assert bytes.fromhex(out.strip()) == b"B" * 50, err   # not 100 bytes of mixed laps
        assert q.stats()["being_read"] == 0
    finally:
        if victim.poll() is None:
            kill(victim)
        q.unlink()
        q.detach()


REWRITE_CLAIM = r"""
import sys
from shmkit import _native
from shmkit.queue import Queue
q = Queue.open(sys.argv[1])
buf, cap, lap = q.segment.buf, q.capacity, 1 << 42
def word(pos, st): return (((pos >> 4) & ((1 << 38) - 1)) << 26) | (st << 22)
# The stalled producer read VACANT at position 0 with an empty ring. Exactly 2^42 bytes later
# the identical VACANT word sits at the same slot, but the ring is full of unread messages:
# records of 64 + 16 bytes from lap - cap + 80 up to lap (a PAD fills the gap at the wrap).
free = lap - cap + 80
pos = free
while pos < lap:
    off = pos % cap
    if cap - off < 80:
        _native.store_u64(buf, 4096 + off + 8, cap - off - 16)
        _native.store_u64(buf, 4096 + off, word(pos, 8))               # PAD
        pos += cap - off
        continue
    n = (pos // 16) % 251
    buf[4096 + off + 16:4096 + off + 80] = bytes([n]) * 64
    _native.store_u64(buf, 4096 + off + 8, 64)
    _native.store_u64(buf, 4096 + off, word(pos, 4))                   # COMMITTED
    pos += 80
assert pos == lap
for off, value in ((64, lap), (128, free), (192, free)):   # tail, head, free
    _native.store_u64(buf, 128 + off, value)
q.detach()
"""


def test_stale_claim_across_a_tag_wrap_is_undone(seg_name):
    q = Queue.create(seg_name, capacity=4096)
    try:
        victim = spawn_python(
            "import sys\nfrom shmkit.queue import Queue, Full\n"
            "q = Queue.open(sys.argv[1])\n"
            "print('ready', flush=True)\n"
            "sys.stdin.readline()\n"
            "try:\n"
            "    q.put(b'C' * 200, timeout=1)\n"
            "    print('put', flush=True)\n"
            "except Full:\n"
            "    print('full', flush=True)\n", seg_name, stdin=subprocess.PIPE)
        wait_for_line(victim, "ready")
        _stall_and_rewrite(victim, _line_of(r"cas64\(h, &w, mkw\(t, ST_CLAIMED, \w+\)\)"), REWRITE_CLAIM, seg_name)
        out, err = victim.communicate(timeout=30)
        assert out.split() == ["full"], err   # no room in the real lap: it must not write
        got = q.get_many(1000, timeout=5)     # every unread message is intact
        assert len(got) == 50 and all(len(set(m)) == 1 and len(m) == 64 for m in got)
        assert q.stats()["being_written"] == 0 and "problem" not in q.stats()
    finally:
        if victim.poll() is None:
            kill(victim)
        q.unlink()
        q.detach()
