"""SharedArray: numpy arrays on a named segment, seen zero copy by unrelated processes."""

from __future__ import annotations

import gc
import json
import multiprocessing
import operator
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from procs import run_python

from shmkit import CorruptSegmentError, KindMismatchError, SegmentBusyError, SegmentNotFoundError
from shmkit import layout, segment
from shmkit.array import LOCK_OFFSET, META_OFFSET, SharedArray, _lock_class, describe_state

STRUCT = np.dtype([("id", "<u4"), ("pos", "<f8", (3,)), ("tag", "S6"),
                   ("inner", [("a", "u1"), ("when", "<M8[ns]")])], align=True)


def test_write_visible_across_unrelated_processes(backend, seg_name):
    a = SharedArray.create(seg_name, (3, 4), "f8", backend=backend)
    try:
        run_python("import sys, shmkit.array as m\n"
                   "b = m.SharedArray.open(sys.argv[1], backend=sys.argv[2])\n"
                   "assert b.shape == (3, 4) and b.dtype == 'f8'\n"
                   "b[1, 2] = 42.5\n",
                   seg_name, backend, timeout=60)
        assert a[1, 2] == 42.5
        a[2, 3] = 7.0
        out = run_python("import sys, shmkit.array as m\n"
                         "print(m.SharedArray.open(sys.argv[1], backend=sys.argv[2])[2, 3])",
                         seg_name, backend, timeout=60)
        assert out.stdout.strip() == "7.0"
    finally:
        a.unlink()


def test_new_array_is_zero_filled(seg_name):
    a = SharedArray.create(seg_name, 1000, "i8")
    assert not a.any() and a.flags.writeable and a.flags.c_contiguous
    a.unlink()


def test_structured_dtype_round_trips_across_processes(seg_name):
    a = SharedArray.create(seg_name, 5, STRUCT)
    try:
        a["id"] = np.arange(5)
        a["tag"][2] = b"hello"
        run_python("import sys, numpy as np, shmkit.array as m\n"
                   "b = m.SharedArray.open(sys.argv[1])\n"
                   "assert b.dtype.names == ('id', 'pos', 'tag', 'inner'), b.dtype\n"
                   "assert b.dtype.itemsize == int(sys.argv[2]), b.dtype\n"
                   "assert list(b['id']) == [0, 1, 2, 3, 4] and b['tag'][2] == b'hello'\n"
                   "b['pos'][4] = [1.5, 2.5, 3.5]\n"
                   "b['inner']['when'][1] = np.datetime64(5, 'ns')\n",
                   seg_name, STRUCT.itemsize, timeout=60)
        assert a.dtype == STRUCT
        assert list(a["pos"][4]) == [1.5, 2.5, 3.5]
        assert a["inner"]["when"][1] == np.datetime64(5, "ns")
    finally:
        a.unlink()


def test_fortran_order_and_from_array(seg_name):
    src = np.asfortranarray(np.arange(12, dtype="<i2").reshape(3, 4))
    a = SharedArray.from_array(seg_name, src)
    try:
        b = SharedArray.open(seg_name)
        assert b.flags.f_contiguous and not b.flags.c_contiguous
        assert np.array_equal(b, src)
    finally:
        a.unlink()


def test_readonly_attach_cannot_write(seg_name):
    a = SharedArray.create(seg_name, 8, "u1")
    try:
        out = run_python("import sys, shmkit.array as m\n"
                         "b = m.SharedArray.open(sys.argv[1], readonly=True)\n"
                         "assert not b.flags.writeable\n"
                         "try:\n"
                         "    b.flags.writeable = True\n"
                         "except ValueError:\n"
                         "    pass\n"
                         "else:\n"
                         "    raise SystemExit('could make a read-only mapping writeable')\n"
                         "try:\n"
                         "    b[0] = 1\n"
                         "except ValueError:\n"
                         "    print('refused')\n",
                         seg_name, timeout=60)
        assert out.stdout.strip() == "refused"
        assert not a.any()
    finally:
        a.unlink()


