"""Broadcast across unrelated processes: fan-out integrity, exact lag counts, joins mid-stream,
SIGKILL of subscribers and of the publisher (with takeover).

Every child is a fresh interpreter (procs.spawn_python); every wait has a timeout. Messages
carry their index and a CRC of index and body, so a torn, lost or duplicated message is seen.
"""

from __future__ import annotations

import random
import signal
import zlib

import pytest

from procs import kill, spawn_python, stop, wait_for_line
from shmkit.broadcast import Broadcast

# Shared by the children: build and check self-describing messages.
FRAMES = r'''
import zlib
def frame(i, body):
    head = i.to_bytes(8, "little")
    return head + zlib.crc32(body, zlib.crc32(head)).to_bytes(4, "little") + body
def check(m):
    head, crc = m[:8], int.from_bytes(m[8:12], "little")
    assert zlib.crc32(m[12:], zlib.crc32(head)) == crc, "torn message %d" % int.from_bytes(head, "little")
    return int.from_bytes(head, "little")
'''

# Reads `n` messages and checks that they are intact, in order, with nothing missing.
SUB_ALL = FRAMES + r'''
import sys
from shmkit.broadcast import Broadcast
b = Broadcast.open(sys.argv[1]); n = int(sys.argv[2])
s = b.subscribe()
print("ready", flush=True)
expect = 0
while expect < n:
    for m in s.receive_many(512, timeout=60):
        i = check(m)
        assert i == expect, "got %d, expected %d" % (i, expect)
        expect += 1
print("ok", expect, flush=True)
'''


def bodies(seed: int, count: int, largest: int) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.randbytes(rnd.randint(0, largest)) for _ in range(count)]


def frame(i: int, body: bytes) -> bytes:
    head = i.to_bytes(8, "little")
    return head + zlib.crc32(body, zlib.crc32(head)).to_bytes(4, "little") + body


def fan_out(name: str, n: int, largest: int) -> None:
    b = Broadcast.create(name, 1 << 18, policy="block", max_subscribers=8)
    children = []
    try:
        children = [spawn_python(SUB_ALL, name, n) for _ in range(3)]
        for child in children:
            wait_for_line(child, "ready", timeout=60)
        pub = b.publisher()
        pool = bodies(1, 997, largest)
        batch = []
        for i in range(n):
            batch.append(frame(i, pool[i % len(pool)]))
            if len(batch) == 64 or i == n - 1:
                pub.publish_many(batch, timeout=60)
                batch = []
        for child in children:
            out, err = stop(child, timeout=120)
            assert child.returncode == 0, err
            assert out.split() == ["ok", str(n)]
        stats = b.stats()
        assert stats["published"] == n and stats["evictions"] == 0
    finally:
        for child in children:
            kill(child)
        b.close()
        b.unlink()


def test_three_subscriber_processes_get_every_message_intact_in_order(seg_name):
    fan_out(seg_name, 200_000, 600)


@pytest.mark.soak
def test_fan_out_soak_large_messages(seg_name):
    fan_out(seg_name, 1_000_000, 4000)


# -- overwrite: exact lag counts ------------------------------------------------------------

# A subscriber that sleeps now and then, so it falls behind; it logs every message index and
# every LaggedError count, then checks that each gap equals the counts reported inside it.
SUB_SLOW = FRAMES + r'''
import sys, time, random
from shmkit.broadcast import Broadcast, LaggedError
from shmkit.errors import QueueClosed
b = Broadcast.open(sys.argv[1]); mode = sys.argv[2]
s = b.subscribe(on_lag=mode)
print("ready", flush=True)
rnd = random.Random(7)
prev, pending, gaps, lags, got, episodes = -1, 0, 0, 0, 0, 0
while True:
    try:
        i = check(s.receive(timeout=60))
    except LaggedError as e:
        assert e.missed > 0
        pending += e.missed; lags += e.missed
        continue
    except QueueClosed:
        break
    if mode == "raise":
        assert i == prev + 1 + pending, "gap %d..%d but %d reported" % (prev, i, pending)
    gaps += i - prev - 1
    episodes += i != prev + 1
    prev, pending, got = i, 0, got + 1
    if rnd.random() < 0.02:
        time.sleep(rnd.random() * 0.003)
assert s.missed == gaps, (s.missed, gaps)
if mode == "raise":
    assert lags == gaps
print("ok", got, gaps, prev, episodes, flush=True)
'''


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_slow_subscriber_lag_counts_equal_the_gaps_exactly(seg_name, mode):
    import time

    n = 60_000
    b = Broadcast.create(seg_name, 8192, policy="overwrite")
    child = None
    try:
        child = spawn_python(SUB_SLOW, seg_name, mode)
        wait_for_line(child, "ready", timeout=60)
        pub = b.publisher()
        pool = bodies(2, 101, 120)
        rnd = random.Random(11)
        i = 0
        while i < n:  # bursts of random length, so the reader laps many times
            for _ in range(min(rnd.randint(1, 400), n - i)):
                pub.publish(frame(i, pool[i % len(pool)]))
                i += 1
            time.sleep(rnd.random() * 0.001)
        pub.close(end_stream=True)
        out, err = stop(child, timeout=120)
        assert child.returncode == 0, err
        _, got, gaps, last, episodes = out.split()
        assert int(last) == n - 1 and int(got) + int(gaps) == n
        assert int(episodes) >= 5  # the test did make it lag, repeatedly
    finally:
        if child is not None:
            kill(child)
        b.close()
        b.unlink()


