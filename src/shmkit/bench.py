"""Queue benchmarks against other IPC mechanisms: the library side of `shmkit bench` (tools layer).

Each measurement runs a producer and a consumer in two fresh processes (multiprocessing
"spawn"), pinned to different cores when the machine has two, and every message is checked
by the consumer (content or sequence stamps): a lost, duplicated or corrupted message fails
the run. Repetitions are interleaved across mechanisms and the median is reported, so a
noisy neighbour hurts every mechanism alike.

Mechanisms: shmkit.Queue, multiprocessing.Queue, multiprocessing.SimpleQueue,
multiprocessing.Pipe (send_bytes/recv_bytes), faster-fifo, pyzmq PUSH/PULL over ipc://, and
iceoryx2 publish-subscribe. The last three are optional and skipped with a line saying so.

`run_quick()` is what `shmkit bench` runs; `benchmarks/bench_queue_*.py` run the full
versions through `run()`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

WAIT = 60.0          # every blocking call in a benchmark has this timeout
SMALL_DISTINCT = 256  # small messages cycle through this many distinct contents

SHMKIT = "shmkit.Queue"
MP_QUEUE = "multiprocessing.Queue"
MP_SIMPLE = "multiprocessing.SimpleQueue"
MP_PIPE = "multiprocessing.Pipe"
FASTER_FIFO = "faster-fifo"
ZMQ = "pyzmq PUSH/PULL ipc"
ICEORYX2 = "iceoryx2"
MECHANISMS = (SHMKIT, MP_QUEUE, MP_SIMPLE, MP_PIPE, FASTER_FIFO, ZMQ, ICEORYX2)
_OPTIONAL = {FASTER_FIFO: "faster_fifo", ZMQ: "zmq", ICEORYX2: "iceoryx2"}


@dataclass(frozen=True)
class Scenario:
    """One benchmark: message size, transfer style and how many messages."""

    name: str
    size: int
    mode: str            # "single", "batch", "zerocopy" or "pingpong"
    count: int
    mechanisms: tuple[str, ...] = MECHANISMS


def scenarios(quick: bool) -> list[Scenario]:
    """The issue's scenarios; `quick` shrinks the counts for a smoke run."""
    k = 10 if quick else 1
    batchable = (SHMKIT, FASTER_FIFO)
    zero_copy = (SHMKIT, ICEORYX2)
    return [
        Scenario("64 B", 64, "single", 1_000_000 // k),
        Scenario("64 B batched", 64, "batch", 4_000_000 // k, batchable),
        Scenario("4 KiB", 4096, "single", 400_000 // k),
        Scenario("1 MiB copy", 1 << 20, "single", 4000 // k),
        Scenario("1 MiB zero-copy", 1 << 20, "zerocopy", 8000 // k, zero_copy),
        Scenario("ping-pong 64 B", 64, "pingpong", 20_000 // k),
    ]


def available(mechanism: str) -> str | None:
    """None when the mechanism can run here, else why not (for the 'skipped' line)."""
    module = _OPTIONAL.get(mechanism)
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError:
        return f"{mechanism} is not installed (pip install shmkit[bench])"
    return None


# -- endpoints: build in the parent, pickle to the children ----------------------------------

def _make_channel(mechanism: str, size: int, capacity: int):
    """Return (description for the children, cleanup function)."""
    if mechanism == SHMKIT:
        from .queue import Queue

        name = f"shmkit-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        q = Queue.create(name, capacity=capacity, max_message=max(size + 64, 4096))

        def cleanup():
            q.unlink()
            q.detach()
        return ("shmkit", name), cleanup
    ctx = mp.get_context("spawn")
    if mechanism == MP_QUEUE:
        return ("mpq", ctx.Queue(maxsize=max(2, capacity // (size + 64)))), lambda: None
    if mechanism == MP_SIMPLE:
        return ("mps", ctx.SimpleQueue()), lambda: None
    if mechanism == MP_PIPE:
        recv, send = ctx.Pipe(duplex=False)
        return ("pipe", (recv, send)), lambda: None
    if mechanism == FASTER_FIFO:
        import faster_fifo

        return ("ff", faster_fifo.Queue(max_size_bytes=capacity)), lambda: None
    if mechanism == ZMQ:
        path = os.path.join(tempfile.gettempdir(), f"shmkit-bench-{uuid.uuid4().hex[:8]}.ipc")

        def cleanup():
            try:
                os.unlink(path)
            except OSError:
                pass
        return ("zmq", f"ipc://{path}"), cleanup
    if mechanism == ICEORYX2:
        return ("iox", f"shmkit-bench/{uuid.uuid4().hex[:12]}", capacity), lambda: None
    raise ValueError(f"unknown mechanism {mechanism!r}")


class _Sender:
    def __init__(self, desc, size: int):
        kind = desc[0]
        self.kind = kind
        if kind == "shmkit":
            from .queue import Queue

            self.q = Queue.open(desc[1])
            self.send = lambda m: self.q.put(m, timeout=WAIT)
            self.send_many = lambda ms: self.q.put_many(ms, timeout=WAIT)
        elif kind in ("mpq", "mps"):
            self.send = desc[1].put
        elif kind == "pipe":
            self.send = desc[1][1].send_bytes
        elif kind == "ff":
            q = desc[1]
            self.send = lambda m: q.put(m, timeout=WAIT)
            self.send_many = lambda ms: q.put_many(ms, timeout=WAIT)
        elif kind == "zmq":
            import zmq

            self.ctx = zmq.Context()
            self.sock = self.ctx.socket(zmq.PUSH)
            self.sock.setsockopt(zmq.SNDHWM, 1000)
            self.sock.setsockopt(zmq.LINGER, 10_000)
            self.sock.bind(desc[1])
            self.send = self.sock.send
        elif kind == "iox":
            self.iox = _Iox(desc[1], desc[2], size, publisher=True)
            self.send = self.iox.send

    def close(self):
        if self.kind == "shmkit":
            self.q.detach()
        elif self.kind == "zmq":
            self.sock.close()
            self.ctx.term()
        elif self.kind in ("mpq",):
            pass
        elif self.kind == "iox":
            self.iox.close()


class _Receiver:
    def __init__(self, desc, size: int):
        kind = desc[0]
        self.kind = kind
        if kind == "shmkit":
            from .queue import Queue

            self.q = Queue.open(desc[1])
            self.recv = lambda: self.q.get(timeout=WAIT)
            self.recv_many = lambda n: self.q.get_many(n, timeout=WAIT)
        elif kind == "mpq":
            q = desc[1]
            self.recv = lambda: q.get(timeout=WAIT)
        elif kind == "mps":
            self.recv = desc[1].get
        elif kind == "pipe":
            self.recv = desc[1][0].recv_bytes
        elif kind == "ff":
            q = desc[1]
            self.recv = lambda: q.get(timeout=WAIT)
            self.recv_many = lambda n: q.get_many(timeout=WAIT, max_messages_to_get=n)
        elif kind == "zmq":
            import zmq

            self.ctx = zmq.Context()
            self.sock = self.ctx.socket(zmq.PULL)
            self.sock.setsockopt(zmq.RCVHWM, 1000)
            self.sock.setsockopt(zmq.RCVTIMEO, int(WAIT * 1000))
            self.sock.connect(desc[1])
            self.recv = self.sock.recv
        elif kind == "iox":
            self.iox = _Iox(desc[1], desc[2], size, publisher=False)
            self.recv = self.iox.recv

    def close(self):
        if self.kind == "shmkit":
            self.q.detach()
        elif self.kind == "zmq":
            self.sock.close()
            self.ctx.term()
        elif self.kind == "iox":
            self.iox.close()


class _Iox:
    """iceoryx2 publish-subscribe of uint8 slices, blocking when the subscriber is behind."""

    def __init__(self, service: str, capacity: int, size: int, publisher: bool) -> None:
        import ctypes

        import iceoryx2 as iox

        self.iox = iox
        iox.set_log_level(iox.LogLevel.Error)
        self.node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
        depth = max(2, min(64, capacity // max(size, 1)))
        self.service = (self.node.service_builder(iox.ServiceName.new(service))
                        .publish_subscribe(iox.Slice[ctypes.c_uint8])
                        .subscriber_max_buffer_size(depth)
                        .history_size(0)
                        .enable_safe_overflow(False)
                        .open_or_create())
        self.size = size
        if publisher:
            self.port = (self.service.publisher_builder()
                         .initial_max_slice_len(size)
                         .backpressure_strategy(iox.BackpressureStrategy.RetryUntilDelivered)
                         .create())
        else:
            self.port = self.service.subscriber_builder().create()

    def loan(self, n: int):
        return self.port.loan_slice_uninit(n)

    def send(self, data) -> None:
        import ctypes

        n = len(data)
        sample = self.port.loan_slice_uninit(n)
        if n:
            src = data if isinstance(data, bytes) else (ctypes.c_char * n).from_buffer(data)
            ctypes.memmove(sample.payload_ptr, src, n)
        sample.assume_init().send()

    @staticmethod
    def view(sample, n: int):
        """A writable memoryview of a sample's payload (n bytes)."""
        import ctypes

        return memoryview((ctypes.c_char * n).from_address(sample.payload_ptr)).cast("B")

    def recv_sample(self):
        deadline = time.monotonic() + WAIT
        while True:
            sample = self.port.receive()
            if sample is not None:
                return sample
            if time.monotonic() > deadline:
                raise TimeoutError("iceoryx2 subscriber received nothing")

    def recv(self) -> bytes:
        import ctypes

        sample = self.recv_sample()
        data = ctypes.string_at(sample.payload_ptr, sample.payload().len())
        sample.delete()
        return data

    def close(self) -> None:
        for attr in ("port", "service", "node"):
            obj = getattr(self, attr, None)
            if obj is not None and hasattr(obj, "delete"):
                obj.delete()


# -- message contents (identical in both processes) --------------------------------------------

def _small_messages(size: int) -> list[bytes]:
    return [bytes([i]) * size for i in range(SMALL_DISTINCT)] if size < 64 else [
        i.to_bytes(8, "little") + bytes([i]) * (size - 8) for i in range(SMALL_DISTINCT)]


def _stamp(buf, seq: int) -> None:
    buf[:8] = seq.to_bytes(8, "little")
    buf[-8:] = seq.to_bytes(8, "little")


def _stamp_ok(view, seq: int) -> bool:
    return (int.from_bytes(view[:8], "little") == seq
            and int.from_bytes(view[-8:], "little") == seq)


def _pin(core: int | None) -> None:
    if core is not None:
        try:
            os.sched_setaffinity(0, {core})
        except OSError:
            pass


# -- the two sides ------------------------------------------------------------------------------

def _producer(desc, scenario: Scenario, core, ready, go, results) -> None:
    _pin(core)
    try:
        side = _Sender(desc, scenario.size)
        ready.put("p")
        go.wait(WAIT)
        size, count = scenario.size, scenario.count
        start = time.perf_counter()
        if scenario.mode == "batch":
            msgs = _small_messages(size)
            batch = 256
            chunks = [msgs[i:i + batch] for i in range(0, SMALL_DISTINCT, batch)]
            send_many = side.send_many
            for i in range(count // batch):
                send_many(chunks[i % len(chunks)])
        elif scenario.mode == "zerocopy":
            _zero_copy_send(side, size, count)
        elif size <= 65536:
            msgs = _small_messages(size)
            send = side.send
            mask = SMALL_DISTINCT - 1
            for i in range(count):
                send(msgs[i & mask])
        else:
            buf = bytearray(os.urandom(size))
            send = side.send
            # multiprocessing.Queue pickles in a background thread: it needs its own copy.
            own_copy = side.kind == "mpq"
            for i in range(count):
                _stamp(buf, i)
                send(bytes(buf) if own_copy else buf)
        end = time.perf_counter()
        results.put(("p", start, end, 0))
        side.close()
    except BaseException as exc:  # reported to the parent, which fails the row
        ready.put(("error", repr(exc)))
        results.put(("p-error", repr(exc), 0, 0))


def _zero_copy_send(side, size: int, count: int) -> None:
    if side.kind == "shmkit":
        reserve = side.q.reserve
        for i in range(count):
            with reserve(size, timeout=WAIT) as buf:
                _stamp(buf, i)
    else:  # iceoryx2: loan, write in place, send
        for i in range(count):
            sample = side.iox.loan(size)
            view = side.iox.view(sample, size)
            _stamp(view, i)
            view.release()
            sample.assume_init().send()


def _consumer(desc, scenario: Scenario, core, ready, go, results) -> None:
    _pin(core)
    try:
        side = _Receiver(desc, scenario.size)
        ready.put("c")
        go.wait(WAIT)
        size, count = scenario.size, scenario.count
        # The clock starts once a tenth has arrived: start-up, first-touch page faults and
        # filling the pipeline are left out, for every mechanism alike.
        warm = max(1, count // 10)
        bad = 0
        start = None
        if scenario.mode == "batch":
            msgs = _small_messages(size)
            expected = msgs * 2
            recv_many = side.recv_many
            got = 0
            total = count // 256 * 256
            while got < total:
                part = recv_many(256)
                j = got % SMALL_DISTINCT
                if part != expected[j:j + len(part)]:
                    bad += 1
                got += len(part)
                if start is None and got >= warm:
                    start, warm = time.perf_counter(), got
            count = got
        elif scenario.mode == "zerocopy":
            bad, start = _zero_copy_recv(side, count, warm)
        elif size <= 65536:
            msgs = _small_messages(size)
            recv = side.recv
            mask = SMALL_DISTINCT - 1
            for i in range(count):
                if recv() != msgs[i & mask]:
                    bad += 1
                if i + 1 == warm:
                    start = time.perf_counter()
        else:
            recv = side.recv
            for i in range(count):
                m = recv()
                if len(m) != size or not _stamp_ok(m, i):
                    bad += 1
                if i + 1 == warm:
                    start = time.perf_counter()
        end = time.perf_counter()
        results.put(("c", start, end, count - warm, bad))
        side.close()
    except BaseException as exc:
        ready.put(("error", repr(exc)))
        results.put(("c-error", repr(exc), 0, 0))


def _zero_copy_recv(side, count: int, warm: int) -> tuple[int, float]:
    bad = 0
    start = None
    if side.kind == "shmkit":
        get_view = side.q.get_view
        for i in range(count):
            with get_view(timeout=WAIT) as view:
                bad += not _stamp_ok(view, i)
            if i + 1 == warm:
                start = time.perf_counter()
    else:
        for i in range(count):
            sample = side.iox.recv_sample()
            view = side.iox.view(sample, sample.payload().len())
            bad += not _stamp_ok(view, i)
            view.release()
            sample.delete()
            if i + 1 == warm:
                start = time.perf_counter()
    return bad, start


def _pinger(desc_out, desc_in, scenario: Scenario, core, ready, go, results) -> None:
    _pin(core)
    try:
        out, back = _Sender(desc_out, 64), _Receiver(desc_in, 64)
        ready.put("p")
        go.wait(WAIT)
        msg = b"p" * scenario.size
        send, recv = out.send, back.recv
        clock = time.perf_counter_ns
        warm = max(100, scenario.count // 10)
        samples = []
        for i in range(warm + scenario.count):
            t0 = clock()
            send(msg)
            if recv() != msg:
                raise AssertionError("ping-pong message corrupted")
            if i >= warm:
                samples.append(clock() - t0)
        samples.sort()
        results.put(("lat", samples[len(samples) // 2], samples[int(len(samples) * 0.99)], 0))
        out.close()
        back.close()
    except BaseException as exc:
        ready.put(("error", repr(exc)))
        results.put(("p-error", repr(exc), 0, 0))


def _ponger(desc_in, desc_out, scenario: Scenario, core, ready, go, results) -> None:
    _pin(core)
    try:
        back, out = _Receiver(desc_in, 64), _Sender(desc_out, 64)
        ready.put("c")
        go.wait(WAIT)
        send, recv = out.send, back.recv
        warm = max(100, scenario.count // 10)
        for _ in range(warm + scenario.count):
            send(recv())
        time.sleep(0.2)   # let the last answer leave before closing sockets
        out.close()
        back.close()
    except BaseException as exc:
        ready.put(("error", repr(exc)))
        results.put(("c-error", repr(exc), 0, 0))


# -- running ------------------------------------------------------------------------------------

def _cores() -> tuple[int | None, int | None]:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except OSError:
        return None, None
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)


def measure(mechanism: str, scenario: Scenario) -> dict:
    """Run one producer/consumer pair once and return the raw result."""
    ctx = mp.get_context("spawn")
    # The same memory budget for every mechanism: 8 MiB (eight 1 MiB messages in flight).
    capacity = max(8 << 20, 8 * scenario.size + (1 << 20))
    cleanups = []
    procs = []
    try:
        first, clean1 = _make_channel(mechanism, scenario.size, capacity)
        cleanups.append(clean1)
        ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
        core_a, core_b = _cores()
        if scenario.mode == "pingpong":
            second, clean2 = _make_channel(mechanism, scenario.size, capacity)
            cleanups.append(clean2)
            procs = [ctx.Process(target=_pinger, args=(first, second, scenario, core_a, ready, go, results)),
                     ctx.Process(target=_ponger, args=(first, second, scenario, core_b, ready, go, results))]
        else:
            procs = [ctx.Process(target=_producer, args=(first, scenario, core_a, ready, go, results)),
                     ctx.Process(target=_consumer, args=(first, scenario, core_b, ready, go, results))]
        for p in procs:
            p.start()
        for _ in procs:
            state = ready.get(timeout=WAIT)
            if state[0] == "error":
                raise RuntimeError(state[1])
        go.set()
        got = {}
        for _ in range(1 if scenario.mode == "pingpong" else 2):
            row = results.get(timeout=WAIT * 5)
            if row[0].endswith("error"):
                raise RuntimeError(row[1])
            got[row[0]] = row
        for p in procs:
            p.join(WAIT)
        if scenario.mode == "pingpong":
            return {"p50_us": got["lat"][1] / 1000, "p99_us": got["lat"][2] / 1000}
        _, start, end, count, bad = got["c"]
        if bad:
            raise RuntimeError(f"{bad} messages arrived corrupted or out of order")
        seconds = end - start
        return {"msgs_per_s": count / seconds, "gb_per_s": count * scenario.size / seconds / 1e9}
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        for clean in cleanups:
            clean()


def memcpy_gb_per_s(size: int = 1 << 20, seconds: float = 0.3) -> float:
    """One core's copy speed for `size`-byte buffers: the ceiling of a copy-in/copy-out queue."""
    src = bytearray(os.urandom(size))
    dst = bytearray(size)
    view = memoryview(dst)
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(16):
            view[:] = src
        n += 16
    return n * size / (time.perf_counter() - start) / 1e9


def run(selected: list[Scenario], *, repetitions: int = 5, mechanisms=None,
        progress=None) -> list[dict]:
    """Measure every (scenario, mechanism), interleaving repetitions; return one row each.

    Rows: {"scenario", "mechanism", "msgs_per_s" | "p50_us"/"p99_us", "gb_per_s",
    "ratio" (shmkit / best peer, on shmkit rows), "runs", "skipped"/"error"}.
    """
    raw: dict[tuple[str, str], list[dict]] = {}
    errors: dict[tuple[str, str], str] = {}
    skipped: dict[str, str] = {}
    for mech in MECHANISMS:
        why = available(mech)
        if why:
            skipped[mech] = why
    for rep in range(repetitions):
        for sc in selected:
            for mech in sc.mechanisms:
                if mech in skipped or (mechanisms and mech not in mechanisms):
                    continue
                key = (sc.name, mech)
                if key in errors:
                    continue
                if progress:
                    progress(f"[{rep + 1}/{repetitions}] {sc.name}: {mech}")
                try:
                    result = measure(mech, sc)
                except Exception as exc:
                    errors[key] = f"{type(exc).__name__}: {exc}"[:160]
                    continue
                raw.setdefault(key, []).append(result)
    rows = []
    for sc in selected:
        for mech in sc.mechanisms:
            if mechanisms and mech not in mechanisms:
                continue
            row = {"scenario": sc.name, "mechanism": mech, "size": sc.size}
            key = (sc.name, mech)
            if mech in skipped:
                row["skipped"] = skipped[mech]
            elif key in errors:
                row["error"] = errors[key]
            if key in raw:
                for field in raw[key][0]:
                    row[field] = statistics.median(r[field] for r in raw[key])
                row["runs"] = len(raw[key])
            rows.append(row)
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    by_size: dict[int, list[dict]] = {}
    for row in rows:
        by_size.setdefault(row["size"], []).append(row)
    for row in rows:
        if row["mechanism"] != SHMKIT:
            continue
        if "msgs_per_s" in row:
            # Zero copy is judged against the best peer at that size, copy or zero copy.
            pool = by_size[row["size"]] if "zero-copy" in row["scenario"] else [
                r for r in rows if r["scenario"] == row["scenario"]]
            peers = [r["msgs_per_s"] for r in pool if r["mechanism"] != SHMKIT and "msgs_per_s" in r]
            if peers:
                row["ratio"] = row["msgs_per_s"] / max(peers)
        elif "p50_us" in row:
            peers = [r["p50_us"] for r in rows if r["scenario"] == row["scenario"]
                     and r["mechanism"] != SHMKIT and "p50_us" in r]
            if peers:
                row["ratio"] = min(peers) / row["p50_us"]
            mpq = [r["p50_us"] for r in rows if r["scenario"] == row["scenario"]
                   and r["mechanism"] == MP_QUEUE and "p50_us" in r]
            if mpq:
                row["vs_mp_queue"] = mpq[0] / row["p50_us"]


def machine() -> str:
    """CPU model, core count, kernel and Python: printed with every result."""
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{platform.machine()} {cpu}, {os.cpu_count()} cpus, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def format_table(rows: list[dict]) -> str:
    """Render rows as a plain-text table with ratios (what `shmkit bench` prints)."""
    lines = [f"{'scenario':<17} {'mechanism':<28} {'msgs/s':>12} {'GB/s':>7} "
             f"{'p50 us':>8} {'p99 us':>8} {'vs best peer':>12}"]
    lines.append("-" * len(lines[0]))
    for row in rows:
        if "skipped" in row or ("error" in row and "runs" not in row):
            why = row.get("skipped") or f"failed: {row['error']}"
            lines.append(f"{row['scenario']:<17} {row['mechanism']:<28} {why}")
            continue
        rate = f"{row['msgs_per_s']:,.0f}" if "msgs_per_s" in row else ""
        gbs = f"{row['gb_per_s']:.2f}" if "gb_per_s" in row else ""
        p50 = f"{row['p50_us']:.1f}" if "p50_us" in row else ""
        p99 = f"{row['p99_us']:.1f}" if "p99_us" in row else ""
        ratio = f"{row['ratio']:.1f}x" if "ratio" in row else ""
        lines.append(f"{row['scenario']:<17} {row['mechanism']:<28} {rate:>12} {gbs:>7} "
                     f"{p50:>8} {p99:>8} {ratio:>12}")
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: str) -> None:
    """Draw throughput per scenario and ping-pong latency percentiles into a PNG.

    Raises:
        ImportError: matplotlib is not installed (pip install matplotlib).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = [r for r in rows if "msgs_per_s" in r]
    lat = [r for r in rows if "p50_us" in r]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1]})
    names = list(dict.fromkeys(r["scenario"] for r in thr))
    mechs = list(dict.fromkeys(r["mechanism"] for r in thr))
    width = 0.8 / max(1, len(mechs))
    for k, mech in enumerate(mechs):
        xs, ys = [], []
        for i, name in enumerate(names):
            for r in thr:
                if r["scenario"] == name and r["mechanism"] == mech:
                    xs.append(i + k * width)
                    ys.append(r["msgs_per_s"])
        axes[0].bar(xs, ys, width, label=mech)
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("messages per second (log)")
    axes[0].set_title("throughput, producer and consumer in separate processes")
    axes[0].legend(fontsize=8)
    for k, r in enumerate(lat):
        axes[1].bar([k - 0.2], [r["p50_us"]], 0.4, color="tab:blue", label="p50" if k == 0 else None)
        axes[1].bar([k + 0.2], [r["p99_us"]], 0.4, color="tab:orange", label="p99" if k == 0 else None)
    axes[1].set_xticks(range(len(lat)), [r["mechanism"] for r in lat], rotation=60, ha="right",
                       fontsize=8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("round trip, microseconds (log)")
    axes[1].set_title("ping-pong 64 B")
    axes[1].legend()
    fig.suptitle(machine(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_quick(plot: str | None = None, *, progress=None) -> list[dict]:
    """A short version of the queue benchmark (about a minute): what `shmkit bench` runs.

    Args:
        plot: also draw the results into this PNG file (needs matplotlib).
        progress: optional callable receiving one line per measurement.

    Returns:
        Rows as in `run`, ready for `format_table`.
    """
    if plot:
        import matplotlib  # noqa: F401  (fail now, not after the run, when it is missing)
    rows = run(scenarios(quick=True), repetitions=3, progress=progress)
    if plot:
        plot_rows(rows, plot)
    return rows


if __name__ == "__main__":   # python -m shmkit.bench: the quick run
    print(f"machine: {machine()}")
    table = format_table(run_quick(progress=lambda line: print(line, file=sys.stderr)))
    print(table)
