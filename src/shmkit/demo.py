"""Demos of shmkit between unrelated processes, run by `shmkit demo` and `make demo` (tools layer).

`main(which)` runs one demo from `DEMOS` (default `DEFAULT`). Each demo starts real, separate
Python interpreters with `subprocess` (no fork, no shared parent state), says what it is doing
at every step, and removes every segment it made, also when it fails or is interrupted.
"""

from __future__ import annotations

import os
import secrets
import selectors
import subprocess
import sys
import time
from typing import Callable

from . import segment

SEGMENT_SIZE = 4096
REPLY_OFFSET = 2048
CHILD_TIMEOUT = 30.0  # seconds any single step may take before the demo gives up

# The writer: creates the segment, writes a length-prefixed message, then follows the
# parent's commands on stdin. Only the data crosses through shared memory; the pipes just
# pace the story.
_WRITER = r"""
import os, sys, shmkit
name, backend = sys.argv[1], sys.argv[2]
seg = shmkit.Segment.create(name, size=int(sys.argv[3]), backend=backend)
msg = f"hello from the writer, pid {os.getpid()}".encode()
seg.buf[4:4 + len(msg)] = msg
seg.buf[0:4] = len(msg).to_bytes(4, "little")
print(f"pid {os.getpid()} created {name!r} ({backend}, {seg.size} bytes), "
      f"mapped at 0x{seg.address:x}", flush=True)
print(f"wrote {msg.decode()!r} at offset 0", flush=True)
print("ready", flush=True)
for command in sys.stdin:
    command = command.strip()
    if command == "read-reply":
        off = int(sys.argv[4])
        n = int.from_bytes(seg.buf[off:off + 4], "little")
        print(f"read the reader's reply from shared memory: "
              f"{bytes(seg.buf[off + 4:off + 4 + n]).decode()!r}", flush=True)
        print("ready", flush=True)
    elif command == "exit":
        break
seg.close()
print("closed its mapping and exits", flush=True)
"""

# The reader: an unrelated process that knows only the name.
_READER = r"""
import os, sys, shmkit
name, backend = sys.argv[1], sys.argv[2]
seg = shmkit.Segment.open(name, backend=backend)
n = int.from_bytes(seg.buf[0:4], "little")
print(f"pid {os.getpid()} opened {name!r} by name, mapped at 0x{seg.address:x}", flush=True)
print(f"read {bytes(seg.buf[4:4 + n]).decode()!r}", flush=True)
reply = f"hello back from the reader, pid {os.getpid()}".encode()
off = int(sys.argv[3])
seg.buf[off + 4:off + 4 + len(reply)] = reply
seg.buf[off:off + 4] = len(reply).to_bytes(4, "little")
print(f"wrote {reply.decode()!r} at offset {off}", flush=True)
print("ready", flush=True)
sys.stdin.readline()
seg.close()
print("closed its mapping and exits", flush=True)
"""


class DemoFailed(Exception):
    """A demo step did not go as planned; the message says which."""