# -- joining mid-stream -----------------------------------------------------------------------

# Publishes at a moderate pace until a line arrives on stdin, then 1000 more, then ends.
PUB_PACED = FRAMES + r'''
import select, sys, time
from shmkit.broadcast import Broadcast
b = Broadcast.open(sys.argv[1])
pub = b.publisher()
print("ready", flush=True)
i, last = 0, None
while last is None or i < last:
    pub.publish(frame(i, b"j" * (i % 50)), timeout=60)
    i += 1
    if i % 200 == 0:
        time.sleep(0.002)
        if last is None and select.select([sys.stdin], [], [], 0)[0]:
            last = i + 1000
pub.close(end_stream=True)
print("done", i, flush=True)
'''

# Joins, noting the published count just before and just after subscribing, then checks that
# the first message is where the documentation says and that nothing is missing after it.
SUB_JOIN = FRAMES + r'''
import sys
from shmkit.broadcast import Broadcast
from shmkit.errors import QueueClosed
b = Broadcast.open(sys.argv[1]); start = sys.argv[2]
before = b.stats()["published"]
s = b.subscribe(start)
stats = b.stats()
after, oldest = stats["published"], stats["oldest_seq"]
print("joined", flush=True)
first = prev = check(s.receive(timeout=60))
count = 1
try:
    while True:
        i = check(s.receive(timeout=60))
        assert i == prev + 1, (prev, i)
        prev, count = i, count + 1
except QueueClosed:
    pass
print(before, after, first, prev, count, oldest, flush=True)
'''


def test_subscribers_joining_mid_stream_start_where_documented(seg_name):
    import subprocess
    import time

    b = Broadcast.create(seg_name, 1 << 16, policy="block", max_subscribers=16)
    pub = joiners = None
    try:
        pub = spawn_python(PUB_PACED, seg_name, stdin=subprocess.PIPE)
        wait_for_line(pub, "ready", timeout=60)
        joiners = []
        for k in range(8):
            start = ("next", "oldest")[k % 2]
            joiners.append((start, spawn_python(SUB_JOIN, seg_name, start)))
            time.sleep(0.01)  # spread the joins over the stream (not a correctness wait)
        for _, child in joiners:
            wait_for_line(child, "joined", timeout=60)
        pub.stdin.write("stop\n")
        pub.stdin.flush()
        results = []
        for start, child in joiners:
            out, err = stop(child, timeout=120)
            assert child.returncode == 0, err
            before, after, first, last, count, oldest = map(int, out.split())
            results.append((start, before, after, first, last, count, oldest))
        out, err = stop(pub, timeout=120)
        assert pub.returncode == 0, err
        n = int(out.split()[1])
        for start, before, after, first, last, count, oldest in results:
            assert last == n - 1 and count == n - first  # nothing lost after the first
            if start == "next":
                # every message published after subscribe() returned, and none from before
                assert before <= first <= after
            else:
                # the oldest retained message when it joined; from then on the joiner holds
                # the tail there (block policy), so it is still the oldest just after
                assert first == oldest <= after
    finally:
        for child in [pub] + [c for _, c in (joiners or [])]:
            if child is not None:
                kill(child)
        b.close()
        b.unlink()


# -- SIGKILL of subscribers (block policy) ------------------------------------------------------

# Reads as fast as it can until killed.
SUB_VICTIM = r'''
import sys
from shmkit.broadcast import Broadcast
b = Broadcast.open(sys.argv[1])
s = b.subscribe()
print("ready", flush=True)
while True:
    s.receive_many(int(sys.argv[2]), timeout=60)
'''

# Publishes n messages (block policy) and reports the stats.
PUB_N = FRAMES + r'''
import sys, json
from shmkit.broadcast import Broadcast
b = Broadcast.open(sys.argv[1]); n = int(sys.argv[2])
pub = b.publisher()
print("ready", flush=True)
for i in range(n):
    pub.publish(frame(i, b"k" * (i % 300)), timeout=60)
st = b.stats()
print(json.dumps({"published": st["published"], "evictions": st["evictions"]}), flush=True)
'''


