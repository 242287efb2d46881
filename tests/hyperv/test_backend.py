from __future__ import annotations

import pytest

from vhdx.hyperv import HyperV, scripts
from vhdx.hyperv.errors import (
    CheckpointNotFoundError,
    HyperVAccessDeniedError,
    HyperVJobFailedError,
    HyperVTimeoutError,
    HyperVUnavailableError,
    VmNotFoundError,
)
from vhdx.ops.inspect import DiskInfo

APP = "C:\\ProgramData\\Microsoft\\Windows\\Virtual Hard Disks\\"
APP_LEAF = APP + "app01_F9E8D7C6-B5A4-4392-8170-6F5E4D3C2B1A.avhdx"
APP_MID = APP + "app01_0A1B2C3D-4E5F-4061-8293-A4B5C6D7E8F9.avhdx"


def _sent(hv: HyperV):
    return [(s.script, s.parameters) for s in hv.transport.sent]


def test_disk_info_maps_get_vhd_onto_diskinfo(backend):
    hv = backend("disks")
    info = hv.disk_info("D:\\images\\fixed.vhdx")
    assert _sent(hv) == [("Get-VHD", {"Path": "D:\\images\\fixed.vhdx"})]
    assert hv.transport.sent[0].text == scripts.GET_VHD.text
    assert info.to_disk_info() == DiskInfo(
        path="D:\\images\\fixed.vhdx", format="vhdx", disk_type="fixed", virtual_size=10485760, file_size=14680064,
        block_size=0, logical_sector_size=512, physical_sector_size=4096,
        disk_id="4a49d245-db0a-4634-9818-9f93db5ba6c1", parent_path=None)
    assert (info.minimum_size, info.alignment, info.attached) == (10485760, 1, False)


def test_disk_info_reads_enums_given_as_integers(backend):
    info = backend("disks").disk_info(
        "D:\\Hyper-V\\web01\\Virtual Hard Disks\\web01_6B1F0C2E-51D4-4E0B-9C1A-2B7D0F3A9E41.avhdx")
    assert (info.format, info.disk_type) == ("vhdx", "differencing")
    assert info.parent_path == "D:\\Hyper-V\\web01\\Virtual Hard Disks\\web01.vhdx"


def test_test_disk_passes(backend):
    path = "D:\\Hyper-V\\web01\\Virtual Hard Disks\\web01_D41D8CD9-8F00-4B20-9E98-00998ECF8427.avhdx"
    result = backend("disks").test_disk(path)
    assert result.passed and result.problems == ()


def test_test_disk_reports_broken_chain(backend):
    path = "D:\\Hyper-V\\web01\\Virtual Hard Disks\\web01_5E6F7081-92A3-4B4C-8D5E-6F708192A3B4.avhdx"
    result = backend("disks").test_disk(path)
    assert not result.passed
    assert "cannot locate the parent" in result.problems[0].message
    assert result.problems[0].code is None  # the generic .NET HRESULT is not Hyper-V's code


def test_merge_offline_sends_merge_vhd(backend):
    hv = backend("disks")
    result = hv.merge_offline("E:\\VMs\\db01\\db01_66666666-7777-4888-9999-AAAAAAAAAAAA.avhdx",
                              "E:\\VMs\\db01\\db01.vhdx")
    assert _sent(hv) == [("Merge-VHD", {"Path": "E:\\VMs\\db01\\db01_66666666-7777-4888-9999-AAAAAAAAAAAA.avhdx",
                                        "DestinationPath": "E:\\VMs\\db01\\db01.vhdx"})]
    assert hv.transport.sent[0].text == scripts.MERGE_VHD.text
    assert result.source_still_exists and result.destination.disk_type == "dynamic"


def test_merge_offline_failure_carries_hyperv_text_and_code(backend):
    leaf = "D:\\Hyper-V\\web01\\Virtual Hard Disks\\web01_D41D8CD9-8F00-4B20-9E98-00998ECF8427.avhdx"
    with pytest.raises(HyperVJobFailedError) as info:
        backend("errors").merge_offline(leaf)
    assert info.value.code == 0x80070020
    assert "being used by another process" in str(info.value)
    assert str(info.value).startswith("Merge-VHD: ")


def test_module_missing_is_unavailable(backend):
    with pytest.raises(HyperVUnavailableError, match="Hyper-V PowerShell module is not installed"):
        backend("errors").list_vms()


