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

    def zero_range(self, offset, length):
        self.write_zeros(offset, length)  # each chunk written is a step (a punched hole would be one unseen write)


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


class PowerCutIO(DeadAfterCrash):
    """Like DeadAfterCrash, and what was written or truncated since the last flush is lost at the crash.

    ``lose(index, count)`` picks which of the ``count`` unflushed operations (numbered from 0 since that flush)
    the disk loses: all of them (nothing reached the platter) or some (the disk wrote them out of order). Lost
    operations are undone in reverse order, so the file is what a power cut at that point could leave.
    """

    lose = staticmethod(lambda index, count: True)

    @classmethod
    def open_faulty(cls, path, crash_at, lose=None) -> PowerCutIO:
        io = super().open_faulty(path, crash_at)
        io.unflushed = []  # (offset, old bytes, old size): how to undo each operation since the last flush
        if lose is not None:
            io.lose = lose
        return io

    def _step(self) -> None:
        try:
            super()._step()
        except SimulatedCrash:
            if self.unflushed:
                self._power_cut()
            raise

    def _power_cut(self) -> None:
        undo, self.unflushed = self.unflushed, []
        for index in reversed(range(len(undo))):
            offset, old, old_size = undo[index]
            if self.lose(index, len(undo)):
                ImageIO.write_at(self, offset, old)
                ImageIO.truncate(self, old_size)

    def write_at(self, offset, data):
        old = self.read_file_at(offset, len(memoryview(data).cast("B")))
        size = self.real_size
        super().write_at(offset, data)
        self.unflushed.append((offset, old[: max(0, min(len(old), size - offset))], size))

    def truncate(self, size):
        old_size = self.real_size
        tail = self.read_file_at(size, old_size - size) if size < old_size else b""
        super().truncate(size)
        self.unflushed.append((size, tail, old_size))

    def flush(self):
        super().flush()
        self.unflushed = []
