from __future__ import annotations

import base64
import json
import subprocess
from contextlib import suppress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhdx.hyperv import FakeTransport, HyperV, scripts
from vhdx.hyperv.errors import HyperVError, HyperVTimeoutError, HyperVUnavailableError
from vhdx.hyperv.scripts import ScriptCall
from vhdx.hyperv.transport import LocalPowerShellTransport, PsrpTransport, parse_envelope

HOSTILE = [
    "it's",
    'say "hi"',
    "web01'; Remove-Item C:\\ -Recurse -Force; '",
    "$(Stop-Computer -Force)",
    "`$env:PATH`",
    "line1\nStop-Computer\nline3",
    "x\r\n}; Stop-Computer; {",
    "@{a=1}",
    "D:\\VMs\\ünïcödé ☃\\disk.vhdx",
    "[a]*?.avhdx",
]
OK = {"ok": True, "data": None, "error": None}


def test_scripts_start_with_param_block():
    for script in scripts.ALL_SCRIPTS:
        first = script.text.splitlines()[0]
        assert first == f"param({', '.join(script.parameters)})"


def test_scripts_qualify_hyperv_cmdlets():
    for script in scripts.ALL_SCRIPTS:
        for cmdlet in ("Get-VHD ", "Merge-VHD ", "Set-VHD ", "Test-VHD ", "Remove-VMSnapshot ", "Get-VMSnapshot "):
            for line in script.text.splitlines():
                if cmdlet in line:
                    assert f"Hyper-V\\{cmdlet}" in line, line


def test_scripts_mutating_flag_marks_write_side():
    assert {s.name for s in scripts.ALL_SCRIPTS if s.mutating} == {"Merge-VHD", "Set-VHD", "Remove-VMSnapshot"}


def test_script_call_rejects_unknown_parameter():
    with pytest.raises(ValueError, match="no parameter"):
        ScriptCall(scripts.GET_VHD, {"Path": "a", "Command": "Stop-Computer"})


def test_script_call_leaves_out_none_values():
    call = HyperV.plan_merge_offline("D:\\c.avhdx")
    assert dict(call.parameters) == {"Path": "D:\\c.avhdx"}


def test_script_call_render_shows_text_and_parameters():
    call = HyperV.plan_remove_checkpoint("web01", "nightly", subtree=True)
    out = call.render()
    assert scripts.REMOVE_CHECKPOINT.text.rstrip() in out
    params = json.loads(out.split("never pasted into the text):\n", 1)[1])
    assert params == {"VMName": "web01", "Name": "nightly", "IncludeAllChildSnapshots": True}


def _each_request(hv: HyperV, value: str) -> None:
    for action in (lambda: hv.disk_info(value), lambda: hv.test_disk(value), lambda: hv.checkpoints(value),
                   lambda: hv.vm_disks(value), lambda: hv.merge_offline(value, value),
                   lambda: hv.set_parent(value, value, leaf=value),
                   lambda: hv.run(HyperV.plan_remove_checkpoint(value, value, subtree=True))):
        # The fake answers with empty data; only what was sent matters here.
        with suppress(HyperVError, AttributeError, KeyError, TypeError):
            action()


@pytest.mark.parametrize("value", HOSTILE)
def test_injection_values_never_reach_script_text(value):
    fake = FakeTransport()
    for script in scripts.ALL_SCRIPTS:
        for key in ({"Path": value}, {"VMName": value}, {"Path": value, "DestinationPath": value},
                    {"Path": value, "ParentPath": value, "LeafPath": value},
                    {"VMName": value, "Name": value, "IncludeAllChildSnapshots": True}):
            fake.add(script.name, key, OK)
    _each_request(HyperV(fake), value)
    assert len(fake.sent) == 7
    texts = {s.name: s.text for s in scripts.ALL_SCRIPTS}
    for sent in fake.sent:
        assert sent.text == texts[sent.script]
        assert value not in sent.text
        assert all(v == value for k, v in sent.parameters.items() if k != "IncludeAllChildSnapshots")


@given(st.text(min_size=1, max_size=40))
def test_injection_any_text_travels_as_data(value):
    fake = FakeTransport()
    fake.add("Get-VHD", {"Path": value}, {"ok": False, "error": {"message": "x"}})
    with pytest.raises(HyperVError):
        HyperV(fake).disk_info(value)
    assert fake.sent[0].text == scripts.GET_VHD.text
    assert fake.sent[0].parameters == {"Path": value}


