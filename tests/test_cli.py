"""The `shmkit` command, run as a real separate process: ls, inspect, rm, gc, demo, bench.

gc is always restricted (--name/--prefix) to segments the test made: other test runs on this
machine create segments at the same time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from procs import kill, spawn_python, stop, wait_for_line

from shmkit import Segment, layout, registry, segment
from shmkit.layout import Kind

INFO_KEYS = {"name", "backend", "key", "shmid", "kind", "state", "size", "mode", "uid", "gid",
             "owner", "creator_pid", "creator_alive", "mapped_by", "attach_count", "created",
             "age_seconds", "pending_removal", "orphan", "detail"}
INSPECT_KEYS = INFO_KEYS | {"schema", "header", "mappings", "live_state", "live_state_error"}
MAPPING_KEYS = {"pid", "command", "start", "end", "size", "perms", "resident_bytes"}
HEADER_KEYS = {"layout_version", "kind", "state", "segment_size", "payload_offset",
               "payload_size", "creator_pid", "creator_start", "created_ns", "params"}
GC_KEYS = INFO_KEYS | {"result", "result_detail"}

CREATE_TYPED_AND_WAIT = (
    "import sys, time\n"
    "from shmkit import layout\n"
    "layout.create_typed(sys.argv[1], layout.Kind.DICT, 256, backend=sys.argv[2])\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n")

MAP_AND_WAIT = (
    "import sys, shmkit\n"
    "seg = shmkit.Segment.open(sys.argv[1], backend=sys.argv[2])\n"
    "seg.buf[-8:] = seg.address.to_bytes(8, 'little')\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "seg.close()\n")


def shmkit(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `shmkit ARGS` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "shmkit.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def shmkit_json(*args: str):
    done = shmkit(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("shmkit: error: ")
    for needle in needles:
        assert needle in lines[0]


def _killed_creator(name: str, backend: str) -> None:
    child = spawn_python(CREATE_TYPED_AND_WAIT, name, backend)
    try:
        wait_for_line(child, "ready", timeout=30)
    finally:
        kill(child)


def _release(child) -> None:
    child.stdin.write("\n")
    child.stdin.flush()
    stop(child)


# -- ls ----------------------------------------------------------------------------------------

def test_ls_json_schema_is_stable(names):
    plain, typed = names("ls"), names("ls")
    a = Segment.create(plain, 1000, mode=0o644)
    b, header = layout.create_typed(typed, Kind.DICT, 500, backend="sysv")
    try:
        doc = shmkit_json("ls", "--name", plain, "--name", typed)
        assert set(doc) == {"schema", "segments"} and doc["schema"] == 1
        rows = {row["backend"]: row for row in doc["segments"]}
        assert set(rows) == {"posix", "sysv"}
        for row in rows.values():
            assert set(row) == INFO_KEYS
        assert rows["posix"] | {"created": None, "age_seconds": None} == {
            "name": plain, "backend": "posix", "key": None, "shmid": None, "kind": "foreign",
            "state": None, "size": 1000, "mode": "0644", "uid": os.geteuid(),
            "gid": os.getegid(), "owner": registry.user_name(os.geteuid()), "creator_pid": None,
            "creator_alive": None, "mapped_by": [os.getpid()], "attach_count": None,
            "created": None, "age_seconds": None, "pending_removal": False, "orphan": False,
            "detail": None}
        sysv = rows["sysv"]
        assert (sysv["name"], sysv["key"], sysv["shmid"]) == (typed, b.key, b.shmid)
        assert (sysv["kind"], sysv["state"], sysv["mode"]) == ("SharedDict", "ready", "0600")
        assert (sysv["creator_pid"], sysv["creator_alive"]) == (os.getpid(), True)
        assert sysv["attach_count"] == 1 and sysv["mapped_by"] == [os.getpid()]
        assert sysv["created"] == header.created_ns / 1e9
    finally:
        for seg in (a, b):
            seg.unlink()
            seg.close()


def test_ls_table_shows_segment_kind_and_mapping_pid(seg_name):
    seg, _ = layout.create_typed(seg_name, Kind.DICT, 64)
    try:
        done = shmkit("ls", "--prefix", seg_name)
        assert done.returncode == 0, done.stderr
        rows = [line for line in done.stdout.splitlines() if seg_name in line]
        assert len(rows) == 1, done.stdout
        row = rows[0]
        assert "posix" in row and "SharedDict" in row and str(os.getpid()) in row
        assert "1 segment" in done.stdout
    finally:
        seg.unlink()
        seg.close()


def test_ls_lists_whole_machine_without_failing(seg_name):
    with Segment.create(seg_name, 64, backend="sysv") as seg:
        doc = shmkit_json("ls")
        mine = [r for r in doc["segments"] if r["shmid"] == seg.shmid]
        assert len(mine) == 1 and mine[0]["name"] is None  # System V stores no name
        assert all(set(r) == INFO_KEYS for r in doc["segments"])
        seg.unlink()


def test_ls_as_another_user_reports_unreadable_segments(names, nobody):
    # The child imports everything as root, then drops to `nobody` (who may not be allowed to
    # read the interpreter's own directory) and runs the command in-process.
    posix_name, sysv_name = names("ro"), names("ro")
    a = Segment.create(posix_name, 4096, mode=0o600)
    b = Segment.create(sysv_name, 4096, mode=0o600, backend="sysv")
    try:
        done = subprocess.run(
            [sys.executable, "-c",
             "import os, sys\n"
             "from shmkit import cli\n"
             "cli.build_parser()\n"  # imports everything argparse needs, while still root
             "os.setgroups([]); os.setgid(os.getgid()); os.setuid(int(sys.argv[1]))\n"
             "sys.exit(cli.main(sys.argv[2:]))\n",
             str(nobody), "ls", "--json", "--name", posix_name, "--name", sysv_name],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        rows = {r["backend"]: r for r in json.loads(done.stdout)["segments"]}
        for row in rows.values():
            assert row["kind"] == "unreadable" and "ermission" in row["detail"]
            assert row["orphan"] is False
        assert rows["sysv"]["attach_count"] == 1
    finally:
        for seg in (a, b):
            seg.unlink()
            seg.close()


# -- inspect -----------------------------------------------------------------------------------

def test_inspect_shows_child_pid_and_its_address_range(backend, seg_name):
    seg, _ = layout.create_typed(seg_name, Kind.DICT, 2 * 4096, backend=backend)
    child = spawn_python(MAP_AND_WAIT, seg_name, backend, stdin=subprocess.PIPE)
    try:
        wait_for_line(child, "ready", timeout=30)
        their_address = int.from_bytes(seg.buf[-8:], "little")
        doc = shmkit_json("inspect", seg_name, "--backend", backend)
        assert set(doc) == INSPECT_KEYS
        assert set(doc["header"]) == HEADER_KEYS
        assert doc["header"]["kind"] == "SharedDict" and doc["kind"] == "SharedDict"
        for mapping in doc["mappings"]:
            assert set(mapping) == MAPPING_KEYS
        theirs = [m for m in doc["mappings"] if m["pid"] == child.pid]
        ours = [m for m in doc["mappings"] if m["pid"] == os.getpid()]
        assert len(theirs) == 1 and len(ours) == 1
        assert theirs[0]["start"] <= their_address < theirs[0]["end"]
        assert ours[0]["start"] <= seg.address < ours[0]["end"]
        assert theirs[0]["perms"] == "rw-s" and theirs[0]["resident_bytes"] >= 4096

        text = shmkit("inspect", seg_name, "--backend", backend)
        assert text.returncode == 0, text.stderr
        assert str(child.pid) in text.stdout
        assert f"0x{theirs[0]['start']:x}-0x{theirs[0]['end']:x}" in text.stdout
        assert "SharedDict" in text.stdout
    finally:
        _release(child)
        seg.unlink()
        seg.close()


def test_inspect_by_sysv_key(seg_name):
    with Segment.create(seg_name, 64, backend="sysv") as seg:
        doc = shmkit_json("inspect", "--key", registry.format_key(seg.key))
        assert doc["shmid"] == seg.shmid and doc["kind"] == "foreign" and doc["header"] is None
        seg.unlink()


def test_inspect_missing_name_exits_1_with_one_line(seg_name):
    assert_one_line_error(shmkit("inspect", seg_name), seg_name, "no segment")
    assert_one_line_error(shmkit("inspect", seg_name, "--json"), seg_name)


def test_inspect_bad_name_exits_1_with_one_line():
    assert_one_line_error(shmkit("inspect", "a/b"), "'/'")


def test_inspect_name_on_both_backends_asks_for_backend(seg_name):
    a = Segment.create(seg_name, 64)
    b = Segment.create(seg_name, 64, backend="sysv")
    try:
        assert_one_line_error(shmkit("inspect", seg_name), "--backend")
    finally:
        for seg in (a, b):
            seg.unlink()
            seg.close()


# -- rm ----------------------------------------------------------------------------------------

def test_rm_removes_named_segments_on_both_backends(names):
    posix_name, sysv_name = names("rm"), names("rm")
    Segment.create(posix_name, 64).close()
    Segment.create(sysv_name, 64, backend="sysv").close()
    done = shmkit("rm", posix_name, sysv_name)
    assert done.returncode == 0, done.stderr
    assert f"removed {posix_name}" in done.stdout and f"removed {sysv_name}" in done.stdout
    assert not segment.exists(posix_name)
    assert not segment.exists(sysv_name, backend="sysv")


def test_rm_by_key_and_shmid(names):
    a, b = names("rmk"), names("rmk")
    sa = Segment.create(a, 64, backend="sysv")
    sb = Segment.create(b, 64, backend="sysv")
    sa.close()
    sb.close()
    done = shmkit("rm", "--key", registry.format_key(sa.key), "--shmid", str(sb.shmid))
    assert done.returncode == 0, done.stderr
    assert not segment.exists(a, backend="sysv") and not segment.exists(b, backend="sysv")


def test_rm_missing_name_reports_it_and_still_removes_the_others(names):
    present, missing = names("rmm"), names("rmm")
    Segment.create(present, 64).close()
    done = shmkit("rm", missing, present, "--backend", "posix")
    assert_one_line_error(done, missing)
    assert f"removed {present}" in done.stdout
    assert not segment.exists(present)


def test_rm_mapped_segment_keeps_mappers_memory(seg_name):
    with Segment.create(seg_name, 64) as seg:
        seg.buf[0] = 9
        done = shmkit("rm", seg_name)
        assert done.returncode == 0 and "still mapped" in done.stdout
        assert not segment.exists(seg_name)
        assert seg.buf[0] == 9


# -- gc ----------------------------------------------------------------------------------------

def test_gc_dry_run_lists_killed_creators_segment_and_gc_removes_it(backend, seg_name):
    _killed_creator(seg_name, backend)

    doc = shmkit_json("gc", "--dry-run", "--name", seg_name)
    assert set(doc) == {"schema", "dry_run", "orphans"} and doc["dry_run"] is True
    [row] = doc["orphans"]
    assert set(row) == GC_KEYS
    assert (row["name"], row["backend"], row["result"]) == (seg_name, backend, "would_remove")
    assert row["creator_alive"] is False and row["orphan"] is True
    assert segment.exists(seg_name, backend=backend)

    text = shmkit("gc", "--dry-run", "--name", seg_name)
    assert text.returncode == 0 and seg_name in text.stdout and "would remove" in text.stdout

    done = shmkit("gc", "--name", seg_name)
    assert done.returncode == 0, done.stderr
    assert seg_name in done.stdout and "removed 1 orphan" in done.stdout
    assert not segment.exists(seg_name, backend=backend)


def test_gc_keeps_orphan_candidate_mapped_by_live_child(seg_name):
    _killed_creator(seg_name, "posix")
    child = spawn_python(MAP_AND_WAIT, seg_name, "posix", stdin=subprocess.PIPE)
    try:
        wait_for_line(child, "ready", timeout=30)
        assert shmkit_json("gc", "--name", seg_name)["orphans"] == []
        assert segment.exists(seg_name)
    finally:
        _release(child)


def test_gc_never_removes_foreign_segments(names):
    from multiprocessing import resource_tracker, shared_memory

    foreign, leftover, corrupt, orphan = names("gcx"), names("gcx"), names("gcx"), names("gcx")
    prefix = foreign.rsplit("-", 1)[0]
    shm = shared_memory.SharedMemory(foreign, create=True, size=4096)
    resource_tracker.unregister(shm._name, "shared_memory")  # we clean up, not the tracker
    shm.close()
    # A plain segment from a process that was killed: no header, so gc cannot know its owner.
    child = spawn_python("import sys, time, shmkit\n"
                         "shmkit.Segment.create(sys.argv[1], 4096)\n"
                         "print('ready', flush=True)\n"
                         "time.sleep(120)\n", leftover)
    try:
        wait_for_line(child, "ready", timeout=30)
    finally:
        kill(child)
    with Segment.create(corrupt, 4096) as seg:
        seg.buf[:8] = layout.MAGIC
    _killed_creator(orphan, "posix")

    doc = shmkit_json("gc", "--prefix", prefix)
    assert [(r["name"], r["result"]) for r in doc["orphans"]] == [(orphan, "removed")]
    assert all(segment.exists(n) for n in (foreign, leftover, corrupt))
    assert not segment.exists(orphan)

    done = shmkit("rm", foreign, leftover, corrupt)  # by name, anything goes
    assert done.returncode == 0, done.stderr
    assert not any(segment.exists(n) for n in (foreign, leftover, corrupt))


def test_gc_without_orphans_says_so(seg_name):
    done = shmkit("gc", "--name", seg_name)
    assert done.returncode == 0 and "no orphaned shmkit segments" in done.stdout


# -- usage, demo, bench ------------------------------------------------------------------------

@pytest.mark.parametrize("args", [(), ("ls", "--bogus"), ("rm",), ("inspect",),
                                  ("inspect", "x", "--backend", "nfs"), ("rm", "--key", "zz"),
                                  ("demo", "no-such-demo")])
def test_usage_errors_exit_2(args):
    done = shmkit(*args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "usage:" in done.stderr and "Traceback" not in done.stderr


def test_console_script_runs():
    script = os.path.join(os.path.dirname(sys.executable), "shmkit")
    if not os.path.exists(script):
        pytest.skip("the console script is not installed next to this interpreter")
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("shmkit ")


def test_segment_demo_shows_both_processes_and_removes_its_segment():
    done = shmkit("demo", "segment", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    [name] = set(re.findall(r"shmkit-demo-\d+-[0-9a-f]+", done.stdout))
    pids = re.findall(r"\| pid (\d+) ", done.stdout)
    assert len(pids) == 2
    assert "$ shmkit ls" in done.stdout and "$ shmkit inspect" in done.stdout
    assert "hello back from the reader" in done.stdout
    for pid in pids:  # both processes appear in the ls/inspect output
        assert done.stdout.count(pid) >= 3
    assert not segment.exists(name)


def test_default_demo_runs_to_completion_and_leaves_nothing():
    before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen([sys.executable, "-m", "shmkit.cli", "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, out + err
    left = {n for n in set(os.listdir("/dev/shm")) - before if str(proc.pid) in n}
    assert not left
