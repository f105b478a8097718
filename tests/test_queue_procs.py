"""Queue across unrelated processes: exactly-once delivery, and SIGKILL at any moment.

The crash guarantee checked here (docs/queue.md): no torn or partial message is ever
delivered; no message is delivered twice; a message whose put() returned is delivered unless
a consumer that took it was killed (at most one message per killed consumer); the survivors
never hang.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time

import pytest

from shmkit import _native
from shmkit.queue import RING_OFFSET, Queue
from procs import kill, run_python, spawn_python, stop, wait_for_line

# -- exactly once, in order per producer ------------------------------------------------------

PRODUCER = r"""
import random, struct, sys, zlib
from shmkit.queue import Queue
name, ident, count, max_body, seed = sys.argv[1], *map(int, sys.argv[2:6])
q = Queue.open(name)
rng = random.Random(seed)
pool = rng.randbytes(max_body + 4096)
head = struct.Struct("<IIII")   # producer, sequence, body length, crc32
for seq in range(count):
    size = rng.randrange(0, max_body + 1)
    start = rng.randrange(0, 4096)
    body = pool[start:start + size]
    msg = head.pack(ident, seq, size, zlib.crc32(body)) + body
    if seq % 3 == 0:
        with q.reserve(len(msg), timeout=120) as buf:
            buf[:] = msg
    else:
        q.put(msg, timeout=120)
q.detach()
print("done", flush=True)
"""

CONSUMER = r"""
import struct, sys, zlib
from shmkit.queue import Queue, QueueClosed
name, out, style = sys.argv[1], sys.argv[2], int(sys.argv[3])
q = Queue.open(name)
head = struct.Struct("<IIII")
lines = []

def check(m):
    ident, seq, size, crc = head.unpack_from(m)
    ok = len(m) == head.size + size and zlib.crc32(m[head.size:]) == crc
    lines.append(f"{ident} {seq} {int(ok)}")

try:
    while True:
        if style == 0:
            check(q.get(timeout=120))
        elif style == 1:
            for m in q.get_many(32, timeout=120):
                check(m)
        else:
            with q.get_view(timeout=120) as view:
                check(bytes(view))
except QueueClosed:
    pass
with open(out, "w") as f:
    f.write("\n".join(lines))
q.detach()
"""


def _exactly_once(name, tmp_path, per_producer, producers=4, consumers=3,
                  max_message=64 * 1024):
    q = Queue.create(name, capacity=1 << 20, max_message=max_message)
    try:
        outs = [tmp_path / f"consumer{i}.txt" for i in range(consumers)]
        cons = [spawn_python(CONSUMER, name, outs[i], i % 3) for i in range(consumers)]
        prods = [spawn_python(PRODUCER, name, i, per_producer, max_message - 16, 1000 + i)
                 for i in range(producers)]
        for p in prods:
            out, err = stop(p, timeout=600)
            assert p.returncode == 0, err
        q.close()
        for c in cons:
            out, err = stop(c, timeout=600)
            assert c.returncode == 0, err
        seen = set()
        total = 0
        for path in outs:
            last: dict[int, int] = {}
            text = path.read_text()
            for line in filter(None, text.split("\n")):
                ident, seq, ok = map(int, line.split())
                assert ok == 1, f"torn message {ident}:{seq}"
                assert seq > last.get(ident, -1), "a consumer saw a producer's messages out of order"
                last[ident] = seq
                assert (ident, seq) not in seen, f"duplicate {ident}:{seq}"
                seen.add((ident, seq))
                total += 1
        assert total == producers * per_producer
    finally:
        q.unlink()


def test_exactly_once_in_order_4_producers_3_consumers_200k_messages(seg_name, tmp_path):
    """4 x 50,000 messages of 16 B .. 64 KiB, read with get, get_many and get_view."""
    _exactly_once(seg_name, tmp_path, per_producer=50_000)


@pytest.mark.soak
def test_exactly_once_in_order_1m_messages_soak(seg_name, tmp_path):
    _exactly_once(seg_name, tmp_path, per_producer=250_000)


# -- crash loop ------------------------------------------------------------------------------

# Victims are forked from a "zygote" interpreter that has already imported shmkit, so a
# restart costs a fork (about a millisecond) instead of an interpreter start. Each victim
# opens the queue itself after the fork, like an unrelated process.
ZYGOTE = r"""
import os, random, struct, sys, time, zlib
from shmkit.queue import Queue, Empty, Full, QueueClosed
name, tmp = sys.argv[1], sys.argv[2]
batch, max_body, take_many = map(int, sys.argv[3:6])
stopfile = os.path.join(tmp, "stop")
head = struct.Struct("<IIII")   # producer, incarnation, sequence, crc32 of the body

