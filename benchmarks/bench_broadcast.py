"""Fan-out: one publisher process, two subscriber processes, every subscriber gets every message.

What it measures: per-subscriber throughput, from the first message a subscriber receives to
its last, in separate processes started fresh (the publisher runs here). Every row is
lossless (shmkit with the "block" policy, pyzmq with unlimited high-water marks, iceoryx2 with
RetryUntilDelivered back-pressure) and every subscriber checks that message i carries i, so a
loss or a reorder fails the run instead of flattering it. Cases are repeated in an interleaved
order and the median is reported.

Rows, 64-byte messages (messages per second per subscriber):
  shmkit publish/receive          one C call per message on each side
  shmkit publish_many/receive_many  batches of 64
  pyzmq PUB/SUB ipc://            XPUB so the run starts once both subscriptions arrived
  iceoryx2 publish-subscribe      loan_slice_uninit/send, receive (payload via payload_ptr,
                                  the binding's fastest path); subscribers busy-poll

Rows, 1 MiB frames (GB/s per subscriber):
  shmkit reserve/receive_view     zero copy: the publisher writes an 8-byte header into the
                                  ring, subscribers read it in place
  iceoryx2 loan/receive           the same with a loaned sample
  shmkit publish/receive (copy)   for reference: one copy in, one copy out

Goals (issue 5): 64 B at least 4x the best peer per subscriber (~0.6 M msgs/s on the
reference 2-core machine); 1 MiB zero copy at least iceoryx2's figure. On 2 cores the three
processes share the CPUs, so every figure here is a contended one; close other work first.

Run: python benchmarks/bench_broadcast.py [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
sys.path.insert(0, SRC)

from shmkit.bench import machine  # noqa: E402
from shmkit.broadcast import Broadcast  # noqa: E402

SMALL = 64
FRAME = 1 << 20
WAIT = 60.0  # every wait has a timeout: a stuck peer fails the run instead of hanging it
CHILD_ENV = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))




# -- subscriber programs (each prints "ready", then one JSON line) --------------------------------

# Every subscriber checks every message's index with the same cheap call (struct unpack_from),
# so the harness costs every row the same.
SUB_SHMKIT = r'''
import json, struct, sys, time
from shmkit.broadcast import Broadcast
b = Broadcast.open(sys.argv[1]); n = int(sys.argv[2]); mode = sys.argv[3]
s = b.subscribe()
index = struct.Struct("<Q").unpack_from
def run():
    bad = 0
    print("ready", flush=True)
    if mode in ("one", "copy"):
        receive = s.receive
        bad += index(receive(60))[0] != 0
        t0 = time.perf_counter()
        for i in range(1, n):
            if index(receive(60))[0] != i:
                bad += 1
    elif mode == "many":
        receive_many, got = s.receive_many, 0
        t0 = None
        while got < n:
            batch = receive_many(64, 60)
            if t0 is None:
                t0 = time.perf_counter()
            for m in batch:
                if index(m)[0] != got:
                    bad += 1
                got += 1
    else:  # view: zero copy
        view = s.receive_view
        with view(60) as v:
            bad += index(v)[0] != 0
        t0 = time.perf_counter()
        for i in range(1, n):
            with view(60) as v:
                if index(v)[0] != i:
                    bad += 1
    return time.perf_counter() - t0, bad
seconds, bad = run()
print(json.dumps({"n": n - 1 if mode != "many" else n, "seconds": seconds, "bad": bad}),
      flush=True)
'''

SUB_ZMQ = r'''
import json, struct, sys, time
import zmq
ctx = zmq.Context()
s = ctx.socket(zmq.SUB)
s.setsockopt(zmq.RCVHWM, 0)
s.setsockopt(zmq.RCVTIMEO, 60000)
s.connect(sys.argv[1])
s.setsockopt(zmq.SUBSCRIBE, b"")
n = int(sys.argv[2])
index = struct.Struct("<Q").unpack_from
def run():
    bad = 0
    print("ready", flush=True)
    recv = s.recv
    bad += index(recv())[0] != 0
    t0 = time.perf_counter()
    for i in range(1, n):
        if index(recv())[0] != i:
            bad += 1
    return time.perf_counter() - t0, bad
seconds, bad = run()
print(json.dumps({"n": n - 1, "seconds": seconds, "bad": bad}), flush=True)
'''

SUB_IOX = r'''
import ctypes, json, struct, sys, time
import iceoryx2 as iox
iox.set_log_level_from_env_or(iox.LogLevel.Error)
node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
svc = (node.service_builder(iox.ServiceName.new(sys.argv[1]))
       .publish_subscribe(iox.Slice[ctypes.c_uint8]).max_subscribers(4)
       .subscriber_max_buffer_size(int(sys.argv[4])).enable_safe_overflow(False)
       .open_or_create())
s = svc.subscriber_builder().create()
n = int(sys.argv[2])
def run():
    bad = 0
    receive, string_at = s.receive, ctypes.string_at
    index = struct.Struct("<Q").unpack_from
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    got, t0 = 0, None
    while got < n:
        sample = receive()
        if sample is None:
            if time.monotonic() > deadline:
                raise TimeoutError("iceoryx2 subscriber got nothing for 60 s")
            continue
        if t0 is None:
            t0 = time.perf_counter()
        if sys.argv[3] == "copy":
            m = string_at(sample.payload_ptr, sample.header.number_of_elements)
        else:
            m = string_at(sample.payload_ptr, 8)
        if index(m)[0] != got:
            bad += 1
        sample.delete()
        got += 1
    return time.perf_counter() - t0, bad
seconds, bad = run()
print(json.dumps({"n": n - 1, "seconds": seconds, "bad": bad}), flush=True)
'''


# -- running one case ---------------------------------------------------------------------------

class Children:
    """Two subscriber processes: started, awaited with timeouts, always reaped."""

    def __init__(self, code: str, *args: object) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=CHILD_ENV) for _ in range(2)]

    def wait_ready(self) -> None:
        for p in self.procs:
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"subscriber failed to start: {line} {p.stderr.read()}")

    def results(self) -> list[dict]:
        out = []
        for p in self.procs:
            stdout, stderr = p.communicate(timeout=WAIT * 2)
            if p.returncode != 0:
                raise RuntimeError(f"subscriber failed: {stderr.strip()[-500:]}")
            res = json.loads(stdout.strip().splitlines()[-1])
            if res["bad"]:
                raise RuntimeError(f"subscriber saw {res['bad']} wrong messages")
            out.append(res)
        return out

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def per_subscriber(results: list[dict], size: int) -> tuple[float, float]:
    """(messages per second, bytes per second), averaged over the subscribers."""
    rates = [r["n"] / r["seconds"] for r in results]
    rate = statistics.mean(rates)
    return rate, rate * size


def case_shmkit(mode: str, n: int, size: int) -> tuple[float, float]:
    name = f"bench-bcast-{uuid.uuid4().hex[:8]}"
    capacity = (1 << 20) if size == SMALL else 16 * FRAME + 4096
    b = Broadcast.create(name, capacity, policy="block", max_subscribers=4)
    kids = Children(SUB_SHMKIT, name, n, mode)
    try:
        kids.wait_ready()
        pub = b.publisher()
        publish = pub.publish
        message = struct.Struct(f"<Q{size - 8}x").pack
        if mode in ("one", "copy"):
            for i in range(n):
                publish(message(i), WAIT)
        elif mode == "many":
            for start in range(0, n, 64):
                pub.publish_many([message(i) for i in range(start, min(n, start + 64))], WAIT)
        else:  # view: zero copy, write only the header
            reserve, header = pub.reserve, struct.Struct("<Q").pack_into
            for i in range(n):
                with reserve(size, WAIT) as buf:
                    header(buf, 0, i)
        return per_subscriber(kids.results(), size)
    finally:
        kids.kill()
        b.close()
        b.unlink()


def case_zmq(n: int, size: int) -> tuple[float, float]:
    import zmq

    path = os.path.join(tempfile.gettempdir(), f"bench-bcast-{uuid.uuid4().hex[:8]}.ipc")
    addr = f"ipc://{path}"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)
    pub.setsockopt(zmq.RCVTIMEO, int(WAIT * 1000))
    pub.bind(addr)
    kids = Children(SUB_ZMQ, addr, n)
    try:
        kids.wait_ready()
        for _ in range(2):  # both subscriptions have reached the publisher
            pub.recv()
        send, message = pub.send, struct.Struct(f"<Q{size - 8}x").pack
        for i in range(n):
            send(message(i))
        return per_subscriber(kids.results(), size)
    finally:
        kids.kill()
        pub.close(linger=0)
        ctx.term()
        try:
            os.unlink(path)
        except OSError:
            pass


def case_iceoryx2(mode: str, n: int, size: int) -> tuple[float, float]:
    import ctypes

    import iceoryx2 as iox

    iox.set_log_level_from_env_or(iox.LogLevel.Error)
    name = f"bench-bcast-{uuid.uuid4().hex[:8]}"
    buffer = 1024 if size == SMALL else 8
    node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
    svc = (node.service_builder(iox.ServiceName.new(name))
           .publish_subscribe(iox.Slice[ctypes.c_uint8]).max_subscribers(4)
           .subscriber_max_buffer_size(buffer).enable_safe_overflow(False).open_or_create())
    pub = (svc.publisher_builder().initial_max_slice_len(size)
           .backpressure_strategy(iox.BackpressureStrategy.RetryUntilDelivered).create())
    kids = Children(SUB_IOX, name, n, mode, buffer)
    try:
        kids.wait_ready()
        time.sleep(0.05)
        pub.update_connections()
        loan, memmove = pub.loan_slice_uninit, ctypes.memmove
        message, header = struct.Struct(f"<Q{size - 8}x").pack, struct.Struct("<Q").pack
        for i in range(n):
            sample = loan(size)
            if mode == "copy":
                memmove(sample.payload_ptr, message(i), size)
            else:
                memmove(sample.payload_ptr, header(i), 8)
            sample.assume_init().send()
        return per_subscriber(kids.results(), size)
    finally:
        kids.kill()
        del pub, svc, node


# -- the table ----------------------------------------------------------------------------------

def available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    reps = 1 if quick else 5
    n_small = 100_000 if quick else 1_000_000
    n_frames = 2_000 if quick else 20_000
    print(f"machine: {machine()}")
    print(f"fan-out to 2 subscriber processes; {reps} interleaved repetition(s), median shown")
    small = [
        ("shmkit publish/receive", lambda: case_shmkit("one", n_small, SMALL)),
        ("shmkit publish_many/receive_many", lambda: case_shmkit("many", n_small, SMALL)),
        ("pyzmq PUB/SUB ipc://", lambda: case_zmq(n_small // 4, SMALL)
         if available("zmq") else None),
        ("iceoryx2 publish-subscribe", lambda: case_iceoryx2("copy", n_small // 4, SMALL)
         if available("iceoryx2") else None),
    ]
    frames = [
        ("shmkit reserve/receive_view", lambda: case_shmkit("view", n_frames, FRAME)),
        ("iceoryx2 loan/receive", lambda: case_iceoryx2("view", n_frames, FRAME)
         if available("iceoryx2") else None),
        ("shmkit publish/receive (copy)", lambda: case_shmkit("copy", n_frames // 4, FRAME)),
    ]
    missing = [m for m in ("zmq", "iceoryx2") if not available(m)]
    for m in missing:
        print(f"peer {m} is not installed: its rows are skipped "
              f"(`.venv/bin/pip install {'pyzmq' if m == 'zmq' else m}` to include it)")
    results: dict[str, list[tuple[float, float]]] = {}
    for _ in range(reps):
        for label, run in small + frames:
            try:
                r = run()
            except Exception as exc:  # a failing peer must not hide the other rows
                print(f"  {label}: failed: {exc}")
                r = None
            if r is not None:
                results.setdefault(label, []).append(r)

    def median(label: str) -> tuple[float, float] | None:
        rows = results.get(label)
        if not rows:
            return None
        return (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows))

    def table(title: str, rows: list, unit: str, scale: float, value_index: int,
              peers: list[str]) -> None:
        print(f"\n{title}")
        best_peer = max((median(p)[value_index] for p in peers if median(p)), default=None)
        for label, _ in rows:
            m = median(label)
            if m is None:
                print(f"  {label:36s} {'skipped':>12s}")
                continue
            ratio = f"{m[value_index] / best_peer:6.1f}x best peer" if best_peer else ""
            print(f"  {label:36s} {m[value_index] / scale:12.2f} {unit}  {ratio}")

    table("64 B messages, per subscriber", small, "M msgs/s", 1e6, 0,
          ["pyzmq PUB/SUB ipc://", "iceoryx2 publish-subscribe"])
    table("1 MiB frames, per subscriber", frames, "GB/s", 1e9, 1, ["iceoryx2 loan/receive"])
    print("\ngoals: 64 B >= 4x the best peer; 1 MiB zero copy >= iceoryx2")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
