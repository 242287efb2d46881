"""The exception tree of the library.

Every error names the structure it concerns and, where there is one, the file offset, so that a one-line
message is enough to find the problem with a hex editor.
"""

from __future__ import annotations


class VhdxError(Exception):
    """Root of every error the library raises.

    Attributes:
        code: the finding code (``vhdx.findings.Code``) of the rule the file breaks, when one applies.
        structure: name of the on-disk structure concerned (e.g. ``"Header 2"``, ``"BAT entry 17"``).
        offset: file offset in bytes of that structure, or ``None`` when it has no single place.
        path: the file concerned, when known.
        hint: what the caller may ask for to go ahead, as a name (``"overwrite"``, ``"force"``,
            ``"ignore_id_mismatch"``, ``"salvage"``); the command line turns it into its flag, the library
            never names a flag itself.
    """

    default_code: str | None = None  # the code of every error of this class (chain errors)

    def __init__(
        self,
        message: str,
        *,
        structure: str | None = None,
        offset: int | None = None,
        path: str | None = None,
        expected: object = None,
        actual: object = None,
        code: str | None = None,
        hint: str | None = None,
        hint_subject: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        # The finding code of the broken rule (vhdx.findings.Code), as check reports it, when one applies.
        self.code = str(code) if code is not None else self.default_code
        self.structure = structure
        self.offset = offset
        self.path = path
        self.expected = expected
        self.actual = actual
        self.hint = hint
        self.hint_subject = hint_subject  # what the hinted command acts on (e.g. the child of a pending merge)

    def __str__(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}:")
        if self.structure:
            where = self.structure if self.offset is None else f"{self.structure} at offset {self.offset:#x}"
            parts.append(f"{where}:")
        parts.append(self.message)
        return " ".join(parts)

    @classmethod
    def from_problem(cls, problem, path: str | None = None) -> VhdxError:
        """The error for a ``vhdx.findings.Problem`` that stops the reader (its code, structure and offset).

        A failed CRC-32C gives a ``ChecksumError``, an unknown required structure an ``UnsupportedError``;
        anything else an instance of ``cls``.
        """
        kind = _ERROR_CLASS_BY_CODE.get(str(problem.code), cls)
        return kind(problem.message, structure=problem.structure, offset=problem.offset, path=path,
                    code=str(problem.code))

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


# Finding codes whose error is more specific than FormatError (see ``VhdxError.from_problem``).
_ERROR_CLASS_BY_CODE: dict[str, type[VhdxError]] = {
    "HEADER_CHECKSUM": ChecksumError,
    "REGION_TABLE_CHECKSUM": ChecksumError,
    "HEADER_VERSION": UnsupportedError,
    "REGION_UNKNOWN_REQUIRED": UnsupportedError,
    "METADATA_UNKNOWN_REQUIRED": UnsupportedError,
    "LOCATOR_TYPE": UnsupportedError,
}


class ChainError(VhdxError):
    """The differencing chain cannot be assembled."""


class ParentNotFoundError(ChainError):
    """No locator path leads to a usable parent file."""

    default_code = "PARENT_NOT_FOUND"

    def __init__(self, message: str, *, tried: list[str] | None = None, **kw) -> None:
        super().__init__(message, **kw)
        self.tried = list(tried or [])


class ParentMismatchError(ChainError):
    """The parent's DataWriteGuid matches neither parent_linkage nor parent_linkage2."""

    default_code = "PARENT_MISMATCH"


class ChainLoopError(ChainError):
    """The chain refers back to a file already in it."""

    default_code = "CHAIN_LOOP"


class ChainTooDeepError(ChainError):
    """The chain holds more files than ``vhdx.disk.chain.MAX_CHAIN_DEPTH``."""

    default_code = "CHAIN_TOO_DEEP"


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
