"""SharedDict: a crash-safe key-value store shared by unrelated processes."""

from __future__ import annotations

import multiprocessing
import operator
import os
import pickle
import signal
import threading
import time

import pytest
from procs import kill, run_python, spawn_python, stop, wait_for_line

from shmkit import CorruptSegmentError, KindMismatchError, SegmentPermissionError, WaitTimeoutError
from shmkit import layout, segment
from shmkit.dict import SharedDict, describe_state
from shmkit.errors import SharedDictFullError


@pytest.fixture
def d(seg_name):
    table = SharedDict.create(seg_name, capacity_bytes=1 << 20, max_keys=1000)
    yield table
    table.close()


def test_behaves_like_a_dict(d):
    model = {}
    for store in (d, model):
        store["a"] = b"raw"
        store[b"a"] = {"pickled": [1, 2]}
        store["n"] = 5
        store.update({"u1": b"1", "u2": (2,)})
        store.setdefault("s", [0])
        store.setdefault("s", [1])
        store["n"] = 6
        del store["u1"]
    assert d.snapshot() == model
    assert dict(d.items()) == model and len(d) == len(model)
    assert sorted(d, key=repr) == sorted(model, key=repr)
    assert sorted(map(repr, d.values())) == sorted(map(repr, model.values()))
    assert d == model
    assert d["a"] == b"raw" and d[b"a"] == {"pickled": [1, 2]}
    assert "a" in d and b"a" in d and "zz" not in d and 3 not in d
    assert d.get("zz") is None and d.get("zz", 7) == 7
    assert d.pop("n") == 6 and d.pop("n", "gone") == "gone"
    with pytest.raises(KeyError):
        d.pop("n")
    with pytest.raises(KeyError):
        d["n"]
    with pytest.raises(KeyError):
        del d["n"]
    key, value = d.popitem()
    assert key not in d
    d.clear()
    assert len(d) == 0 and list(d) == [] and d.snapshot() == {}
    with pytest.raises(KeyError):
        d.popitem()
    d.check()
    stats = d.stats()
    assert stats["repairs"] == 0 and stats["recoveries"] == 0  # no write looked interrupted


def test_bytes_values_stay_bytes_and_others_round_trip(d):
    values = [b"", b"\x00" * 100, bytearray(b"ba"), memoryview(b"mv").tobytes(), "text", None,
              1.5, {"nested": (1, [2])}, frozenset({1})]
    for i, v in enumerate(values):
        d[f"k{i}"] = v
    for i, v in enumerate(values):
        got = d[f"k{i}"]
        assert got == v and type(got) is type(v)


def test_empty_and_unicode_keys(d):
    d[""] = b"empty"
    d["ключ-🔑"] = b"unicode"
    assert d[""] == b"empty" and d["ключ-🔑"] == b"unicode"
    assert set(d) == {"", "ключ-🔑"}


def test_bad_key_type_raises_type_error(d):
    with pytest.raises(TypeError, match="str or bytes"):
        d[1] = b"x"
    with pytest.raises(TypeError):
        d[("t",)]


def test_values_seen_by_unrelated_process(backend, seg_name):
    d = SharedDict.create(seg_name, capacity_bytes=1 << 16, backend=backend)
    try:
        d["from-parent"] = {"x": 1}
        run_python("import sys\n"
                   "from shmkit.dict import SharedDict\n"
                   "d = SharedDict.open(sys.argv[1], backend=sys.argv[2])\n"
                   "assert d['from-parent'] == {'x': 1}\n"
                   "d['from-child'] = b'hello'\n"
                   "d.close()\n",
                   seg_name, backend, timeout=60)
        assert d["from-child"] == b"hello"
    finally:
        d.unlink()
        d.close()


def test_readonly_open_reads_but_cannot_write(d, seg_name):
    d["k"] = b"v"
    ro = SharedDict.open(seg_name, readonly=True)
    try:
        assert ro["k"] == b"v" and list(ro) == ["k"] and len(ro) == 1
        with pytest.raises(SegmentPermissionError):
            ro["k"] = b"w"
        with pytest.raises(SegmentPermissionError):
            del ro["k"]
    finally:
        ro.close()
    assert d["k"] == b"v"


def test_opening_another_kind_raises_kind_mismatch(seg_name):
    seg, _ = layout.create_typed(seg_name, layout.Kind.ARRAY, 64)
    try:
        with pytest.raises(KindMismatchError, match="SharedArray"):
            SharedDict.open(seg_name)
    finally:
        seg.unlink()
        seg.close()


