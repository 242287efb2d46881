"""What a library error's ``hint`` means on the command line: the flag that asks for it (one place)."""

from __future__ import annotations

# VhdxError.hint -> the words appended to the one-line error (the library names no flag).
HINT_FLAGS = {
    "overwrite": "use --force to overwrite it",
    "force": "use --force to go ahead anyway",
    "ignore_id_mismatch": "use --ignore-id-mismatch to accept it",
    "salvage": "use --salvage to read the missing bytes as zeros",
    "cut": "use --force to cut them",
    "resume": "run that command with --resume",
    "mode_full": "use --mode full",
    "dynamic_copy": "`vhdx convert --type dynamic` makes one",
    "remote": "use --transport psrp --host HOST",
    "merge_resume": "then run `vhdx merge --resume {subject}`",
    "merge_abort": "`vhdx merge --abort {subject}` gives the merge up",
    "merge_pending": "finish it with `vhdx merge --resume {subject}` or undo it with `vhdx merge --abort {subject}`",
}


def error_line(exc) -> str:
    """The one-line message of library error EXC: the flag its hint asks for, then the finding code it breaks.

    A broken format rule ends with its code as ``check`` names it (``[BAT_BEYOND_EOF]``); HyperVError.code is
    Hyper-V's number, not a rule, and is left out.
    """
    text = " ".join(str(exc).split("\n"))
    flag = HINT_FLAGS.get(getattr(exc, "hint", None))
    if flag:
        subject = getattr(exc, "hint_subject", None) or getattr(exc, "path", None) or "FILE"
        text += f" ({flag.format(subject=subject)})"
    code = getattr(exc, "code", None)
    return text + f" [{code}]" if isinstance(code, str) else text
