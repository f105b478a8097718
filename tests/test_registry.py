"""Discovery (registry.py and the /proc helpers in _proc.py): listing, mappers, orphans, gc.

Every test names its segments through the `seg_name`/`names` fixtures and restricts gc to
those names: other test runs on this machine create segments at the same time.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import kill, spawn_python, stop, wait_for_line

from shmkit import Segment, SegmentNotFoundError, _proc, layout, registry, segment
from shmkit.layout import Kind

# A child that creates a typed segment, says so, and waits to be killed.
CREATE_TYPED_AND_WAIT = (
    "import sys, time\n"
    "from shmkit import layout\n"
    "layout.create_typed(sys.argv[1], layout.Kind.DICT, 256, backend=sys.argv[2])\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n")

# A child that maps an existing segment, writes its own mapping address into the last 8
# bytes (past any header), and keeps the mapping until its stdin gets a line.
MAP_AND_WAIT = (
    "import sys, shmkit\n"
    "seg = shmkit.Segment.open(sys.argv[1], backend=sys.argv[2])\n"
    "seg.buf[-8:] = seg.address.to_bytes(8, 'little')\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "seg.close()\n")


def _killed_creator(name: str, backend: str) -> None:
    """Leave a typed segment behind from a creator that was SIGKILLed."""
    child = spawn_python(CREATE_TYPED_AND_WAIT, name, backend)
    try:
        wait_for_line(child, "ready", timeout=30)
    finally:
        kill(child)


def _release(child) -> None:
    """Let a MAP_AND_WAIT child close its mapping and exit."""
    child.stdin.write("\n")
    child.stdin.flush()
    stop(child)


def _only(infos, backend):
    found = [i for i in infos if i.backend == backend]
    assert len(found) == 1, infos
    return found[0]


def _fake_describe_state(seg, header):
    return {"payload_size": header.payload_size, "first_byte": seg.buf[layout.PAYLOAD_OFFSET]}


def _broken_describe_state(seg, header):
    raise RuntimeError("the state function broke")


# -- listing -----------------------------------------------------------------------------------

def test_list_reports_plain_segment_as_foreign_mapped_by_us(backend, seg_name):
    with Segment.create(seg_name, size=5000, backend=backend, mode=0o640) as seg:
        info = _only(registry.list_segments(names=[seg_name]), backend)
        assert info.name == seg_name
        assert info.kind == registry.KIND_FOREIGN
        assert info.header is None and info.state is None
        assert info.size == 5000
        assert info.mode == 0o640
        assert info.uid == os.geteuid()
        assert os.getpid() in info.mapped_by
        assert info.orphan is False
        if backend == "sysv":
            assert info.key == segment.sysv_key(seg_name)
            assert info.shmid == seg.shmid
            assert info.attach_count == 1
            assert info.creator_pid == os.getpid() and info.creator_alive is True
        else:
            assert info.key is None and info.attach_count is None
            assert info.creator_pid is None and info.creator_alive is None
        seg.unlink()


def test_list_reports_typed_segment_kind_state_and_creator(backend, seg_name):
    seg, header = layout.create_typed(seg_name, Kind.DICT, 1000, (7, 8), backend=backend)
    try:
        info = _only(registry.list_segments(names=[seg_name]), backend)
        assert info.kind == "SharedDict"
        assert info.state == "ready"
        assert info.header == header
        assert info.creator_pid == os.getpid() and info.creator_alive is True
        assert info.created == header.created_ns / 1e9
        assert info.size == layout.HEADER_SIZE + 1000
        assert info.orphan is False
    finally:
        seg.unlink()
        seg.close()


def test_prefix_filter_selects_posix_names_only(names):
    a, b, other = names("pfx"), names("pfx"), names("other")
    prefix = a.rsplit("-", 1)[0]
    segs = [Segment.create(a, 64), Segment.create(b, 64), Segment.create(other, 64),
            Segment.create(a, 64, backend="sysv")]
    try:
        listed = registry.list_segments(prefix=prefix)
        assert sorted(i.name for i in listed) == sorted([a, b])
        assert all(i.backend == "posix" for i in listed)
    finally:
        for seg in segs:
            seg.unlink()
            seg.close()


def test_corrupt_header_is_reported_not_raised(backend, seg_name):
    with Segment.create(seg_name, size=4096, backend=backend) as seg:
        seg.buf[:8] = layout.MAGIC
        seg.buf[8:10] = (99).to_bytes(2, "little")  # a layout version from the future
        info = _only(registry.list_segments(names=[seg_name]), backend)
        assert info.kind == registry.KIND_CORRUPT
        assert seg_name in info.detail and "version 99" in info.detail
        assert info.orphan is False
        seg.unlink()


def test_empty_posix_file_is_foreign(seg_name):
    os.close(os.open(os.path.join(_proc.SHM_DIR, seg_name), os.O_CREAT | os.O_RDWR, 0o600))
    info = registry.find(seg_name)
    assert (info.kind, info.size, info.orphan) == (registry.KIND_FOREIGN, 0, False)


def test_initialising_segment_of_dead_creator_is_orphan(backend, seg_name):
    child = spawn_python(
        "import sys, time\n"
        "from shmkit import Segment, layout\n"
        "seg = Segment.create(sys.argv[1], 4096, backend=sys.argv[2])\n"
        "layout.write(seg, layout.Kind.QUEUE)\n"  # header written, never published
        "print('ready', flush=True)\n"
        "time.sleep(120)\n", seg_name, backend)
    try:
        wait_for_line(child, "ready", timeout=30)
    finally:
        kill(child)
    info = registry.find(seg_name, backend=backend)
    assert (info.kind, info.state) == ("Queue", "initialising")
    assert info.creator_alive is False
    assert info.orphan is True


def test_header_without_published_magic_of_dead_creator_is_orphan(seg_name):
    # Killed between writing the header fields and publishing the magic (layout.write).
    child = spawn_python(
        "import sys, time\n"
        "from shmkit import Segment, layout\n"
        "seg = Segment.create(sys.argv[1], 4096)\n"
        "layout.write(seg, layout.Kind.MUTEX)\n"
        "seg.buf[:8] = bytes(8)\n"  # as if the magic store never happened
        "print('ready', flush=True)\n"
        "time.sleep(120)\n", seg_name)
    try:
        wait_for_line(child, "ready", timeout=30)
        info = registry.find(seg_name)
        assert (info.kind, info.state, info.creator_alive) == ("Mutex", "initialising", True)
        assert info.orphan is False
    finally:
        kill(child)
    info = registry.find(seg_name)
    assert info.kind == "Mutex" and info.orphan is True
    assert [r.result for r in registry.collect_garbage(names=[seg_name])] == ["removed"]


def test_zeroed_segment_is_foreign_and_kept(seg_name):
    Segment.create(seg_name, 4096).close()
    info = registry.find(seg_name)
    assert info.kind == registry.KIND_FOREIGN
    assert registry.collect_garbage(names=[seg_name]) == []


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=st.binary(min_size=0, max_size=layout.HEADER_SIZE), magic=st.booleans())
def test_random_header_bytes_never_crash_listing(seg_name, head, magic):
    if magic:
        head = layout.MAGIC + head[len(layout.MAGIC):]
    seg = Segment.open_or_create(seg_name, 256)
    try:
        seg.buf[:layout.HEADER_SIZE] = bytes(layout.HEADER_SIZE)
        seg.buf[:len(head)] = head
        info = registry.find(seg_name, backend="posix")
        labels = {k.label for k in Kind} | {registry.KIND_FOREIGN, registry.KIND_CORRUPT}
        assert info.kind in labels
        if info.kind == registry.KIND_CORRUPT:
            assert info.detail
    finally:
        seg.close()


# -- mappers -----------------------------------------------------------------------------------

def test_live_child_is_listed_with_its_address_range(backend, seg_name):
    seg = Segment.create(seg_name, size=3 * 4096, backend=backend)
    child = spawn_python(MAP_AND_WAIT, seg_name, backend, stdin=subprocess.PIPE)
    try:
        wait_for_line(child, "ready", timeout=30)
        address = int.from_bytes(seg.buf[-8:], "little")
        found = registry.inspect(seg_name, backend=backend)
        theirs = [m for m in found.mappings if m.pid == child.pid]
        assert len(theirs) == 1
        assert theirs[0].start <= address < theirs[0].end
        assert theirs[0].perms == "rw-s"
        assert theirs[0].size >= 3 * 4096
        assert theirs[0].resident_bytes is not None and theirs[0].resident_bytes >= 4096
        assert found.commands[child.pid]
        assert {os.getpid(), child.pid} <= set(found.info.mapped_by)
        if backend == "sysv":
            assert found.info.attach_count == 2
    finally:
        _release(child)
        seg.unlink()
        seg.close()


def test_recreated_name_does_not_inherit_old_mappers(seg_name):
    old = Segment.create(seg_name, size=4096)
    child = spawn_python(MAP_AND_WAIT, seg_name, "posix", stdin=subprocess.PIPE)
    try:
        wait_for_line(child, "ready", timeout=30)
        old.unlink()
        old.close()
        with Segment.create(seg_name, size=4096) as new:
            assert registry.find(seg_name).mapped_by == (os.getpid(),)
            assert child.pid not in [m.pid for m in _proc.posix_mappers(seg_name)]
            new.unlink()
    finally:
        _release(child)


def test_scan_indexes_sysv_attachments_by_shmid(seg_name):
    with Segment.create(seg_name, size=4096, backend="sysv") as seg:
        mine = _proc.scan_mappings([os.getpid()]).sysv_mappers(seg.shmid)
        assert [(m.pid, m.start) for m in mine] == [(os.getpid(), seg.address)]
        seg.unlink()


def test_sysv_rows_parse_octal_perms(seg_name):
    with Segment.create(seg_name, size=100, backend="sysv", mode=0o640) as seg:
        row = next(r for r in _proc.sysv_segments() if r["shmid"] == seg.shmid)
        assert row["perms"] == 0o640
        seg.unlink()
        row = next(r for r in _proc.sysv_segments() if r["shmid"] == seg.shmid)
        assert row["perms"] & 0o777 == 0o640 and row["perms"] & 0o1000  # SHM_DEST


def test_removed_but_attached_sysv_segment_is_pending_removal(seg_name):
    with Segment.create(seg_name, size=100, backend="sysv") as seg:
        seg.unlink()
        info = registry.find(shmid=seg.shmid)
        assert info.pending_removal is True
        assert info.name is None and info.label == f"shmid {seg.shmid}"
        assert info.orphan is False


# -- find, inspect, remove ---------------------------------------------------------------------

def test_find_missing_raises_not_found(seg_name):
    with pytest.raises(SegmentNotFoundError, match=seg_name):
        registry.find(seg_name)
    with pytest.raises(FileNotFoundError):
        registry.find(key=registry.parse_key("0x7ffffff1"))


def test_find_asks_for_backend_when_name_exists_on_both(seg_name):
    a = Segment.create(seg_name, 64)
    b = Segment.create(seg_name, 64, backend="sysv")
    try:
        with pytest.raises(ValueError, match="both backends"):
            registry.find(seg_name)
        assert registry.find(seg_name, backend="sysv").shmid == b.shmid
        assert registry.find(key=b.key).shmid == b.shmid
        assert registry.find(seg_name, backend="posix").backend == "posix"
    finally:
        for seg in (a, b):
            seg.unlink()
            seg.close()


def test_remove_by_name_removes_foreign_segment(backend, seg_name):
    with Segment.create(seg_name, size=64, backend=backend):
        info = registry.remove(seg_name, backend=backend)
        assert info.kind == registry.KIND_FOREIGN
        assert not segment.exists(seg_name, backend=backend)


def test_parse_key_accepts_ipcs_hex_and_decimal():
    assert registry.parse_key("0xf3fd0baa") == -201520214
    assert registry.parse_key("-201520214") == -201520214
    assert registry.parse_key("17") == 17
    assert registry.format_key(-201520214) == "0xf3fd0baa"
    with pytest.raises(ValueError):
        registry.parse_key("0x1ffffffff")
    with pytest.raises(ValueError):
        registry.parse_key("key")


def test_missing_state_module_gives_no_state_section(monkeypatch, seg_name):
    monkeypatch.setitem(registry.STATE_PROVIDERS, Kind.DICT,
                        ("shmkit._no_such_module", "describe_state"))
    seg, _ = layout.create_typed(seg_name, Kind.DICT, 64)
    try:
        found = registry.inspect(seg_name)
        assert (found.state, found.state_error) == (None, None)
        monkeypatch.setitem(registry.STATE_PROVIDERS, Kind.DICT, ("shmkit.layout", "no_such"))
        assert registry.inspect(seg_name).state is None
    finally:
        seg.unlink()
        seg.close()


def test_state_function_is_called_and_its_failure_reported(monkeypatch, seg_name):
    monkeypatch.setitem(registry.STATE_PROVIDERS, Kind.DICT, (__name__, "_fake_describe_state"))
    seg, _ = layout.create_typed(seg_name, Kind.DICT, 64, backend="sysv")
    try:
        seg.buf[layout.PAYLOAD_OFFSET] = 42
        found = registry.inspect(seg_name, backend="sysv")
        assert found.state == {"payload_size": 64, "first_byte": 42}
        assert found.as_dict()["live_state"] == found.state
        monkeypatch.setitem(registry.STATE_PROVIDERS, Kind.DICT,
                            (__name__, "_broken_describe_state"))
        found = registry.inspect(seg_name, backend="sysv")
        assert found.state is None and "the state function broke" in found.state_error
    finally:
        seg.unlink()
        seg.close()


# -- orphans and gc ----------------------------------------------------------------------------

def test_killed_creator_leaves_orphan_that_gc_removes(backend, seg_name):
    _killed_creator(seg_name, backend)
    [orphan] = registry.orphans(names=[seg_name])
    assert orphan.backend == backend and orphan.kind == "SharedDict"
    assert orphan.creator_alive is False and orphan.mapped_by == ()

    [planned] = registry.collect_garbage(dry_run=True, names=[seg_name])
    assert planned.result == "would_remove"
    assert segment.exists(seg_name, backend=backend)

    [done] = registry.collect_garbage(names=[seg_name])
    assert done.result == "removed"
    assert not segment.exists(seg_name, backend=backend)


def test_gc_keeps_segment_mapped_by_a_live_process(backend, seg_name):
    _killed_creator(seg_name, backend)
    child = spawn_python(MAP_AND_WAIT, seg_name, backend, stdin=subprocess.PIPE)
    try:
        wait_for_line(child, "ready", timeout=30)
        info = registry.find(seg_name, backend=backend)
        assert info.creator_alive is False and info.mapped_by == (child.pid,)
        assert info.orphan is False
        assert registry.collect_garbage(names=[seg_name]) == []
        assert segment.exists(seg_name, backend=backend)
    finally:
        _release(child)
    assert [r.result for r in registry.collect_garbage(names=[seg_name])] == ["removed"]


def test_gc_keeps_segment_of_live_creator(seg_name):
    seg, _ = layout.create_typed(seg_name, Kind.DICT, 64)
    seg.close()  # nobody maps it, but its creator (this process) lives
    assert registry.collect_garbage(names=[seg_name]) == []
    assert segment.exists(seg_name)


def test_gc_never_removes_foreign_or_corrupt_segments(names):
    from multiprocessing import resource_tracker, shared_memory

    foreign, plain, corrupt = names("gcf"), names("gcf"), names("gcf")
    prefix = foreign.rsplit("-", 1)[0]
    shm = shared_memory.SharedMemory(foreign, create=True, size=4096)
    resource_tracker.unregister(shm._name, "shared_memory")  # we clean up, not the tracker
    shm.close()
    Segment.create(plain, 4096).close()
    with Segment.create(corrupt, 4096) as seg:
        seg.buf[:8] = layout.MAGIC
    assert registry.collect_garbage(prefix=prefix) == []
    assert all(segment.exists(n) for n in (foreign, plain, corrupt))