def test_pickling_sends_the_name_not_the_data(seg_name):
    a = SharedArray.create(seg_name, 1 << 20, "u1")
    try:
        assert len(pickle.dumps(a)) < 1000
        b = pickle.loads(pickle.dumps(a[10:20:2]))
        b[1] = 9
        assert a[12] == 9
        c = pickle.loads(pickle.dumps(a[::-3]))
        c[0] = 5
        assert a[(1 << 20) - 1] == 5
    finally:
        a.unlink()


def test_pool_workers_spawned_update_the_same_memory(seg_name):
    a = SharedArray.create(seg_name, (4, 100), "i8")
    try:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(2) as pool:
            # Each worker receives a pickled view (by name) and writes through it.
            pool.starmap(np.copyto, [(a[i], np.full(100, i + 1)) for i in range(4)], chunksize=1)
            pool.starmap(operator.setitem, [(a, (0, 0), -1)])
        assert [int(a[i, 50]) for i in range(4)] == [1, 2, 3, 4]
        assert a[0, 0] == -1
    finally:
        a.unlink()


def test_segment_outlives_its_creator_until_unlinked(seg_name):
    run_python("import sys, shmkit.array as m\n"
               "a = m.SharedArray.create(sys.argv[1], 16, 'i4')\n"
               "a[:] = range(16)\n",
               seg_name, timeout=60)
    b = SharedArray.open(seg_name)
    assert list(b) == list(range(16))
    b.unlink()
    with pytest.raises(SegmentNotFoundError):
        SharedArray.open(seg_name)
    b[3] = 99  # the attached mapping survives the unlink
    assert b[3] == 99


def test_views_keep_the_mapping_alive(seg_name):
    a = SharedArray.create(seg_name, 100, "f4")
    seg = a.segment
    view = a[10:20]
    del a
    gc.collect()
    view[:] = 3.0
    with pytest.raises(SegmentBusyError):
        seg.close()
    assert SharedArray.open(seg_name)[15] == 3.0
    seg.unlink()


def test_computed_arrays_are_private(seg_name):
    a = SharedArray.create(seg_name, 10, "i4")
    try:
        b = a + 1
        assert type(b) is np.ndarray
        assert isinstance(a.sum(), np.integer)
        fancy = a[[1, 2]]
        restored = pickle.loads(pickle.dumps(fancy))
        restored[0] = 5
        assert a[1] == 0
        with pytest.raises(ValueError):
            fancy.name
    finally:
        a.unlink()


def test_zero_length_array(seg_name):
    a = SharedArray.create(seg_name, (0, 3), "f8")
    assert SharedArray.open(seg_name).shape == (0, 3)
    a.unlink()


@pytest.mark.parametrize("kwargs, exc", [
    ({"shape": 3, "dtype": object}, TypeError),
    ({"shape": -1, "dtype": "f8"}, ValueError),
    ({"shape": (2, "x"), "dtype": "f8"}, TypeError),
    ({"shape": 3, "dtype": "f8", "order": "K"}, ValueError),
    ({"shape": 3, "dtype": [("a", "O")]}, TypeError),
    ({"shape": (0, 2**64), "dtype": "u1"}, ValueError),      # numpy refuses the dimension
    ({"shape": (2**62, 2**62), "dtype": "u1"}, ValueError),  # and the size
])
def test_bad_arguments_raise_before_creating(seg_name, kwargs, exc):
    with pytest.raises(exc):
        SharedArray.create(seg_name, **kwargs)
    assert not segment.exists(seg_name)


def test_damaged_dimension_numpy_refuses_raises_corrupt_on_open(seg_name):
    # An empty array can claim any dimensions and still match its 0 data bytes; numpy's own
    # refusal must come out as CorruptSegmentError, not as a busy segment that stays open.
    a = SharedArray.create(seg_name, (0, 4 * 10**18), "u1")
    meta = bytes(a.segment.buf[META_OFFSET:META_OFFSET + 200]).split(b"\0")[0]
    damaged = meta.replace(b"4" + b"0" * 18, b"9" * 19)  # same length, above 2**63 - 1
    assert damaged != meta
    _damage(seg_name, META_OFFSET, damaged)
    with pytest.raises(CorruptSegmentError, match="exceeds numpy"):
        SharedArray.open(seg_name)
    a.unlink()