class _Child:
    """A separate interpreter whose output lines are relayed with a label."""

    def __init__(self, label: str, code: str, *args: object, out) -> None:
        self.label = label
        self.out = out
        self.proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self._pending = b""  # bytes read from stdout that do not yet end a line

    def _next_line(self, deadline: float) -> str | None:
        # Read the raw pipe ourselves: a buffered reader would hide lines from select().
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            with selectors.DefaultSelector() as sel:
                sel.register(self.proc.stdout, selectors.EVENT_READ)
                if left <= 0 or not sel.select(left):
                    raise DemoFailed(f"the {self.label} did not answer within "
                                     f"{CHILD_TIMEOUT:.0f} s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return None
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode(errors="replace")

    def relay_until(self, marker: str | None = "ready", timeout: float = CHILD_TIMEOUT) -> None:
        """Print the child's lines until it prints `marker` (or exits, for marker=None)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line(deadline)
            if line is None:
                if marker is None:
                    return
                self.proc.wait(timeout=CHILD_TIMEOUT)
                err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise DemoFailed(f"the {self.label} exited early: "
                                 f"{err[-1] if err else 'no message'}")
            if line == marker:
                return
            self.out.say(f"  {self.label:>6} | {line}")

    def send(self, command: str) -> None:
        """Write one command line to the child's stdin."""
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        """Wait for the child to exit after its last command, relaying what it says."""
        self.relay_until(None)
        if self.proc.wait(timeout=CHILD_TIMEOUT) != 0:
            raise DemoFailed(f"the {self.label} failed with exit code {self.proc.returncode}")

    def kill(self) -> None:
        """Make sure the child is gone (used on the way out after a failure)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=CHILD_TIMEOUT)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


class _Narrator:
    """Prints steps and relayed lines, with rich styling on a terminal."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)

    def step(self, text: str) -> None:
        from rich.text import Text

        self.console.print()
        self.console.print(Text(text, style="bold cyan"))

    def say(self, text: str) -> None:
        from rich.text import Text

        self.console.print(Text(text))

    def run_cli(self, *args: str) -> None:
        """Run `shmkit ARGS` as its own process, showing the command and its output."""
        from rich.text import Text

        self.console.print(Text("$ shmkit " + " ".join(args), style="bold"))
        sys.stdout.flush()
        done = subprocess.run([sys.executable, "-m", "shmkit.cli", *args], timeout=CHILD_TIMEOUT)
        if done.returncode != 0:
            raise DemoFailed(f"`shmkit {' '.join(args)}` failed with exit code {done.returncode}")


def run_segment_demo(backend: str = "posix") -> int:
    """Two unrelated processes share one named segment; `shmkit ls`/`inspect` show it.

    A writer process creates the segment and writes a message; a reader process, started
    separately and knowing only the name, reads it and writes a reply that the writer reads.
    While both map it, `shmkit ls` and `shmkit inspect` show the segment, both processes and
    their different addresses. Then both close, `shmkit rm` removes it, and the demo checks
    that nothing is left.

    Returns:
        0 on success.

    Raises:
        DemoFailed: a step failed (everything made so far is removed first).
    """
    out = _Narrator()
    name = f"shmkit-demo-{os.getpid()}-{secrets.token_hex(3)}"
    children: list[_Child] = []
    try:
        out.step(f"1. A writer process creates the shared memory segment {name!r} "
                 f"({backend}) and writes a message into it")
        writer = _Child("writer", _WRITER, name, backend, SEGMENT_SIZE, REPLY_OFFSET, out=out)
        children.append(writer)
        writer.relay_until("ready")

        out.step("2. An unrelated reader process opens the segment by name, reads the message "
                 "and writes a reply")
        reader = _Child("reader", _READER, name, backend, REPLY_OFFSET, out=out)
        children.append(reader)
        reader.relay_until("ready")

        out.step("3. The writer reads the reply: the bytes crossed between the processes "
                 "without any copy through a pipe or socket")
        writer.send("read-reply")
        writer.relay_until("ready")

        out.step("4. `shmkit ls` lists the segment, its owner and both processes that map it")
        out.run_cli("ls", "--name", name)
        out.say("(its kind is 'foreign' because a plain Segment has no shmkit header, so C "
                "programs and multiprocessing.shared_memory see exactly these bytes; typed "
                "objects such as queues and locks show their kind)")

        out.step("5. `shmkit inspect` shows the same memory at a different address in each "
                 "process, and how much of it is resident")
        out.run_cli("inspect", name, "--backend", backend)

        out.step("6. Both processes close their mappings and exit; the segment stays until "
                 "someone removes it (shmkit never removes it behind your back)")
        for child in children:
            child.send("exit")
            child.finish()

        out.step("7. `shmkit rm` removes it")
        out.run_cli("rm", name, "--backend", backend)
        if segment.exists(name, backend=backend):
            raise DemoFailed(f"segment {name!r} still exists after `shmkit rm`")
        out.say(f"segment {name!r} is gone; nothing is left behind")
        return 0
    finally:
        for child in children:
            child.kill()
        if segment.exists(name, backend=backend):
            try:
                segment.unlink(name, backend=backend)
            except OSError:
                pass


# -- the queue demo: one producer, three consumers, then the same through multiprocessing ------

QUEUE_MESSAGES = 600_000
QUEUE_MESSAGE_SIZE = 128
QUEUE_CONSUMERS = 3

# Message i is byte (i % 256) repeated, so every consumer can check every message cheaply.
_QUEUE_PRODUCER = r"""
import sys
from shmkit import Queue
q = Queue.open(sys.argv[1])
count, size = int(sys.argv[2]), int(sys.argv[3])
msgs = [bytes([i]) * size for i in range(256)]
put = q.put
for i in range(count):
    put(msgs[i & 255], timeout=60)
q.close()   # the channel: consumers drain what is left, then get QueueClosed
print(f"put {count:,} messages of {size} bytes, then closed the channel", flush=True)
"""

_QUEUE_CONSUMER = r"""
import os, sys
from shmkit import Queue, QueueClosed
q = Queue.open(sys.argv[1])
size = int(sys.argv[2])
print("ready", flush=True)
got = bad = 0
try:
    while True:
        for m in q.get_many(256, timeout=60):
            got += 1
            if len(m) != size or m.count(m[0]) != size:
                bad += 1
except QueueClosed:
    pass
q.detach()
print(f"pid {os.getpid()} took {got:,} messages, {bad} damaged", flush=True)
print(f"result {got} {bad}", flush=True)
"""


def _mp_producer(q, count: int, size: int, consumers: int) -> None:
    msgs = [bytes([i]) * size for i in range(256)]
    for i in range(count):
        q.put(msgs[i & 255])
    for _ in range(consumers):
        q.put(None)   # multiprocessing.Queue has no close-for-readers: one end marker each


def _mp_consumer(q, size: int, counter, results) -> None:
    got = bad = 0
    while True:
        m = q.get(timeout=60)
        if m is None:
            break
        got += 1
        if len(m) != size or m.count(m[0]) != size:
            bad += 1
        if got % 1000 == 0:
            with counter.get_lock():
                counter.value += 1000
    results.put((got, bad))


def _progress_bar(total: int):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]:>14}"), TimeElapsedColumn())


