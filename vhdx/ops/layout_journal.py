"""The intent record of a resize or compaction, so that ``--resume`` can finish one a crash interrupted.

``<disk>.layout-journal`` (JSON) is written atomically (the merge journal's helpers) before the disk changes and
removed once the operation is complete. Every step of both operations leaves a disk that opens and reads the old
or the new bytes; the record only says which operation, with which arguments, was under way.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from vhdx.errors import InvalidRequestError
from vhdx.ops.merge.journal import atomic_write, remove_file

JOURNAL_SUFFIX = ".layout-journal"
OPERATIONS = ("resize", "compact")


@dataclass(frozen=True)
class LayoutJournal:
    operation: str  # "resize" or "compact"
    disk: str
    size: int = 0  # resize: the new virtual size
    force: bool = False  # resize: --force was given
    mode: str = ""  # compact: the mode

    @property
    def path(self) -> str:
        return journal_path(self.disk)


def journal_path(disk) -> str:
    return os.path.abspath(os.fspath(disk)) + JOURNAL_SUFFIX


def write_journal(journal: LayoutJournal) -> None:
    atomic_write(journal.path, json.dumps(asdict(journal), indent=2).encode())


def read_journal(disk) -> LayoutJournal | None:
    """The pending record of ``disk``, or None; a record that does not parse is an error naming the file."""
    path = journal_path(disk)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
        journal = LayoutJournal(operation=str(data["operation"]), disk=str(data["disk"]), size=int(data["size"]),
                                force=bool(data["force"]), mode=str(data["mode"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidRequestError(f"cannot read the interrupted operation's record ({type(exc).__name__})",
                                  path=path) from None
    if journal.operation not in OPERATIONS:
        raise InvalidRequestError(f"unknown operation {journal.operation!r} in the record", path=path)
    return journal


def remove_journal(disk) -> None:
    remove_file(journal_path(disk))