@pytest.mark.parametrize("value", HOSTILE)
def test_local_transport_passes_values_on_stdin_only(monkeypatch, value):
    seen = {}

    def run(argv, input, capture_output, timeout, check):
        seen.update(argv=argv, input=input, timeout=timeout)
        return subprocess.CompletedProcess(argv, 0, b'WARNING: noise\n{"ok": true, "data": 1}\n', b"")

    monkeypatch.setattr(subprocess, "run", run)
    transport = LocalPowerShellTransport(executable="powershell.exe")
    envelope = transport.run(ScriptCall(scripts.GET_VM_DISKS, {"VMName": value}), timeout_s=5)
    assert envelope["data"] == 1
    argv = seen["argv"]
    assert argv[:6] == ["powershell.exe", "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass",
                        "-EncodedCommand"]
    assert base64.b64decode(argv[6]).decode("utf-16-le") == scripts.LOCAL_BRIDGE
    assert len(argv) == 7
    request = json.loads(seen["input"].decode("utf-8"))
    assert request == {"script": scripts.GET_VM_DISKS.text, "parameters": {"VMName": value}}
    assert seen["timeout"] == 5


def test_local_transport_timeout_raises(monkeypatch):
    def run(argv, **kw):
        raise subprocess.TimeoutExpired(argv, kw["timeout"])

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(HyperVTimeoutError, match="no answer within 3 s"):
        LocalPowerShellTransport(executable="powershell.exe").run(ScriptCall(scripts.LIST_VMS, {}), timeout_s=3)


def test_local_transport_missing_powershell_names_remote_option(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(HyperVUnavailableError, match="remote") as refused:
        LocalPowerShellTransport().argv()
    assert refused.value.hint == "remote"  # the command line names --transport psrp --host HOST


def test_parse_envelope_without_json_raises():
    with pytest.raises(HyperVError, match="no result envelope"):
        parse_envelope("The term 'powershell' is not recognized", "Get-VM")


class _FakePowerShell:
    def __init__(self, pool):
        self.pool = pool
        self.calls = []
        self.had_errors = False

    def add_script(self, text):
        self.calls.append(("add_script", text))
        return self

    def add_parameter(self, name, value):
        self.calls.append(("add_parameter", name, value))
        return self

    def invoke(self):
        return ['{"ok": true, "data": "done"}']


def test_psrp_transport_sends_script_and_typed_parameters(monkeypatch):
    made = {}

    class WSMan:
        def __init__(self, host, **kw):
            made.update(host=host, **kw)

    class Pool:
        def __init__(self, wsman):
            self.opened = False

        def open(self):
            self.opened = True

        def close(self):
            made["closed"] = True

    shells = []

    def powershell(pool):
        shells.append(_FakePowerShell(pool))
        return shells[-1]

    monkeypatch.setattr("vhdx.hyperv.transport._load_pypsrp", lambda: (WSMan, Pool, powershell))
    transport = PsrpTransport("hv01.example.com", "EXAMPLE\\ops", "pw")
    name = "x'; Stop-Computer; '"
    envelope = transport.run(HyperV.plan_remove_checkpoint("web01", name, subtree=True))
    transport.close()
    assert envelope["data"] == "done"
    assert made["cert_validation"] is True and made["ssl"] is True and made["auth"] == "negotiate"
    assert made["host"] == "hv01.example.com" and made["username"] == "EXAMPLE\\ops"
    assert made["closed"] is True
    assert shells[0].calls == [("add_script", scripts.REMOVE_CHECKPOINT.text),
                               ("add_parameter", "VMName", "web01"), ("add_parameter", "Name", name),
                               ("add_parameter", "IncludeAllChildSnapshots", True)]


def test_psrp_missing_pypsrp_gives_install_hint(monkeypatch):
    import sys

    from vhdx.hyperv import transport

    monkeypatch.setitem(sys.modules, "pypsrp.powershell", None)
    with pytest.raises(HyperVUnavailableError, match=r"pip install '\.\[hyperv\]'"):
        transport._load_pypsrp()


def test_hyperv_package_imports_without_pypsrp():
    code = ("import sys; sys.modules['pypsrp'] = None; sys.modules['pypsrp.powershell'] = None; "
            "sys.modules['pypsrp.wsman'] = None; import vhdx.hyperv, vhdx_cli.hyperv_cmds; print('ok')")
    done = subprocess.run([sys_executable(), "-c", code], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr


def sys_executable() -> str:
    import sys

    return sys.executable