def test_pickles_by_name_into_spawned_pool_workers(d):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        pool.starmap(operator.setitem, [(d, f"w{i}", i * i) for i in range(6)], chunksize=1)
        got = pool.starmap(operator.getitem, [(d, "w3")])
    assert got == [9]
    assert {d[f"w{i}"] for i in range(6)} == {i * i for i in range(6)}


# -- many processes ------------------------------------------------------------------------------

RANDOM_OPS = r"""
import pickle, random, re, sys
from shmkit.dict import SharedDict
name, me, n_ops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
d = SharedDict.open(name)
rng = random.Random(me)
MISSING = object()
own = [f"p{me}-{i}" if i % 2 else f"p{me}-{i}".encode() for i in range(200)]
shared = [f"shared-{i}" for i in range(20)]
model, last = {}, {}
for n in range(n_ops):
    op = rng.random()
    if op < 0.15:
        k = rng.choice(shared)
        v = f"{me}:{n}".encode()
        d[k] = v
        last[k] = v
    elif op < 0.25:
        v = d.get(rng.choice(shared))
        assert v is None or re.fullmatch(rb"[0-3]:[0-9]+", v), v
    else:
        k = rng.choice(own)
        r = rng.random()
        if r < 0.45:
            v = rng.choice([rng.randbytes(rng.randrange(0, 300)), ("obj", n, [me] * 3), n])
            d[k] = v
            model[k] = v
        elif r < 0.75:
            assert d.get(k, MISSING) == model.get(k, MISSING), k
        elif r < 0.9:
            assert d.pop(k, None) == model.pop(k, None), k
        else:
            assert (k in d) == (k in model), k
d.close()
sys.stdout.write(pickle.dumps((model, last)).hex())
"""


def test_four_processes_random_operations_match_the_model(seg_name):
    d = SharedDict.create(seg_name, capacity_bytes=4 << 20, max_keys=2000)
    try:
        procs = [spawn_python(RANDOM_OPS, seg_name, i, 10_000) for i in range(4)]
        results = []
        for p in procs:
            out, err = stop(p, timeout=120)
            assert p.returncode == 0, err
            results.append(pickle.loads(bytes.fromhex(out)))
        expected = {}
        for model, _ in results:
            expected.update(model)
        snap = d.snapshot()
        own = {k: v for k, v in snap.items() if not str(k).startswith("shared-")}
        assert own == expected
        for key in {k for _, last in results for k in last}:
            # The final value is the last write of one of the processes (old-or-new, never torn).
            assert snap[key] in {last[key] for _, last in results if key in last}
        d.check()
    finally:
        d.unlink()
        d.close()


# -- crashes -------------------------------------------------------------------------------------

CRASH_WRITER = r"""
import sys
from shmkit.dict import SharedDict
d = SharedDict.open(sys.argv[1])
print("ready", flush=True)
n = int(sys.argv[2])
while True:
    n += 1
    key = f"k{n % 8}"
    if n % 7 == 0:
        d.pop(key, None)
        continue
    size = 64 + (n * 7919) % (256 * 1024)
    head = f"{key}:{n}:{size}:".encode()
    d[key] = head + bytes([n % 251]) * (size - len(head))
"""


def _verify_value(key: str, value: bytes) -> None:
    name, n, size, rest = value.split(b":", 3)
    assert name.decode() == key and int(size) == len(value)
    assert rest == bytes([int(n) % 251]) * len(rest), f"torn value for {key}"


def _verify_all(d: SharedDict) -> None:
    for key in (f"k{i}" for i in range(8)):
        value = d.get(key)
        if value is not None:
            _verify_value(key, value)
    for key, value in d.items():
        if key.startswith("k"):  # the crash writer's keys
            _verify_value(key, value)


