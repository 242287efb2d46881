from __future__ import annotations

import os
import pickle

import pytest

from vhdx.fleet.probe import VANISHED, ProbeOptions, kind_of, probe_batch, probe_disk
from vhdx.structures.bat import Bat
from vhdx_fixtures.fleet import make_dirty, write_disk


@pytest.fixture
def pair(tmp_path):
    parent, child = str(tmp_path / "base.vhdx"), str(tmp_path / "cp.avhdx")
    guid = write_disk(parent)
    write_disk(child, parent)
    return parent, child, guid


def test_probe_reads_type_sizes_guids_and_locator(pair):
    parent, child, guid = pair
    probe = probe_disk(child)
    assert probe.ok and probe.disk_type == "differencing" and probe.virtual_size == 4 << 20
    assert probe.parent_linkages == (str(guid),)
    assert dict(probe.parent_hints)["relative_path"] == ".\\base.vhdx"
    assert probe.file_size == os.path.getsize(child) and probe.creator == "estate"
    assert probe_disk(parent).data_write_guid == str(guid)


def test_probe_never_loads_the_bat(pair, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("BAT loaded")

    monkeypatch.setattr(Bat, "load", refuse)
    assert probe_disk(pair[1]).ok


def test_check_option_runs_the_full_check(pair):
    probe = probe_disk(pair[1], ProbeOptions(check=True))
    assert probe.check is not None and probe.check.exit_code == 0


def test_hash_option_hashes_the_file_bytes(pair):
    import hashlib

    with open(pair[0], "rb") as f:
        expected = hashlib.sha256(f.read()).hexdigest()
    assert probe_disk(pair[0], ProbeOptions(hash=True)).sha256 == expected


def test_dirty_log_is_reported(pair):
    make_dirty(pair[1])
    probe = probe_disk(pair[1])
    assert probe.ok and probe.dirty_log


def test_non_vhdx_file_is_an_error_result_not_an_exception(tmp_path):
    path = tmp_path / "fake.vhdx"
    path.write_bytes(b"MZ" + bytes(100))
    probe = probe_disk(str(path))
    assert not probe.ok and "File Type Identifier" in probe.error and not probe.vanished


def test_vanished_file_is_reported_as_such(tmp_path):
    probe = probe_disk(str(tmp_path / "gone.avhdx"))
    assert probe.vanished and probe.error == VANISHED


def test_probe_pickles_small(pair):
    assert len(pickle.dumps(probe_disk(pair[1]))) < 1024


def test_batch_keeps_going_after_a_bad_file(pair, tmp_path):
    bad = tmp_path / "bad.vhdx"
    bad.write_bytes(b"")
    result = probe_batch([str(bad), pair[0]], [])
    assert [p.ok for p in result.disks] == [False, True]


@pytest.mark.parametrize(("name", "kind"), [("a.VHDX", "disk"), ("b.avhdx", "disk"), ("c.vmcx", "vm_config"),
                                            ("d.XML", "vm_config"), ("e.vmrs", "vm_config"),
                                            ("f.vhdx.merge-journal", "journal"), ("g.vhd", "other")])
def test_files_are_sorted_by_name(name, kind):
    assert kind_of(name) == kind