def test_access_denied_is_mapped(backend):
    with pytest.raises(HyperVAccessDeniedError, match="required permission") as info:
        backend("errors").disk_info("D:\\secret\\x.vhdx")
    assert info.value.category == "PermissionDenied"


def test_vm_not_found_is_mapped(backend):
    with pytest.raises(VmNotFoundError, match="ghost"):
        backend("errors").checkpoints("ghost")


def test_checkpoint_not_found_from_host_is_mapped(backend):
    with pytest.raises(CheckpointNotFoundError, match="nope"):
        backend("errors").run(HyperV.plan_remove_checkpoint("web01", "nope"))


def test_transport_timeout_surfaces(backend):
    with pytest.raises(HyperVTimeoutError, match="Get-VHD: no answer"):
        backend("errors").disk_info("D:\\slow.vhdx")


def test_unrecorded_request_fails_loudly(backend):
    with pytest.raises(Exception, match="no recording for Get-VHD"):
        backend("disks").disk_info("D:\\never-recorded.vhdx")


def test_list_vms_parses_drives(backend):
    vms = backend("vms").list_vms()
    assert [(v.name, v.state, v.is_off) for v in vms] == [("web01", "Running", False), ("db01", "Off", True)]
    assert vms[0].disks[0].slot == "SCSI 0:0"


def test_remove_checkpoint_sends_exact_calls_and_predicts_merged_file(backend):
    hv = backend("app01-merge")
    job = hv.remove_checkpoint("app01", "nightly")
    assert _sent(hv) == [("Get-VMSnapshot", {"VMName": "app01"}), ("Get-VMHardDiskDrive", {"VMName": "app01"}),
                         ("Remove-VMSnapshot", {"VMName": "app01", "Name": "nightly"})]
    assert hv.transport.sent[2].text == scripts.REMOVE_CHECKPOINT.text
    assert job.removed == ("nightly",)
    assert job.expect_gone == (APP_LEAF,)
    assert job.jobs_before == ("8A1C2E3F-0000-4000-8000-00000000A001",)


def test_remove_checkpoint_unknown_name_sends_no_removal(backend):
    hv = backend("app01-merge")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint is named nightly2"):
        hv.remove_checkpoint("app01", "nightly2")
    assert "Remove-VMSnapshot" not in [s for s, _ in _sent(hv)]


def test_remove_checkpoint_subtree_passes_switch(backend):
    hv = backend("app01-merge")
    hv.transport.add("Remove-VMSnapshot", {"VMName": "app01", "Name": "initial", "IncludeAllChildSnapshots": True},
                     {"ok": True, "data": {"Id": "x", "Name": "initial"}})
    job = hv.remove_checkpoint("app01", "initial", subtree=True)
    assert job.removed == ("initial", "nightly")
    assert set(job.expect_gone) == {APP_LEAF, APP_MID}


def test_wait_for_merge_follows_jobs_until_files_gone(backend, clock):
    hv = backend("app01-merge")
    job = hv.remove_checkpoint("app01", "nightly")
    seen = []
    outcome = hv.wait_for_merge("app01", 600, job=job, progress=seen.append)
    assert [(p.percent, p.remaining) for p in seen] == [(40, (APP_LEAF,)), (85, (APP_LEAF,)), (None, ())]
    assert APP_LEAF in outcome.merged and APP_MID not in outcome.merged
    assert [layer.path for layer in outcome.chains[0].layers][0] == APP_MID
    assert clock.sleeps == [0.5, 1.0]


def test_wait_for_merge_raises_job_failure_with_code(backend):
    hv = backend("app01-merge-fails")
    job = hv.remove_checkpoint("app01", "nightly")
    with pytest.raises(HyperVJobFailedError, match="being used by another process") as info:
        hv.wait_for_merge("app01", job=job)
    assert info.value.code == 32768
    assert "exception" in str(info.value)


def test_wait_for_merge_times_out_naming_files(backend, clock):
    hv = backend("app01-merge-stuck")
    job = hv.remove_checkpoint("app01", "nightly")
    with pytest.raises(HyperVTimeoutError, match=r"not finished after 30 s at 40 %; still in use: .*app01_F9E8"):
        hv.wait_for_merge("app01", 30, job=job, max_interval_s=8)
    assert clock.now <= 30
    assert max(clock.sleeps) == 8