def _kill_inside_a_write(d: SharedDict, seg_name: str, start: int) -> None:
    """Start a writer, stop it while it holds the writer lock, SIGKILL it."""
    proc = spawn_python(CRASH_WRITER, seg_name, start)
    try:
        wait_for_line(proc, "ready", timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if d.stats()["writer_lock_pid"] == proc.pid:
                os.kill(proc.pid, signal.SIGSTOP)
                if d.stats()["writer_lock_pid"] == proc.pid:
                    break  # frozen inside a write
                os.kill(proc.pid, signal.SIGCONT)
        else:
            raise AssertionError("the writer never held the lock")
        _verify_all(d)  # readers take no lock: they work while the stopped writer holds it
    finally:
        kill(proc)


def test_writer_killed_mid_update_leaves_table_consistent(seg_name):
    d = SharedDict.create(seg_name, capacity_bytes=16 << 20, max_keys=64)
    rounds = 6
    try:
        for i in range(rounds):
            _kill_inside_a_write(d, seg_name, i * 100_000)
            _verify_all(d)
            d.check()  # takes the dead writer's lock, repairs, verifies every structure
            _verify_all(d)
        stats = d.stats()
        assert stats["recoveries"] == rounds
        assert stats["repairs"] >= 1
        d["after"] = b"still works"
        assert d["after"] == b"still works"
        d.check()
    finally:
        d.unlink()
        d.close()


SURVIVOR = r"""
import sys
from shmkit.dict import SharedDict
d = SharedDict.open(sys.argv[1])
n = 0
while d.get("stop") is None:
    key = f"s{n % 8}"
    previous = d.get(key)
    assert previous is None or previous == f"{key}:{n - 8}".encode(), (key, previous)
    d[key] = f"{key}:{n}".encode()
    n += 1
print(n)
"""


def test_survivor_keeps_writing_while_other_writers_are_killed(seg_name):
    d = SharedDict.create(seg_name, capacity_bytes=16 << 20, max_keys=64)
    rounds = 3
    try:
        survivor = spawn_python(SURVIVOR, seg_name)
        for i in range(rounds):
            _kill_inside_a_write(d, seg_name, i * 100_000)
            _verify_all(d)
        d["stop"] = b"1"
        out, err = stop(survivor, timeout=60)
        assert survivor.returncode == 0, err
        assert int(out) > 0
        assert d.stats()["recoveries"] == rounds  # each dead writer's lock taken over once
        d.check()
    finally:
        d.unlink()
        d.close()


@pytest.mark.soak
def test_writer_killed_many_times_soak(seg_name):
    d = SharedDict.create(seg_name, capacity_bytes=16 << 20, max_keys=64)
    try:
        for i in range(100):
            _kill_inside_a_write(d, seg_name, i * 100_000)
            d.check()
            _verify_all(d)
    finally:
        d.unlink()
        d.close()


HOLD_LOCK = r"""
import sys, shmkit
from shmkit.sync import Mutex
seg = shmkit.Segment.open(sys.argv[1])
m = Mutex.at(seg, 128)
m.acquire()
print("locked", flush=True)
if sys.argv[2] == "hold":
    sys.stdin.read()
"""


def test_lock_of_a_dead_process_is_recovered(d, seg_name):
    d["k"] = b"before"
    run_python(HOLD_LOCK + "import os\nos._exit(0)\n", seg_name, "die", timeout=60)
    assert d.stats()["writer_lock_pid"] is not None
    d["k"] = b"after"
    assert d["k"] == b"after" and d.stats()["recoveries"] == 1
    d.check()


def test_live_lock_holder_times_out_writers_but_not_readers(d, seg_name):
    import subprocess

    d["k"] = b"v"
    proc = spawn_python(HOLD_LOCK, seg_name, "hold", stdin=subprocess.PIPE)
    try:
        wait_for_line(proc, "locked", timeout=60)
        impatient = SharedDict.open(seg_name, timeout=0.2)
        assert impatient["k"] == b"v" and list(impatient.items()) == [("k", b"v")]
        with pytest.raises(WaitTimeoutError, match=f"pid {proc.pid}"):
            impatient["k"] = b"w"
        impatient.close()
    finally:
        stop(proc, timeout=30)  # closes its stdin: it exits still holding the lock
    d["k"] = b"w"  # recovered from the exited holder
    assert d["k"] == b"w" and d.stats()["recoveries"] == 1


# -- limits --------------------------------------------------------------------------------------

def test_full_heap_raises_with_sizes_and_recovers_after_delete(seg_name):
    d = SharedDict.create(seg_name, capacity_bytes=4096, max_keys=500)
    try:
        n = 0
        with pytest.raises(SharedDictFullError, match=r"of 4 KiB are used .*capacity_bytes"):
            while True:
                d[f"k{n}"] = b"x" * 100
                n += 1
        assert 20 < n < 40
        del d["k0"]
        d["again"] = b"x" * 100
        d.check()
    finally:
        d.unlink()
        d.close()


def test_max_keys_limit_raises_full(seg_name):
    d = SharedDict.create(seg_name, capacity_bytes=1 << 16, max_keys=10)
    try:
        for i in range(10):
            d[i.to_bytes(2, "big")] = b""
        with pytest.raises(SharedDictFullError, match="max_keys"):
            d[b"one more"] = b""
        d[b"\x00\x01"] = b"replacing is fine"
        d.check()
    finally:
        d.unlink()
        d.close()


def test_churn_reuses_space_and_cleans_tombstones(seg_name):
    d = SharedDict.create(seg_name, capacity_bytes=8192, max_keys=16)
    try:
        for i in range(5000):
            d[f"key-{i}"] = bytes(i % 200)
            if i >= 10:
                del d[f"key-{i - 10}"]
        assert len(d) == 10
        stats = d.stats()
        assert stats["index_generation"] > 0 and stats["tombstones"] < stats["index_slots"]
        d.check()
    finally:
        d.unlink()
        d.close()


def test_huge_values(seg_name):
    d = SharedDict.create(seg_name, capacity_bytes=80 << 20, max_keys=16)
    try:
        big = os.urandom(64 << 20)
        d["big"] = big
        out = run_python("import hashlib, sys\n"
                         "from shmkit.dict import SharedDict\n"
                         "d = SharedDict.open(sys.argv[1])\n"
                         "print(hashlib.sha256(d['big']).hexdigest())\n",
                         seg_name, timeout=120)
        import hashlib

        assert out.stdout.strip() == hashlib.sha256(big).hexdigest()
        assert d["big"] == big
        with pytest.raises(SharedDictFullError, match="whole capacity"):
            d["too-big"] = bytes(81 << 20)
        with pytest.raises(SharedDictFullError, match="are used"):
            d["second"] = bytes(20 << 20)
        del d["big"]
        d["second"] = bytes(20 << 20)
        d.check()
    finally:
        d.unlink()
        d.close()


def test_threads_share_one_dict(d):
    errors = []

    def work(t):
        try:
            for i in range(2000):
                d[f"t{t}-{i % 50}"] = bytes([t]) * (i % 300)
                v = d.get(f"t{(t + 1) % 4}-{i % 50}")
                assert v is None or len(set(v)) <= 1
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(d) == 200
    d.check()


def test_write_from_a_finalizer_run_under_the_writer_lock_is_refused(names):
    # A locked call allocates Python objects (here the pairs of a snapshot); the garbage
    # collector can run there, and a finalizer may use the same dict. Its write finds the
    # lock word naming this very thread: taking it "over" (as from a dead task that reused
    # our id) would let the outer call go on without the lock once the inner one released it.
    import gc
    d = SharedDict.create(names("fin"), capacity_bytes=1 << 20, max_keys=6000)
    for i in range(5000):  # more pairs than the tuple free list holds: real allocations
        d[f"k{i}"] = b"v%d" % i
    me = threading.get_native_id()
    seen = []

    def during_gc(phase, info):
        if phase != "start" or d._t.stats()["lock_owner_tid"] != me:
            return
        try:
            d["from-gc"] = b"x"
            seen.append("written")
        except RuntimeError as exc:
            seen.append(exc)
        seen.append(d._t.stats()["lock_owner_tid"] == me)  # still ours afterwards

    threshold = gc.get_threshold()
    gc.callbacks.append(during_gc)
    gc.set_threshold(50)
    try:
        snap = d.snapshot()
    finally:
        gc.callbacks.remove(during_gc)
        gc.set_threshold(*threshold)
    assert seen, "no collection ran while the snapshot held the lock"
    assert all(isinstance(x, RuntimeError) for x in seen[0::2])
    assert "own call" in str(seen[0]) and all(seen[1::2])
    assert len(snap) == 5000 and "from-gc" not in d
    assert d.stats()["writer_lock_pid"] is None
    d["after"] = b"ok"  # the lock works normally afterwards
    d.check()
    d.close()


def test_close_then_use_raises_and_stats_for_inspect(d, seg_name):
    d["k"] = b"v"
    seg = segment.Segment.open(seg_name, readonly=True)
    state = describe_state(seg, layout.parse(seg))
    seg.close()
    assert state["keys"] == 1 and state["capacity_bytes"] == 1 << 20 and state["used_bytes"] == 48
    d.close()
    d.close()
    with pytest.raises(ValueError, match="closed"):
        d["k"]
