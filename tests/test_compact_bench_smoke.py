"""The compaction benchmark runs end to end on a small disk and reports what it measured."""

from __future__ import annotations

from benches.compact_bench import run

MiB = 1 << 20


def test_compact_bench_releases_the_zero_half_and_reports_both_timings(tmp_path, monkeypatch):
    monkeypatch.setattr("benches.compact_bench.drop_caches", lambda: False)
    result = run(str(tmp_path), 128 * MiB)
    assert result["zero_blocks_released"] == 2 and result["kept_bytes"] == 64 * MiB
    assert result["file_after"] < result["file_before"] - 60 * MiB
    assert result["compact_seconds"] > 0 and result["copy_file_range_seconds"] > 0
    assert list(tmp_path.iterdir()) == []  # the work folder is removed
