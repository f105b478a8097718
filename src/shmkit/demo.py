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


DEMOS: dict[str, Callable[[], int]] = {
    "segment": run_segment_demo,
}
"""Every demo by name, as `shmkit demo WHICH` offers them."""

DEFAULT = "segment"
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
