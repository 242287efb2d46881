"""Errors of the Hyper-V backend: a host refused or failed a request.

They subclass ``vhdx.errors.VhdxError`` (one error tree), but live here: only ``vhdx.hyperv`` raises them.
"""

from __future__ import annotations

from vhdx.errors import VhdxError


class HyperVError(VhdxError):
    """A Hyper-V host refused or failed a request (see ``vhdx.hyperv``).

    Attributes:
        command: name of the script that was running (e.g. ``"Get-VHD"``).
        code: Hyper-V's numeric error code (WMI return value, job ErrorCode or HRESULT), when it gave one.
        category: PowerShell's error category (e.g. ``"PermissionDenied"``), when known.
        error_id: PowerShell's FullyQualifiedErrorId, when known.
    """

    def __init__(self, message: str, *, command: str | None = None, code: int | None = None,
                 category: str | None = None, error_id: str | None = None, **kw) -> None:
        super().__init__(message, **kw)
        self.command = command
        self.code = code
        self.category = category
        self.error_id = error_id

    def __str__(self) -> str:
        text = super().__str__()
        if self.command:
            text = f"{self.command}: {text}"
        if self.code is not None:
            text = f"{text} (code {self.code})"
        return text


class HyperVUnavailableError(HyperVError):
    """The host cannot be reached or has no Hyper-V PowerShell module, or the transport is not installed."""


class HyperVAccessDeniedError(HyperVError):
    """The account lacks the rights (not elevated, not in "Hyper-V Administrators")."""


class VmNotFoundError(HyperVError):
    """No virtual machine of that name exists on the host."""


class CheckpointNotFoundError(HyperVError):
    """The virtual machine has no checkpoint of that name (or the name is ambiguous)."""


class HyperVJobFailedError(HyperVError):
    """A Hyper-V job (merge, checkpoint removal) ended in failure; ``code`` and the message are Hyper-V's."""


class HyperVTimeoutError(HyperVError):
    """A Hyper-V request or a followed merge did not finish within the time allowed."""
