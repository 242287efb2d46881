"""The merge's own temporaries (journal and plan) are never opened through a planted symlink."""

from __future__ import annotations

import pytest

import vhdx
from tests.adversarial.test_merge_races import chain
from tests.support.merge_chains import read_view
from vhdx.ops.merge import journal as merge_journal


@pytest.mark.parametrize("suffix", [merge_journal.PLAN_SUFFIX, merge_journal.JOURNAL_SUFFIX])
def test_a_symlink_planted_at_a_merge_temporary_does_not_redirect_the_write(tmp_path, suffix):
    paths, model = chain(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (tmp_path / (paths[2].name + suffix + ".tmp")).symlink_to(victim)
    vhdx.merge_chain(paths[0], into=paths[2])
    assert victim.read_bytes() == b"precious"
    assert read_view(paths[2]) == bytes(model) and not list(tmp_path.glob("*.tmp"))
