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
    ) -> None:
        super().__init__(message)
        self.message = message
        self.structure = structure
        self.offset = offset
        self.path = path
        self.expected = expected
        self.actual = actual

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