def run_queue_demo(messages: int = QUEUE_MESSAGES, consumers: int = QUEUE_CONSUMERS) -> int:
    """A producer-consumer pipeline between unrelated processes, against multiprocessing.Queue.

    One producer process and `consumers` consumer processes, started separately with
    subprocess, open a shmkit.Queue by name; every message goes to exactly one consumer, which
    checks it. The bar follows the queue's own statistics, read from shared memory. Then the
    same work runs through multiprocessing.Queue, and the two times are compared. Every
    segment made is removed, also on failure or Ctrl-C.

    Returns:
        0 on success.

    Raises:
        DemoFailed: a step failed (everything made so far is removed first).
    """
    import multiprocessing

    from .queue import Queue

    out = _Narrator()
    name = f"shmkit-demo-queue-{os.getpid()}-{secrets.token_hex(3)}"
    size = QUEUE_MESSAGE_SIZE
    children: list[_Child] = []
    mp_procs = []
    q = None
    try:
        out.step(f"1. Create the queue {name!r}: 4 MiB of shared memory, any number of "
                 f"producers and consumers")
        q = Queue.create(name, capacity=4 << 20)
        out.say(f"  {q!r}")

        out.step(f"2. Start {consumers} consumer processes (separate interpreters that know only "
                 f"the name) and one producer putting {messages:,} messages of {size} bytes")
        cons = []
        for i in range(consumers):
            child = _Child(f"cons{i + 1}", _QUEUE_CONSUMER, name, size, out=out)
            children.append(child)
            cons.append(child)
            child.relay_until("ready")
        start = time.monotonic()
        producer = _Child("prod", _QUEUE_PRODUCER, name, messages, size, out=out)
        children.append(producer)
        with _progress_bar(messages) as bar:
            task = bar.add_task("shmkit.Queue         ", total=messages, rate="")
            while True:
                stats = q.stats()
                elapsed = max(time.monotonic() - start, 1e-6)
                bar.update(task, completed=stats["total_got"],
                           rate=f"{stats['total_got'] / elapsed:,.0f} msg/s")
                if stats["total_got"] >= messages or producer.proc.poll() not in (None, 0):
                    break
                if elapsed > 120:
                    raise DemoFailed("the shmkit pipeline did not finish within 120 s")
                time.sleep(0.05)
        shm_seconds = time.monotonic() - start
        producer.finish()
        total = damaged = 0
        for child in cons:
            lines: list[str] = []
            child.out = _Collect(out, lines)
            child.finish()
            got, bad = _result_of(lines)
            total += got
            damaged += bad
        if total != messages or damaged:
            raise DemoFailed(f"the consumers took {total:,} of {messages:,} messages, "
                             f"{damaged} damaged")
        final = q.stats()
        out.say(f"  every message arrived exactly once and intact: {total:,} in "
                f"{shm_seconds:.2f} s ({messages / shm_seconds:,.0f} msg/s); the queue's own "
                f"statistics say {final['total_put']:,} put, {final['total_got']:,} got")

        out.step("3. The same work through multiprocessing.Queue (related processes: it cannot "
                 "be opened by name)")
        ctx = multiprocessing.get_context("spawn")
        mpq, counter, results = ctx.Queue(maxsize=10_000), ctx.Value("q", 0), ctx.Queue()
        mp_procs = [ctx.Process(target=_mp_consumer, args=(mpq, size, counter, results))
                    for _ in range(consumers)]
        mp_procs.append(ctx.Process(target=_mp_producer, args=(mpq, messages, size, consumers)))
        start = time.monotonic()
        for p in mp_procs:
            p.start()
        mp_total = mp_bad = 0
        with _progress_bar(messages) as bar:
            task = bar.add_task("multiprocessing.Queue", total=messages, rate="")
            finished = 0
            while finished < consumers:
                try:
                    got, bad = results.get(timeout=0.05)
                    mp_total += got
                    mp_bad += bad
                    finished += 1
                except Exception:
                    pass
                elapsed = max(time.monotonic() - start, 1e-6)
                done = max(counter.value, mp_total)
                bar.update(task, completed=done, rate=f"{done / elapsed:,.0f} msg/s")
                if elapsed > 300:
                    raise DemoFailed("the multiprocessing pipeline did not finish within 300 s")
            bar.update(task, completed=mp_total)
        mp_seconds = time.monotonic() - start
        for p in mp_procs:
            p.join(CHILD_TIMEOUT)
        if mp_total != messages or mp_bad:
            raise DemoFailed(f"multiprocessing delivered {mp_total:,} of {messages:,}")
        out.say(f"  {mp_total:,} messages in {mp_seconds:.2f} s "
                f"({messages / mp_seconds:,.0f} msg/s)")

        out.step(f"4. Same work, same checks: shmkit.Queue took {shm_seconds:.2f} s, "
                 f"multiprocessing.Queue {mp_seconds:.2f} s "
                 f"({mp_seconds / shm_seconds:.0f}x longer)")
        out.say("  (process start-up is included in both; `shmkit bench` measures the queues alone)")

        out.step("5. Remove the queue")
        q.unlink()
        q.detach()
        q = None
        if segment.exists(name):
            raise DemoFailed(f"queue {name!r} still exists after unlink")
        out.say(f"  {name!r} is gone; nothing is left behind")
        return 0
    finally:
        for child in children:
            child.kill()
        for p in mp_procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if q is not None:
            try:
                q.detach()
            except Exception:
                pass
        if segment.exists(name):
            try:
                segment.unlink(name)
            except OSError:
                pass


