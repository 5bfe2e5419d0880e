"""The target's features of committed positions (float16 rows), kept for drafters that read them."""

from __future__ import annotations

from specdec.v1 import common_pb2


class TargetFeatures:
    def __init__(self, enabled: bool):
        self.enabled = enabled   # whether the verifier is asked for them at all
        self.data = bytearray()
        self.size = 0            # features per row

    @property
    def rows(self) -> int:
        return len(self.data) // (2 * self.size) if self.size else 0

    def store(self, message: common_pb2.HiddenStates) -> None:
        """Keeps the verifier's features; a message restating known positions replaces them."""
        if not message.rows:
            return
        row_bytes = 2 * message.size
        if message.size != self.size:
            self.data, self.size = bytearray(), message.size
        if message.start > self.rows:
            return  # a gap cannot be filled later: drafting on the drafter's own features past it is still safe
        del self.data[message.start * row_bytes:]
        self.data += message.data

    def since(self, start: int) -> common_pb2.HiddenStates | None:
        """The stored features from position `start` on, or None when there are none to send."""
        rows = self.rows - start
        if not self.enabled or rows <= 0:
            return None
        row_bytes = 2 * self.size
        return common_pb2.HiddenStates(start=start, rows=rows, size=self.size, data=bytes(self.data[start * row_bytes:]))
