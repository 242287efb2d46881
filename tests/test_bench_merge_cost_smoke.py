"""The merge cost bench cases (benches/cases_merge.py) run end to end on tiny disks and verify their result."""

from __future__ import annotations

from dataclasses import replace

from benches import cases_merge
from benches.cases import make_limit_source
from benches.sizes import TINY, MiB


def test_merge_cost_cases_time_a_verified_merge_against_the_raw_copy(tmp_path):
    limit = tmp_path / "limit.bin"
    make_limit_source(str(limit), 16 * MiB)
    profile = replace(TINY, repeats=1)
    records = [*cases_merge.fixed_cost(str(tmp_path), profile, str(limit)),
               cases_merge.big_merge(str(tmp_path), profile, str(limit))]
    assert [r["workload"] for r in records] == ["child-512 KiB", "child-8 MiB", "big-d1"]
    for r in records:
        ours, raw = r["outcomes"]
        assert ours.status == "ok" and "verified" in ours.note and ours.times, ours.note
        assert raw.status == "ok" and raw.times


def test_big_merge_row_takes_enough_runs_for_a_stable_median_whatever_the_profile(tmp_path):
    limit = tmp_path / "limit.bin"
    make_limit_source(str(limit), 16 * MiB)
    row = cases_merge.big_merge(str(tmp_path), replace(TINY, repeats=3), str(limit))
    ours, raw = row["outcomes"]
    assert len(ours.times) == len(raw.times) > 3  # more than the profile asks for