def kill_subscribers(name: str, kills: int, n: int) -> None:
    import json

    b = Broadcast.create(name, 1 << 14, policy="block", max_subscribers=4, grace=None)
    rnd = random.Random(3)
    survivor = publisher = None
    try:
        survivor = spawn_python(SUB_ALL, name, n)
        wait_for_line(survivor, "ready", timeout=60)
        publisher = spawn_python(PUB_N, name, n)
        wait_for_line(publisher, "ready", timeout=60)
        for k in range(kills):
            victim = spawn_python(SUB_VICTIM, name, rnd.choice([1, 7, 300]))
            wait_for_line(victim, "ready", timeout=60)
            if rnd.random() < 0.5:
                victim.send_signal(signal.SIGSTOP)  # dies stuck: its cursor stops mid-ring
            kill(victim)
        out, err = stop(publisher, timeout=120)
        assert publisher.returncode == 0, err
        stats = json.loads(out.strip())
        assert stats["published"] == n
        out, err = stop(survivor, timeout=120)
        assert survivor.returncode == 0, err
        assert out.split() == ["ok", str(n)]
        # slots of dead subscribers are reclaimed: all four can be taken again
        subs = [b.subscribe() for _ in range(4)]
        assert len({s.slot for s in subs}) == 4
    finally:
        for child in (survivor, publisher):
            if child is not None:
                kill(child)
        b.close()
        b.unlink()


def test_killed_subscribers_never_stall_the_publisher_or_the_survivors(seg_name):
    kill_subscribers(seg_name, 12, 60_000)


@pytest.mark.soak
def test_killed_subscribers_soak(seg_name):
    kill_subscribers(seg_name, 200, 1_000_000)


# -- SIGKILL of the publisher, with takeover --------------------------------------------------

# Takes over the publisher role and publishes (mixing publish, publish_many and reserve)
# until killed, each message numbered with its sequence number.
PUB_VICTIM = FRAMES + r'''
import sys, random
from shmkit.broadcast import Broadcast
b = Broadcast.open(sys.argv[1]); final = int(sys.argv[2])
pub = b.publisher()
print("took_over" if pub.took_over else "fresh", flush=True)
rnd = random.Random(pub.next_seq)
while True:
    i = pub.next_seq
    if final and i >= final:
        break
    r = rnd.random()
    body = b"p" * rnd.randint(0, 900)
    if r < 0.4:
        pub.publish(frame(i, body), timeout=60)
    elif r < 0.7:
        pub.publish_many([frame(i + k, body) for k in range(rnd.randint(1, 20))], timeout=60)
    else:
        m = frame(i, body)
        with pub.reserve(len(m), timeout=60) as buf:
            buf[:8] = m[:8]
            buf[8:] = m[8:]
pub.close(end_stream=True)
print("done", i, flush=True)
'''

# Receives until the stream ends; every message intact, numbered 0, 1, 2, ... without holes.
SUB_UNTIL_END = FRAMES + r'''
import sys
from shmkit.broadcast import Broadcast
from shmkit.errors import QueueClosed
b = Broadcast.open(sys.argv[1])
s = b.subscribe()
print("ready", flush=True)
expect = 0
try:
    while True:
        for m in s.receive_many(64, timeout=60):
            i = check(m)
            assert i == expect, "got %d, expected %d" % (i, expect)
            expect += 1
except QueueClosed:
    pass
print("ok", expect, flush=True)
'''


def kill_publishers(name: str, kills: int, policy: str) -> None:
    b = Broadcast.create(name, 1 << 14, policy=policy)
    rnd = random.Random(5)
    survivor = None
    try:
        survivor = spawn_python(SUB_UNTIL_END, name)
        wait_for_line(survivor, "ready", timeout=60)
        takeovers = 0
        for k in range(kills):
            victim = spawn_python(PUB_VICTIM, name, 0)
            line = victim.stdout.readline().strip()
            assert line in ("fresh", "took_over"), victim.stderr.read()
            takeovers += line == "took_over"
            # let it publish for a random while, then kill it at whatever instruction
            try:
                victim.wait(timeout=rnd.random() * 0.05)
            except Exception:
                pass
            kill(victim)
        final = spawn_python(PUB_VICTIM, name, b.stats()["published"] + 500)
        out, err = stop(final, timeout=120)
        assert final.returncode == 0, err
        assert out.split()[0] == "took_over"
        out, err = stop(survivor, timeout=120)
        assert survivor.returncode == 0, err
        _, got = out.split()
        assert int(got) == b.stats()["published"]
        assert takeovers == kills - 1 and b.stats()["takeovers"] == kills
    finally:
        if survivor is not None:
            kill(survivor)
        b.close()
        b.unlink()


def test_killed_publisher_is_taken_over_and_never_delivers_a_torn_message(seg_name):
    kill_publishers(seg_name, 15, "block")


@pytest.mark.soak
def test_killed_publisher_soak(seg_name):
    kill_publishers(seg_name, 200, "block")


def test_dead_subscriber_is_evicted_and_its_slot_reclaimed(seg_name):
    b = Broadcast.create(seg_name, 1024, policy="block", grace=None, max_subscribers=2)
    try:
        victim = spawn_python(SUB_VICTIM.replace("while True:", "while False:")
                              + "\nimport time\ntime.sleep(60)\n", seg_name, 1)
        wait_for_line(victim, "ready", timeout=60)
        pub = b.publisher()
        pub.publish(b"a" * 100, timeout=5)  # the victim never reads it
        kill(victim)
        for _ in range(40):  # far more than the ring holds: only possible once it is evicted
            pub.publish(b"b" * 100, timeout=30)
        stats = b.stats()
        assert stats["evictions"] == 1 and stats["subscribers"] == []
    finally:
        b.close()
        b.unlink()