def produce(ident, inc):
    q = Queue.open(name)
    rng = random.Random(inc)
    fd = os.open(os.path.join(tmp, "ack%d.txt" % ident), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    seq = 0
    while not os.path.exists(stopfile):
        if seq % 5 == 1:   # a batch, claimed with one CAS
            msgs = []
            for k in range(batch):
                body = rng.randbytes(rng.randrange(0, max_body // 3))
                msgs.append(head.pack(ident, inc, seq + k, zlib.crc32(body)) + body)
            try:
                q.put_many(msgs, timeout=0.5)
            except Full as exc:
                done = exc.put_count   # those went in, in order
                for k in range(done):
                    os.write(fd, b"%d %d %d\n" % (ident, inc, seq + k))
                seq += done
                continue
            os.write(fd, b"".join(b"%d %d %d\n" % (ident, inc, seq + k) for k in range(batch)))
            seq += batch
            continue
        body = rng.randbytes(rng.randrange(0, max_body))
        msg = head.pack(ident, inc, seq, zlib.crc32(body)) + body
        try:
            if seq % 4 == 0:
                with q.reserve(len(msg), timeout=0.5) as buf:
                    buf[:len(msg) // 2] = msg[:len(msg) // 2]
                    if seq % 16 == 0:
                        time.sleep(0.002)   # widen the window for a kill mid-write
                    buf[len(msg) // 2:] = msg[len(msg) // 2:]
            else:
                q.put(msg, timeout=0.5)
        except Full:
            continue
        os.write(fd, b"%d %d %d\n" % (ident, inc, seq))   # acknowledged: put() returned
        seq += 1

def consume(ident):
    q = Queue.open(name)
    fd = os.open(os.path.join(tmp, "log%d.txt" % ident), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    n = 0
    while True:
        try:
            if n % 3 == 2:
                with q.get_view(timeout=0.5) as view:
                    got = [bytes(view)]
                    if n % 9 == 2:
                        time.sleep(0.002)   # widen the window for a kill mid-read
            elif n % 3 == 1 and take_many:
                got = q.get_many(take_many, timeout=0.5)
            else:
                got = [q.get(timeout=0.5)]
        except Empty:
            continue
        except QueueClosed:
            return
        n += 1
        lines = []
        for m in got:
            ident_, inc, seq, crc = head.unpack_from(m)
            ok = zlib.crc32(m[head.size:]) == crc
            lines.append(b"%d %d %d %d\n" % (ident_, inc, seq, ok))
        os.write(fd, b"".join(lines))

print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "reap":
        pid, status = os.waitpid(int(cmd[1]), 0)
        print("reaped %d" % status, flush=True)
        continue
    if cmd[0] == "exit":
        break
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if cmd[0] == "p":
                produce(int(cmd[1]), int(cmd[2]))
            else:
                consume(int(cmd[1]))
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        os._exit(code)
    print(pid, flush=True)
"""


def _parse(path, width):
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == width and all(p.isdigit() for p in parts):
                rows.append(tuple(map(int, parts)))
    return rows


def _crash_loop(name, tmp_path, kills_wanted, producers=2, consumers=2, seed=None,
                capacity=32 * 1024, batch=3, max_body=1500, take_many=0):
    """Kill random workers mid-stream; check nothing torn, duplicated, reordered or lost.

    `take_many` > 0 makes consumers also use get_many(take_many), so a killed consumer may
    lose up to that many messages (the ones it had taken).
    """
    rng = random.Random(seed)
    q = Queue.create(name, capacity=capacity, max_message=2048)
    zygote = spawn_python(ZYGOTE, name, tmp_path, batch, max_body, take_many,
                          stdin=subprocess.PIPE)
    workers: dict[tuple[str, int], int] = {}
    incarnation = 0
    consumer_kills = 0

    def ask(command: str) -> str:
        zygote.stdin.write(command + "\n")
        zygote.stdin.flush()
        return zygote.stdout.readline().strip()

    def start(role, i):
        nonlocal incarnation
        incarnation += 1
        workers[(role, i)] = int(ask(f"{role} {i} {incarnation}"))

    try:
        wait_for_line(zygote, "ready", timeout=60)
        for i in range(producers):
            start("p", i)
        for i in range(consumers):
            start("c", i)
        for _ in range(kills_wanted):
            time.sleep(rng.uniform(0.002, 0.02))
            role, i = rng.choice(list(workers))
            pid = workers[(role, i)]
            os.kill(pid, signal.SIGKILL)
            assert ask(f"reap {pid}") == f"reaped {signal.SIGKILL}", "a victim exited early"
            consumer_kills += role == "c"
            start(role, i)
        open(tmp_path / "stop", "w").close()
        for i in range(producers):
            assert ask(f"reap {workers[('p', i)]}") == "reaped 0"
        recovered = q.stats()
        q.close()
        for i in range(consumers):
            assert ask(f"reap {workers[('c', i)]}") == "reaped 0"
        ask("exit")
        stop(zygote, timeout=30)
    finally:
        if zygote.poll() is None:
            for pid in workers.values():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            kill(zygote)
        q.unlink()

    acked = set()
    for i in range(producers):
        acked.update(_parse(tmp_path / f"ack{i}.txt", 3))
    received = []
    for i in range(consumers):
        rows = _parse(tmp_path / f"log{i}.txt", 4)
        last: dict[tuple[int, int], int] = {}
        for ident, inc, seq, _ in rows:   # each consumer sees each producer's messages in order
            assert seq > last.get((ident, inc), -1), f"out of order: {ident}/{inc}: {seq}"
            last[(ident, inc)] = seq
        received.extend(rows)
    torn = [r for r in received if r[3] != 1]
    assert not torn, f"torn messages delivered: {torn[:5]}"
    ids = [r[:3] for r in received]
    assert len(ids) == len(set(ids)), "a message was delivered twice"
    lost = acked - set(ids)
    assert len(lost) <= consumer_kills * max(1, take_many), (
        f"{len(lost)} acknowledged messages lost with only {consumer_kills} consumer kills")
    assert len(acked) > kills_wanted   # the stream really flowed between kills
    return {"acked": len(acked), "lost_acked": len(lost), "consumer_kills": consumer_kills,
            "aborted": recovered["aborted"], "lost": recovered["lost"]}


def test_crash_loop_sigkill_random_producers_and_consumers(seg_name, tmp_path):
    """At least 200 SIGKILLs mid-stream, each victim restarted (the soak test does 2,000)."""
    _crash_loop(seg_name, tmp_path, kills_wanted=200, seed=4)


@pytest.mark.soak
def test_crash_loop_soak(seg_name, tmp_path):
    _crash_loop(seg_name, tmp_path, kills_wanted=2000, producers=3, consumers=3)


def test_crash_loop_large_ring_small_messages_big_batches(seg_name, tmp_path):
    """Tens of thousands of records in the ring (recovery must not depend on them being near
    `free`), put_many batches longer than a consumer steps past, get_many consumers."""
    _crash_loop(seg_name, tmp_path, kills_wanted=100, seed=5, capacity=1 << 20, batch=40,
                max_body=60, take_many=8)


@pytest.mark.soak
def test_crash_loop_large_ring_soak(seg_name, tmp_path):
    _crash_loop(seg_name, tmp_path, kills_wanted=2000, producers=3, consumers=3,
                capacity=1 << 20, batch=40, max_body=60, take_many=8)


# -- single, deterministic crashes -----------------------------------------------------------

def test_producer_killed_mid_reserve_is_skipped_never_delivered(seg_name):
    q = Queue.create(seg_name, capacity=4096)
    try:
        child = spawn_python(
            "import sys, time\nfrom shmkit.queue import Queue\n"
            "q = Queue.open(sys.argv[1])\n"
            "with q.reserve(200) as buf:\n"
            "    buf[:100] = b'h' * 100\n"
            "    print('ready', flush=True)\n"
            "    time.sleep(60)\n", seg_name)
        wait_for_line(child, "ready")
        q.put(b"before the kill")
        kill(child)
        q.put(b"after the kill")
        assert q.get(timeout=10) == b"before the kill"
        assert q.get(timeout=10) == b"after the kill"
        with pytest.raises(Exception) as info:
            q.get(timeout=0.05)
        assert type(info.value).__name__ == "Empty"
        # The dead record's space comes back: the ring fills and drains completely.
        for _ in range(3):
            q.put_many([b"f" * 400] * 9, timeout=10)
            assert len(q.get_many(100, timeout=10)) == 9
        assert q.stats()["aborted"] == 1
    finally:
        q.unlink()
        q.detach()


def test_consumer_killed_holding_a_message_loses_only_that_one(seg_name):
    q = Queue.create(seg_name, capacity=4096)
    try:
        q.put(b"taken by the victim")
        q.put(b"for the survivor")
        child = spawn_python(
            "import sys, time\nfrom shmkit.queue import Queue\n"
            "q = Queue.open(sys.argv[1])\n"
            "with q.get_view() as view:\n"
            "    print(bytes(view).decode(), flush=True)\n"
            "    time.sleep(60)\n", seg_name)
        wait_for_line(child, "taken by the victim")
        kill(child)
        assert q.get(timeout=10) == b"for the survivor"
        # Producers need the dead consumer's space: recovery frees it within a slice.
        for _ in range(3):
            q.put_many([b"g" * 400] * 9, timeout=10)
            assert q.get_many(100, timeout=10) == [b"g" * 400] * 9
        stats = q.stats()
        assert stats["lost"] == 1 and stats["being_read"] == 0
    finally:
        q.unlink()
        q.detach()


def _dead_tid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    assert not _native.task_alive(proc.pid)
    return proc.pid


def test_producer_killed_between_claim_and_reservation_is_recovered(seg_name):
    """Forge the state a SIGKILL right after the claiming CAS leaves: CLAIMED by a dead task."""
    q = Queue.create(seg_name, capacity=4096)
    try:
        q.put(b"x" * 30)
        assert q.get() == b"x" * 30
        buf = q.segment.buf
        tail = _native.load_u64(buf, 128 + 64)
        claimed = ((tail >> 4) << 26) | (2 << 22) | _dead_tid()
        _native.store_u64(buf, RING_OFFSET + tail % q.capacity, claimed)
        q.put(b"recovered", timeout=10)
        assert q.get(timeout=10) == b"recovered"
    finally:
        q.unlink()
        q.detach()


def test_no_deadlock_when_a_consumer_waits_and_the_producer_dies(seg_name):
    q = Queue.create(seg_name, capacity=4096)
    try:
        child = spawn_python(
            "import sys, time\nfrom shmkit.queue import Queue\n"
            "q = Queue.open(sys.argv[1])\n"
            "with q.reserve(64) as buf:\n"
            "    print('ready', flush=True)\n"
            "    time.sleep(60)\n", seg_name)
        wait_for_line(child, "ready")
        consumer = spawn_python(
            "import sys\nfrom shmkit.queue import Queue, Empty\n"
            "q = Queue.open(sys.argv[1])\n"
            "print('waiting', flush=True)\n"
            "print(q.get(timeout=30).decode())\n", seg_name)
        wait_for_line(consumer, "waiting")
        kill(child)
        q.put(b"alive")
        out, err = stop(consumer, timeout=30)
        assert out.split() == ["alive"], err
    finally:
        q.unlink()
        q.detach()


def test_stats_see_processes_attached_from_elsewhere(seg_name):
    q = Queue.create(seg_name, capacity=4096)
    try:
        child = spawn_python(
            "import sys, time\nfrom shmkit.queue import Queue\n"
            "q = Queue.open(sys.argv[1])\n"
            "q.put(b'hi')\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n", seg_name)
        wait_for_line(child, "ready")
        stats = q.stats()
        assert stats["attached"] == 2 and stats["producers"] == 1 and stats["total_put"] == 1
        kill(child)
        stats = q.stats()
        assert stats["attached"] == 1 and stats["producers"] == 0 and stats["total_put"] == 1
        out = run_python("import sys\nfrom shmkit.queue import Queue\n"
                         "print(Queue.open(sys.argv[1]).stats()['depth_messages'])", seg_name)
        assert out.stdout.strip() == "1"
    finally:
        q.unlink()
        q.detach()


@pytest.mark.parametrize("call", ["q.put(b'y' * 900, timeout=60)", "q.get(timeout=60)"])
def test_ctrl_c_interrupts_a_blocked_put_or_get(seg_name, call):
    q = Queue.create(seg_name, capacity=1024)
    try:
        if call.startswith("q.put"):
            q.put(b"x" * 900)   # no room for another
        child = spawn_python(
            "import sys\nfrom shmkit.queue import Queue\n"
            "q = Queue.open(sys.argv[1])\n"
            "print('waiting', flush=True)\n"
            "try:\n"
            f"    {call}\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted', flush=True)\n", seg_name)
        wait_for_line(child, "waiting")
        while q.stats()["waiting_producers"] + q.stats()["waiting_consumers"] == 0:
            time.sleep(0.005)
        child.send_signal(signal.SIGINT)
        out, err = stop(child, timeout=30)
        assert out.split() == ["interrupted"], err
    finally:
        q.unlink()
        q.detach()


# -- review regressions: recovery is bounded however many records the ring holds --------------

def test_dead_claim_behind_a_long_backlog_is_recovered(seg_name):
    """A producer killed right after its claim, with thousands of messages queued before it:
    recovery must find the claim at the tail, not only near `free`."""
    q = Queue.create(seg_name, capacity=1 << 20)
    try:
        q.put_many([b""] * 6000)                  # 6000 records between free and the tail
        buf = q.segment.buf
        tail = _native.load_u64(buf, 128 + 64)
        claimed = ((tail >> 4) << 26) | (2 << 22) | _dead_tid()
        _native.store_u64(buf, RING_OFFSET + tail % q.capacity, claimed)
        q.put(b"after the dead claim", timeout=10)
        got = q.get_many(10_000, timeout=10)
        assert got == [b""] * 6000 + [b"after the dead claim"]
    finally:
        q.unlink()
        q.detach()


def test_consumers_pass_many_dead_reservations_while_free_lags(seg_name):
    """More dead reservations than a consumer steps past, thousands of freed records after
    `free` (consumers return space lazily): the survivors still get the next message."""
    q = Queue.create(seg_name, capacity=1 << 20)
    try:
        for _ in range(3):
            q.put_many([b""] * 2000)
            assert len(q.get_many(5000, timeout=10)) == 2000
        child = spawn_python(
            "import contextlib, sys, time\nfrom shmkit.queue import Queue\n"
            "q = Queue.open(sys.argv[1])\n"
            "stack = contextlib.ExitStack()\n"
            "for i in range(20):\n"
            "    stack.enter_context(q.reserve(8))\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n", seg_name)
        wait_for_line(child, "ready")
        kill(child)
        q.put(b"after the dead reservations")
        assert q.get(timeout=10) == b"after the dead reservations"
        stats = q.stats()
        assert stats["aborted"] == 20 and stats["being_written"] == 0
    finally:
        q.unlink()
        q.detach()


def test_waiting_count_forgets_a_waiter_killed_in_its_sleep(seg_name):
    q = Queue.create(seg_name, capacity=4096)
    try:
        child = spawn_python(
            "import sys\nfrom shmkit.queue import Queue\n"
            "q = Queue.open(sys.argv[1])\n"
            "print('waiting', flush=True)\n"
            "q.get(timeout=60)\n", seg_name)
        wait_for_line(child, "waiting")
        while q.stats()["waiting_consumers"] == 0:
            time.sleep(0.005)
        kill(child)
        assert q.stats()["waiting_consumers"] == 0
    finally:
        q.unlink()
        q.detach()


def test_fork_child_reservation_cannot_be_finished_by_the_child(seg_name):
    """A reservation entered before fork() belongs to the parent: the child gets a clear
    error (not CorruptSegmentError) and the parent still commits it."""
    q = Queue.create(seg_name, capacity=4096)
    try:
        out = run_python(
            "import os, sys\nfrom shmkit.queue import Queue\n"
            "q = Queue.open(sys.argv[1])\n"
            "with q.reserve(5) as buf:\n"
            "    buf[:] = b'fork!'\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        try:\n"
            "            q._commit(q._walk()['head'])\n"
            "        except RuntimeError as exc:\n"
            "            print('child:', 'not by this one' in str(exc), flush=True)\n"
            "        os._exit(0)\n"
            "    os.waitpid(pid, 0)\n"
            "print('parent committed', flush=True)\n", seg_name)
        assert out.stdout.split("\n")[:2] == ["child: True", "parent committed"]
        assert q.get(timeout=5) == b"fork!"
    finally:
        q.unlink()
        q.detach()


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/unshare"),
                    reason="needs root and unshare(1) to make a pid namespace")
def test_open_from_another_pid_namespace_is_refused(seg_name):
    """There, this process's pid means nothing: its recovery would take away live records."""
    q = Queue.create(seg_name, capacity=4096)
    try:
        q.put(b"held")
        with q.get_view() as view:
            out = subprocess.run(
                ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                 "import sys\nfrom shmkit.queue import Queue\nfrom shmkit.errors import ShmkitError\n"
                 "try:\n    Queue.open(sys.argv[1])._recover()\n    print('opened')\n"
                 "except ShmkitError as exc:\n    print('refused', 'pid namespace' in str(exc))\n",
                 seg_name], capture_output=True, text=True, timeout=60)
            if "refused" not in out.stdout and "opened" not in out.stdout:
                pytest.skip(f"cannot run in a new pid namespace here: {out.stderr[-200:]}")
            assert out.stdout.split() == ["refused", "True"]
            assert bytes(view) == b"held"
        assert q.stats()["lost"] == 0
    finally:
        q.unlink()
        q.detach()