class _Collect:
    """A narrator stand-in that keeps a child's lines and shows all but the machine ones."""

    def __init__(self, out: _Narrator, lines: list[str]) -> None:
        self._out, self._lines = out, lines

    def say(self, text: str) -> None:
        self._lines.append(text)
        if not text.split("|", 1)[-1].strip().startswith("result "):
            self._out.say(text)


def _result_of(lines: list[str]) -> tuple[int, int]:
    for line in lines:
        words = line.split("|", 1)[-1].split()
        if len(words) == 3 and words[0] == "result":
            return int(words[1]), int(words[2])
    raise DemoFailed("a consumer did not report its result")


DEMOS: dict[str, Callable[[], int]] = {
    "queue": run_queue_demo,
    "segment": run_segment_demo,
}
"""Every demo by name, as `shmkit demo WHICH` offers them."""

DEFAULT = "queue"
"""The demo `shmkit demo` and `make demo` run when none is named."""


def main(which: str | None = None) -> int:
    """Run demo `which` (default `DEFAULT`); the single entry point of `shmkit demo`.

    Returns:
        The exit code: 0 on success, 1 when a step failed (told in one line on stderr).
    """
    run = DEMOS.get(which or DEFAULT)
    if run is None:
        raise ValueError(f"no demo named {which!r}; choose one of {', '.join(sorted(DEMOS))}")
    try:
        return run()
    except DemoFailed as exc:
        sys.stdout.flush()
        sys.stderr.write(f"shmkit: error: demo failed: {exc}\n")
        return 1
