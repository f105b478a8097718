"""Broadcast and Latest over corrupted shared memory: random bytes over the control block,
the subscriber table and the ring, then every operation. Each one must either work or raise a
shmkit error (CorruptSegmentError above all); never crash, read outside the mapping or hang
(every call here is non-blocking or has a short timeout).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import unique_name
from shmkit import segment
from shmkit.broadcast import Broadcast, Latest
from shmkit.errors import ShmkitError

# Regions of a Broadcast created with capacity 1024 and 4 subscriber slots.
CONTROL = (128, 512)
TABLE = (512, 512 + 4 * 64)
RING = (TABLE[1], TABLE[1] + 1024)

scribble = st.tuples(
    st.sampled_from([CONTROL, CONTROL, TABLE, RING]),
    st.integers(0, 10_000),
    st.binary(min_size=1, max_size=24),
)

operation = st.one_of(
    st.tuples(st.just("publish"), st.integers(0, 600)),
    st.tuples(st.just("publish_many"), st.integers(1, 10)),
    st.tuples(st.just("reserve"), st.integers(0, 300)),
    st.tuples(st.just("receive"), st.integers(0, 3)),
    st.tuples(st.just("receive_many"), st.integers(0, 3)),
    st.tuples(st.just("view"), st.integers(0, 3)),
    st.tuples(st.just("subscribe"), st.sampled_from(["next", "oldest"])),
    st.tuples(st.just("republish"), st.just(0)),
    st.tuples(st.just("close_sub"), st.integers(0, 3)),
    st.tuples(st.just("stats"), st.just(0)),
)


def attempt(fn, *args, **kwargs):
    """Run one operation; shmkit errors are fine, anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except (ShmkitError, ValueError, RuntimeError, BufferError):
        # ValueError: the object was closed; RuntimeError: refused (e.g. a view is open)
        return None


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(policy=st.sampled_from(["overwrite", "block"]),
       writes=st.lists(scribble, min_size=1, max_size=6),
       ops=st.lists(operation, min_size=1, max_size=25))
def test_corrupted_broadcast_never_crashes_or_hangs(policy, writes, ops):
    name = unique_name("fz")
    b = Broadcast.create(name, 1024, max_subscribers=4, policy=policy, grace=0.01)
    try:
        subs = [b.subscribe(), b.subscribe("oldest")]
        pub = b.publisher()
        for i in range(5):
            pub.publish(os.urandom(i * 37 % 200))
        subs[0].receive_many(3)
        buf = b.segment.buf
        for (lo, hi), where, data in writes:
            off = lo + where % (hi - lo)
            data = data[: hi - off]
            buf[off:off + len(data)] = data
        for op, arg in ops:
            if op == "publish":
                attempt(pub.publish, b"p" * arg, timeout=0.01)
            elif op == "publish_many":
                attempt(pub.publish_many, [b"q" * 30] * arg, timeout=0.01)
            elif op == "reserve":
                def reserve(n=arg):
                    with pub.reserve(n, timeout=0.01) as view:
                        view[:] = b"r" * n
                attempt(reserve)
            elif op in ("receive", "receive_many", "view") and subs:
                sub = subs[arg % len(subs)]
                if op == "receive":
                    attempt(sub.receive_nowait)
                elif op == "receive_many":
                    attempt(sub.receive_many, 50, timeout=0)
                else:
                    def view(s=sub):
                        with s.receive_view(timeout=0) as v:
                            bytes(v)
                    attempt(view)
            elif op == "subscribe":
                sub = attempt(b.subscribe, arg)
                if sub is not None:
                    subs.append(sub)
            elif op == "republish":
                attempt(pub.close)
                new = attempt(b.publisher)
                if new is not None:
                    pub = new
            elif op == "close_sub" and subs:
                attempt(subs.pop(arg % len(subs)).close)
            elif op == "stats":
                attempt(b.stats)
        # whatever happened, a fresh open reports the state or a clean error
        attempt(lambda: Broadcast.open(name).close())
    finally:
        b.close()
        segment.unlink(name)


LATEST_CONTROL = (128, 192)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(writes=st.lists(st.tuples(st.integers(128, 128 + 64 + 3 * 128 - 1),
                                 st.binary(min_size=1, max_size=16)), min_size=1, max_size=6),
       ops=st.lists(st.sampled_from(["get", "set", "wait", "stats", "version"]),
                    min_size=1, max_size=12))
def test_corrupted_latest_never_crashes_or_hangs(writes, ops):
    name = unique_name("fzl")
    lt = Latest.create(name, 64, slots=3)
    try:
        lt.set(b"initial")
        buf = lt.segment.buf
        for off, data in writes:
            data = data[: buf.nbytes - off]
            buf[off:off + len(data)] = data
        for op in ops:
            if op == "get":
                attempt(lt.get)
            elif op == "set":
                attempt(lt.set, b"v" * 40, timeout=0.01)
            elif op == "wait":
                attempt(lt.wait, 2**64 - 1, timeout=0.01)
            elif op == "stats":
                attempt(lt.stats)
            else:
                attempt(lambda: lt.version)
    finally:
        lt.close()
        segment.unlink(name)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(ndim=st.integers(0, 255), kind=st.integers(0, 255),
       shape=st.lists(st.integers(0, 2**64 - 1), max_size=6),
       text=st.one_of(
           st.text(max_size=200),
           st.text(alphabet="()[],'\"-+0123456789 \\xa", max_size=400),
           st.integers(1, 5000).map(lambda n: "(" * n + ")" * n),
           st.integers(1, 30000).map(lambda n: "-" * n + "1")),
       nbytes=st.integers(0, 2**64 - 1), tail=st.binary(max_size=64))
def test_array_frames_from_shared_memory_never_escape_value_error(ndim, kind, shape, text,
                                                                   nbytes, tail):
    """An array frame is message content, which any writer of the segment may have changed:
    parsing it returns an array description or raises ValueError, nothing else (no
    RecursionError, MemoryError, IndexError; no hang)."""
    import struct

    from shmkit.broadcast import _ARRAY_HEAD, _ARRAY_MAGIC, _parse_array

    raw = text.encode("utf-8", "surrogatepass")[:65535]
    dims = (shape * (ndim // max(len(shape), 1) + 1))[:ndim] if shape else [0] * ndim
    frame = (_ARRAY_HEAD.pack(_ARRAY_MAGIC, ndim, kind, len(raw), nbytes)
             + struct.pack(f"<{ndim}Q", *dims) + raw + tail)
    try:
        dtype, out_shape, start, size = _parse_array(memoryview(frame), "fuzz")
    except ValueError:
        return
    assert start + size <= len(frame) and not dtype.hasobject and len(out_shape) == ndim
