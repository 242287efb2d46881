"""The exception tree of the library.

Every error names the structure it concerns and, where there is one, the file offset, so that a one-line
message is enough to find the problem with a hex editor.
"""

from __future__ import annotations


class VhdxError(Exception):
    """Root of every error the library raises.

    Attributes:
        structure: name of the on-disk structure concerned (e.g. ``"Header 2"``, ``"BAT entry 17"``).
        offset: file offset in bytes of that structure, or ``None`` when it has no single place.
        path: the file concerned, when known.
        hint: what the caller may ask for to go ahead, as a name (``"overwrite"``, ``"force"``,
            ``"ignore_id_mismatch"``, ``"salvage"``); the command line turns it into its flag, the library
            never names a flag itself.
    """

    def __init__(
        self,
        message: str,
        *,
        structure: str | None = None,
        offset: int | None = None,
        path: str | None = None,
        expected: object = None,
        actual: object = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.structure = structure
        self.offset = offset
        self.path = path
        self.expected = expected
        self.actual = actual
        self.hint = hint

    def __str__(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}:")
        if self.structure:
            where = self.structure if self.offset is None else f"{self.structure} at offset {self.offset:#x}"
            parts.append(f"{where}:")
        parts.append(self.message)
        return " ".join(parts)

    def with_path(self, path: str) -> VhdxError:
        """Return self after recording the file path (first one wins)."""
        if self.path is None:
            self.path = str(path)
        return self


class FormatError(VhdxError):
    """A structure is malformed: bad signature, impossible value, truncated, out of bounds."""


class ChecksumError(FormatError):
    """A CRC-32C does not match."""


class UnsupportedError(VhdxError):
    """A legal file uses something we do not handle (version, required unknown region/item, ...)."""


class LogReplayRequired(VhdxError):
    """The log holds updates that must be replayed before the file can be written."""


class ChainError(VhdxError):
    """The differencing chain cannot be assembled."""


class ParentNotFoundError(ChainError):
    """No locator path leads to a usable parent file."""

    def __init__(self, message: str, *, tried: list[str] | None = None, **kw) -> None:
        super().__init__(message, **kw)
        self.tried = list(tried or [])


class ParentMismatchError(ChainError):
    """The parent's DataWriteGuid matches neither parent_linkage nor parent_linkage2."""


class ChainLoopError(ChainError):
    """The chain refers back to a file already in it."""


class ChainTooDeepError(ChainError):
    """The chain holds more files than ``vhdx.disk.chain.MAX_CHAIN_DEPTH``."""


class LockedError(VhdxError):
    """Another process holds the writer lock on the file."""


class DependentsError(VhdxError):
    """Writing would change the DataWriteGuid of a disk that differencing disks depend on (they would break).

    Attributes:
        dependents: paths of the disks that would no longer open.
    """

    def __init__(self, message: str, *, dependents=(), **kw) -> None:
        super().__init__(message, **kw)
        self.dependents = list(dependents)


class InvalidRequestError(VhdxError):
    """A caller asked for something impossible (bad size, bad block size, out-of-range offset, ...)."""


class MergeError(VhdxError):
    """A merge cannot start or cannot go on."""


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
