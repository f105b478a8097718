"""The benchmark library behind `shmkit bench`: small runs that check the machinery, not speed."""

from __future__ import annotations

import pytest

from shmkit import bench
from shmkit.bench import MP_PIPE, SHMKIT, Scenario


def test_throughput_row_checks_every_message_and_compares_with_peers():
    rows = bench.run([Scenario("64 B", 64, "single", 3000, (SHMKIT, MP_PIPE)),
                      Scenario("1 MiB copy", 1 << 20, "single", 20, (SHMKIT,))], repetitions=1)
    by = {(r["scenario"], r["mechanism"]): r for r in rows}
    assert "error" not in by[("64 B", SHMKIT)] and by[("64 B", SHMKIT)]["msgs_per_s"] > 0
    assert "ratio" in by[("64 B", SHMKIT)]
    assert by[("1 MiB copy", SHMKIT)]["gb_per_s"] > 0


def test_batched_and_zero_copy_rows_run():
    rows = bench.run([Scenario("64 B batched", 64, "batch", 5120, (SHMKIT,)),
                      Scenario("1 MiB zero-copy", 1 << 20, "zerocopy", 40, (SHMKIT,))],
                     repetitions=1)
    assert all("error" not in r and r["msgs_per_s"] > 0 for r in rows), rows


def test_pingpong_row_has_percentiles():
    [row, _] = bench.run([Scenario("ping-pong 64 B", 64, "pingpong", 300, (SHMKIT, MP_PIPE))],
                         repetitions=1)
    assert 0 < row["p50_us"] <= row["p99_us"]
    assert row["ratio"] > 0


def test_format_table_shows_skipped_and_failed_peers():
    rows = [
        {"scenario": "64 B", "mechanism": SHMKIT, "size": 64, "msgs_per_s": 5e6,
         "gb_per_s": 0.3, "ratio": 4.2, "runs": 3},
        {"scenario": "64 B", "mechanism": "iceoryx2", "size": 64,
         "skipped": "iceoryx2 is not installed (pip install shmkit[bench])"},
        {"scenario": "64 B", "mechanism": "pyzmq PUSH/PULL ipc", "size": 64,
         "error": "RuntimeError: 3 messages arrived corrupted or out of order"},
    ]
    table = bench.format_table(rows)
    assert "5,000,000" in table and "4.2x" in table
    assert "not installed" in table and "failed: RuntimeError" in table


def test_quick_scenarios_cover_the_issue():
    names = [s.name for s in bench.scenarios(quick=True)]
    assert names == ["64 B", "64 B batched", "4 KiB", "1 MiB copy", "1 MiB zero-copy",
                     "ping-pong 64 B"]


def test_plot_needs_matplotlib_or_says_so(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"scenario": "64 B", "mechanism": SHMKIT, "size": 64, "msgs_per_s": 5e6},
            {"scenario": "ping-pong 64 B", "mechanism": SHMKIT, "size": 64, "p50_us": 1.0,
             "p99_us": 7.0}]
    bench.plot_rows(rows, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").stat().st_size > 1000
