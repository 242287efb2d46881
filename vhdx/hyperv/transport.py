"""How scripts reach a Hyper-V host: local powershell.exe, PowerShell Remoting (pypsrp), or recordings.

A transport runs one ``ScriptCall`` and returns the JSON envelope the script printed, as a dict. It never
builds script text: it passes the fixed text and the parameter values separately.

* ``LocalPowerShellTransport``: ``powershell.exe -NoProfile -NonInteractive -EncodedCommand <bridge>`` on
  Windows, the request as one JSON document on stdin (no shell, no value on the command line).
* ``PsrpTransport``: WSMan via pypsrp (the optional ``hyperv`` extra); the script is added with
  ``add_script`` and each value with ``add_parameter``, sent as typed CLIXML.
* ``FakeTransport``: replays recorded envelopes and records what was sent (tests, demos).

References: HYPERV-NOTES §3.2 (pypsrp), §5.2 (local bridge), §5.4 (replay).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vhdx.hyperv.errors import HyperVAccessDeniedError, HyperVError, HyperVTimeoutError, HyperVUnavailableError
from vhdx.hyperv.scripts import LOCAL_BRIDGE, ScriptCall


class Transport(Protocol):
    """Runs one script call and returns its JSON envelope (``{"ok": ..., "data": ..., "error": ...}``)."""

    def run(self, call: ScriptCall, timeout_s: float | None = None) -> dict: ...

    def close(self) -> None: ...


def parse_envelope(output: str, script_name: str) -> dict:
    """The last JSON line the script printed (anything before it is host noise, e.g. profile output)."""
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                envelope = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HyperVError(f"unreadable JSON from the host: {exc}", command=script_name) from None
            if isinstance(envelope, dict) and "ok" in envelope:
                return envelope
    snippet = " ".join(output.split())[:200] or "nothing"
    raise HyperVError(f"the host printed no result envelope (got: {snippet})", command=script_name)


def _encoded(script: str) -> str:
    return base64.b64encode(script.encode("utf-16-le")).decode("ascii")


@dataclass
class LocalPowerShellTransport:
    """Windows PowerShell on this machine (Windows only)."""

    executable: str | None = None

    def argv(self) -> list[str]:
        exe = self.executable or shutil.which("powershell.exe") or shutil.which("powershell")
        if exe is None:
            raise HyperVUnavailableError(
                "powershell.exe not found: the local transport runs on a Windows Hyper-V host; "
                "from another machine use the remote (PSRP) transport", hint="remote")
        return [exe, "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass",
                "-EncodedCommand", _encoded(LOCAL_BRIDGE)]

    @staticmethod
    def request(call: ScriptCall) -> bytes:
        """The stdin document: the fixed script and the parameter values, as JSON."""
        return json.dumps({"script": call.script.text, "parameters": dict(call.parameters)},
                          ensure_ascii=False).encode("utf-8")

    def run(self, call: ScriptCall, timeout_s: float | None = None) -> dict:
        try:
            done = subprocess.run(self.argv(), input=self.request(call), capture_output=True, timeout=timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise HyperVTimeoutError(f"no answer within {timeout_s:g} s", command=call.script.name) from None
        except OSError as exc:
            raise HyperVUnavailableError(f"cannot start PowerShell: {exc.strerror or exc}",
                                         command=call.script.name) from None
        out = done.stdout.decode("utf-8", "replace")
        if done.returncode != 0 and "{" not in out:
            err = " ".join(done.stderr.decode("utf-8", "replace").split())[:300]
            raise HyperVError(f"PowerShell exited with {done.returncode}: {err}", command=call.script.name)
        return parse_envelope(out, call.script.name)

    def close(self) -> None:
        pass


def _load_pypsrp():
    try:
        from pypsrp.powershell import PowerShell, RunspacePool  # noqa: PLC0415 - optional dependency (the hyperv extra)
        from pypsrp.wsman import WSMan  # noqa: PLC0415
    except ImportError:
        raise HyperVUnavailableError(
            "remote Hyper-V needs pypsrp: pip install 'vhdx-chain[hyperv]' (or pip install '.[hyperv]')") from None
    return WSMan, RunspacePool, PowerShell


@dataclass
class PsrpTransport:
    """PowerShell Remoting over WSMan (HTTPS on 5986 by default, certificate validated unless told not to)."""

    host: str
    username: str | None = None
    password: str | None = None
    port: int | None = None
    ssl: bool = True
    auth: str = "negotiate"
    cert_validation: bool = True
    connection_timeout_s: int = 30
    operation_timeout_s: int = 20
    _pool: object = field(default=None, init=False, repr=False)
    _powershell_class: object = field(default=None, init=False, repr=False)

    def _open(self):
        if self._pool is None:
            wsman_class, pool_class, powershell_class = _load_pypsrp()
            wsman = wsman_class(self.host, port=self.port, username=self.username, password=self.password,
                                ssl=self.ssl, auth=self.auth, cert_validation=self.cert_validation,
                                connection_timeout=self.connection_timeout_s,
                                operation_timeout=self.operation_timeout_s,
                                read_timeout=self.operation_timeout_s + 10)
            pool = pool_class(wsman)
            try:
                pool.open()
            except Exception as exc:  # pypsrp raises requests, auth and WSMan errors of many kinds
                raise _connection_error(exc, self.host) from None
            self._pool, self._powershell_class = pool, powershell_class
        return self._pool

    def build(self, call: ScriptCall):
        """A pypsrp PowerShell pipeline for ``call``: the fixed script, then one add_parameter per value."""
        pool = self._open()
        ps = self._powershell_class(pool)
        ps.add_script(call.script.text)
        for name, value in call.parameters.items():
            ps.add_parameter(name, value)
        return ps

    def run(self, call: ScriptCall, timeout_s: float | None = None) -> dict:
        ps = self.build(call)
        try:
            output = ps.invoke()
        except Exception as exc:  # transport-level failure while the script ran
            raise _connection_error(exc, self.host, call.script.name) from None
        text = "\n".join(str(item) for item in output if item is not None)
        if not text and ps.had_errors:
            errors = "; ".join(str(e) for e in ps.streams.error)[:300]
            raise HyperVError(f"the remote script failed: {errors}", command=call.script.name)
        return parse_envelope(text, call.script.name)

    def close(self) -> None:
        if self._pool is not None:
            try:
                self._pool.close()
            finally:
                self._pool = None


def _connection_error(exc: Exception, host: str, command: str | None = None) -> HyperVError:
    text = " ".join(str(exc).split())[:300] or type(exc).__name__
    if "401" in text or "credentials were rejected" in text.lower() or "access is denied" in text.lower():
        return HyperVAccessDeniedError(f"{host} refused the credentials: {text}", command=command)
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return HyperVTimeoutError(f"{host} did not answer: {text}", command=command)
    return HyperVUnavailableError(f"cannot reach {host} over PowerShell Remoting: {text}", command=command)


@dataclass(frozen=True)
class SentCall:
    """What a FakeTransport received: the script name, its exact text and the parameters."""

    script: str
    text: str
    parameters: dict


def request_key(script_name: str, parameters: dict) -> str:
    return json.dumps([script_name, parameters], sort_keys=True, ensure_ascii=False)


@dataclass
class FakeTransport:
    """Replays recorded envelopes keyed by (script name, parameters); remembers every call it was given.

    A recording file is ``{"exchanges": [{"script": NAME, "parameters": {...}, "responses": [ENVELOPE, ...]}]}``.
    Successive calls with the same key take the responses in order and then repeat the last one, so a
    poll can see "running 40 %" and then "completed". A response ``{"transport_error": "timeout"}`` raises
    the timeout a real transport would. A call with no recording raises, so tests notice new commands.
    """

    exchanges: dict[str, list[dict]] = field(default_factory=dict)
    sent: list[SentCall] = field(default_factory=list)
    _served: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_files(cls, *paths: str | os.PathLike) -> FakeTransport:
        fake = cls()
        for path in paths:
            fake.load(json.loads(Path(path).read_text(encoding="utf-8")))
        return fake

    def load(self, recording: dict) -> None:
        for exchange in recording.get("exchanges", []):
            key = request_key(exchange["script"], exchange.get("parameters", {}))
            self.exchanges.setdefault(key, []).extend(exchange["responses"])

    def add(self, script_name: str, parameters: dict, *responses: dict) -> None:
        self.exchanges.setdefault(request_key(script_name, parameters), []).extend(responses)

    def run(self, call: ScriptCall, timeout_s: float | None = None) -> dict:
        params = dict(call.parameters)
        self.sent.append(SentCall(call.script.name, call.script.text, params))
        key = request_key(call.script.name, params)
        responses = self.exchanges.get(key)
        if not responses:
            raise HyperVError(f"no recording for {call.script.name} with parameters {params}",
                              command=call.script.name)
        index = self._served.get(key, 0)
        self._served[key] = index + 1
        response = responses[min(index, len(responses) - 1)]
        problem = response.get("transport_error")
        if problem == "timeout":
            raise HyperVTimeoutError(f"no answer within {timeout_s or 0:g} s", command=call.script.name)
        if problem:
            raise HyperVUnavailableError(str(problem), command=call.script.name)
        return response

    def close(self) -> None:
        pass