def test_opening_another_kind_raises_kind_mismatch(seg_name):
    seg, _ = layout.create_typed(seg_name, layout.Kind.DICT, 64)
    try:
        with pytest.raises(KindMismatchError, match="SharedDict"):
            SharedArray.open(seg_name)
    finally:
        seg.unlink()
        seg.close()


def test_describe_state_reports_shape_and_dtype(seg_name):
    a = SharedArray.create(seg_name, (2, 3), "<i2")
    try:
        seg = segment.Segment.open(seg_name, readonly=True)
        state = describe_state(seg, layout.parse(seg))
        seg.close()
        assert state["shape"] == [2, 3] and state["dtype"] == "int16" and state["nbytes"] == 12
    finally:
        a.unlink()


@pytest.mark.skipif(_lock_class() is None, reason="shmkit.sync.RWLock is not available yet")
def test_lock_is_shared_with_other_processes(seg_name):
    a = SharedArray.create(seg_name, 4, "i8")
    try:
        with a.lock.write():
            a[:] = 1
        run_python("import sys, shmkit.array as m\n"
                   "b = m.SharedArray.open(sys.argv[1])\n"
                   "with b.lock.write():\n"
                   "    b += 1\n",
                   seg_name, timeout=60)
        with a.lock.read():
            assert list(a) == [2, 2, 2, 2]
    finally:
        a.unlink()


@pytest.mark.skipif(_lock_class() is None, reason="shmkit.sync.RWLock is not available yet")
def test_damaged_lock_slot_count_cannot_reach_metadata_or_elements(seg_name):
    from shmkit import _native
    a = SharedArray.create(seg_name, 4096, "u1")
    try:
        seg = a.segment
        before = bytes(seg.buf[META_OFFSET:])
        # 200 reader slots would take 3240 bytes: far past the 1024-byte lock area
        _native.store_u32(seg.buf, LOCK_OFFSET + _lock_class()._SLOTS_OFFSET, 200)
        with pytest.raises(CorruptSegmentError, match="lock area"):
            a.lock
        assert bytes(seg.buf[META_OFFSET:]) == before  # metadata and elements untouched
        b = SharedArray.open(seg_name)  # the elements still read
        assert not b.any()
        del b
    finally:
        a.unlink()


def _damage(seg_name: str, offset: int, data: bytes) -> None:
    seg = segment.Segment.open(seg_name)
    end = min(seg.size, offset + len(data))
    seg.buf[offset:end] = data[:end - offset]
    seg.close()


def _open_checked(seg_name: str) -> None:
    """Open a possibly damaged array: it must fail cleanly or give an array inside the segment."""
    try:
        b = SharedArray.open(seg_name)
    except (CorruptSegmentError, KindMismatchError):
        return
    assert b.nbytes <= b.segment.size
    b.tobytes()  # touching every element must not fault
    del b
    gc.collect()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(min_value=64, max_value=META_OFFSET + 200),
       data=st.binary(min_size=1, max_size=40))
def test_damaged_header_or_metadata_raises_corrupt(seg_name, offset, data):
    SharedArray.create(seg_name, (4, 4), STRUCT)
    try:
        _damage(seg_name, offset, data)
        _open_checked(seg_name)
    finally:
        segment.unlink(seg_name)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=st.recursive(
    st.none() | st.booleans() | st.integers(-5, 1 << 41) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["dtype", "shape", "order", "str", "sub", "fields", "itemsize",
                         "aligned", "name", "offset", "title"]), inner, max_size=5),
    max_leaves=20))
def test_hostile_json_metadata_raises_corrupt(seg_name, meta):
    SharedArray.create(seg_name, 64, "u1")
    try:
        seg = segment.Segment.open(seg_name)
        meta_len = layout.parse(seg).params[2]
        text = json.dumps({"dtype": meta, "shape": [64], "order": "C"}).encode()
        seg.buf[META_OFFSET:META_OFFSET + meta_len] = text.ljust(meta_len)[:meta_len]
        seg.close()
        _open_checked(seg_name)
    finally:
        segment.unlink(seg_name)
