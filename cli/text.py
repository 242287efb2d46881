"""Text from files made safe for a terminal (no module imports: every CLI module may use it)."""

from __future__ import annotations


def printable(text) -> str:
    r"""Text for a terminal, where part of it came from a file (paths, locator keys, creator strings, messages).

    Every character that is not printable (C0 and C1 controls such as ESC, CR, BEL and CSI, DEL, a newline,
    bidi overrides) becomes a ``\xNN``/``\uNNNN`` escape, so a file cannot move the cursor, recolour, retitle or
    fake lines of the output. Renderers pass each line they print through it (JSON output escapes on its own).
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else
                   f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else
                   f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}" for ch in text)


def printable_lines(lines) -> str:
    """One output line per element, each escaped with ``printable``."""
    return "\n".join(printable(line) for line in lines)
