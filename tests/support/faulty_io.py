"""An ImageIO that stops (as a crash would) after a given number of write, flush or truncate calls."""

from __future__ import annotations

from vhdx.io import ImageIO


class SimulatedCrash(Exception):
    """Raised in place of the operation the crash interrupts."""


class FaultyIO(ImageIO):
    """Counts mutating operations; the one numbered ``crash_at`` (0-based) never happens."""

    crash_at: int | None = None
    count: int = 0

    @classmethod
    def open_faulty(cls, path, crash_at: int | None) -> FaultyIO:
        io = cls.open(path, writable=True)
        io.crash_at = crash_at
        io.count = 0
        return io

    def _step(self) -> None:
        if self.crash_at is not None and self.count == self.crash_at:
            raise SimulatedCrash(f"crash at operation {self.count}")
        self.count += 1

    def write_at(self, offset, data):
        self._step()
        super().write_at(offset, data)

    def flush(self):
        self._step()
        super().flush()

    def truncate(self, size):
        self._step()
        super().truncate(size)

    def copy_from(self, src, src_offset, offset, length, buf=None):
        self.copy_through_buffer(src, src_offset, offset, length, buf)  # each chunk written is a step
        return 0


class DeadAfterCrash(FaultyIO):
    """Like FaultyIO, and once crashed nothing more reaches the file (as after a power cut)."""

    dead = False

    def _step(self) -> None:
        if self.dead:
            raise SimulatedCrash("the process is gone")
        try:
            super()._step()
        except SimulatedCrash:
            self.dead = True
            raise
