"""SharedDict on damaged memory: clear CorruptSegmentError, never a crash or a hang."""

from __future__ import annotations

import io
import os
import pickle
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import shmkit.dict as dict_mod
from shmkit import CorruptSegmentError, KindMismatchError, WaitTimeoutError
from shmkit.dict import CONTROL_END, SLOT_SIZE, SharedDict
from shmkit.errors import SharedDictFullError

ALLOWED = (KeyError, CorruptSegmentError, SharedDictFullError, WaitTimeoutError,
           KindMismatchError)
# More examples for a deeper run: SHMKIT_FUZZ_EXAMPLES=5000 pytest tests/test_dict_fuzz.py
FUZZ_EXAMPLES = int(os.environ.get("SHMKIT_FUZZ_EXAMPLES", "300"))
KEYS = [f"k{i}" if i % 2 else f"b{i}".encode() for i in range(30)]


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"fuzzed pickle refers to {module}.{name}")


@pytest.fixture(autouse=True)
def safe_unpickling(monkeypatch):
    """Damage can turn raw bytes into 'pickled' ones: never let them name a callable."""
    monkeypatch.setattr(dict_mod, "_loads", lambda data: _NoGlobals(io.BytesIO(data)).load())


def _filled(name: str) -> SharedDict:
    d = SharedDict.create(name, capacity_bytes=8192, max_keys=48, timeout=0.2)
    for i, k in enumerate(KEYS):
        d[k] = bytes([i]) * (i * 7 % 150)
    for k in KEYS[::5]:
        del d[k]
    d["obj"] = ("tuple", 1)
    return d


def _attempt(fn) -> None:
    try:
        fn()
    except ALLOWED:
        pass


def _exercise(d: SharedDict, name: str) -> None:
    for k in KEYS:
        _attempt(lambda: d.get(k))
        _attempt(lambda: k in d)
    _attempt(lambda: list(d.items()))
    _attempt(lambda: list(d))
    _attempt(lambda: d.snapshot())
    assert 0 <= len(d) <= 48
    d.stats()
    _attempt(lambda: d.__setitem__("new", b"x" * 40))
    _attempt(lambda: d.__delitem__(KEYS[1]))
    _attempt(lambda: d.pop(KEYS[3], None))
    _attempt(lambda: d.__setitem__(KEYS[7], b"y" * 100))
    _attempt(lambda: d.setdefault("sd", b"z"))
    _attempt(d.check)
    _attempt(lambda: d.__setitem__(KEYS[9], b"w" * 10))
    _attempt(lambda: d.clear())
    _attempt(lambda: d.__setitem__("last", b"v"))

    def reopen():
        SharedDict.open(name, timeout=0.2).close()
    _attempt(reopen)


REGIONS = {
    "header": lambda d: (0, 128),
    "control": lambda d: (128, CONTROL_END),
    "index": lambda d: (CONTROL_END, d.segment.size - 8192),
    "heap": lambda d: (d.segment.size - 8192, d.segment.size),
}


@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(region=st.sampled_from(sorted(REGIONS)), where=st.integers(0, 1 << 32),
       data=st.binary(min_size=1, max_size=16), hits=st.integers(1, 3))
def test_random_damage_raises_corrupt_or_keeps_working(seg_name, region, where, data, hits):
    d = _filled(seg_name)
    try:
        lo, hi = REGIONS[region](d)
        buf = d.segment.buf
        for h in range(hits):
            off = lo + (where * (h + 1)) % (hi - lo)
            end = min(hi, off + len(data))
            buf[off:end] = data[:end - off]
        _exercise(d, seg_name)
    finally:
        d.unlink()
        d.close()


def _live_slot(d: SharedDict) -> int:
    """Offset of a used slot in the active index area (generation 0 after _filled)."""
    buf = d.segment.buf
    for i in range(d.stats()["index_slots"]):
        off = CONTROL_END + i * SLOT_SIZE
        ref = struct.unpack_from("<Q", buf, off)[0]
        if ref & 0xFFFFFFFF:
            return off
    raise AssertionError("no live slot")


def _slot_key(d: SharedDict, slot: int):
    ref = struct.unpack_from("<Q", d.segment.buf, slot)[0]
    block = (ref & 0xFFFFFFFF) * 16
    klen, kinds = struct.unpack_from("<II", d.segment.buf, block + 8)
    raw = bytes(d.segment.buf[block + 32:block + 32 + klen])
    return (raw.decode() if kinds & 0xFF == 0 else raw), block


def test_entry_pointing_outside_the_heap_raises_corrupt(seg_name):
    d = _filled(seg_name)
    try:
        slot = _live_slot(d)
        key, _ = _slot_key(d, slot)
        struct.pack_into("<I", d.segment.buf, slot, 3)  # unit 3: inside the control block
        with pytest.raises(CorruptSegmentError, match="outside the heap"):
            d[key]
        with pytest.raises(CorruptSegmentError, match="outside the heap"):
            d.check()
    finally:
        d.unlink()
        d.close()


def test_entry_with_impossible_length_raises_corrupt(seg_name):
    d = _filled(seg_name)
    try:
        key, block = _slot_key(d, _live_slot(d))
        struct.pack_into("<Q", d.segment.buf, block + 16, 1 << 40)  # vlen
        with pytest.raises(CorruptSegmentError, match="impossible lengths"):
            d[key]
        with pytest.raises(CorruptSegmentError):
            list(d.items())
        with pytest.raises(CorruptSegmentError):
            d[key] = b"overwrite"
    finally:
        d.unlink()
        d.close()


def test_damaged_free_lists_are_reported_then_rebuilt_from_the_index(seg_name):
    d = _filled(seg_name)
    try:
        before = d.snapshot()
        buf = d.segment.buf
        for c in range(96):  # every free-list head now points into the control block
            struct.pack_into("<I", buf, 320 + 4 * c, 2)
        struct.pack_into("<QQ", buf, 288, (1 << 64) - 1, (1 << 32) - 1)
        with pytest.raises(CorruptSegmentError, match="free list"):
            d["new"] = b"x" * 64
        d["new"] = b"x" * 64  # the next writer rebuilds the bookkeeping from the index
        d.check()
        before["new"] = b"x" * 64
        assert d.snapshot() == before and d.stats()["repairs"] == 1
    finally:
        d.unlink()
        d.close()


def test_damaged_geometry_refuses_to_open(seg_name):
    d = _filled(seg_name)
    try:
        struct.pack_into("<Q", d.segment.buf, 64 + 8, 12345)  # params[1] = nslots
        with pytest.raises(CorruptSegmentError):
            SharedDict.open(seg_name)
    finally:
        d.unlink()
        d.close()
