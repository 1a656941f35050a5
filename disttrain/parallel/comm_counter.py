"""Bytes a rank sends to other ranks, by collective kind: the quantity the cost model predicts
per step (`planner.collectives`), read and reset once per step by the engine."""

from __future__ import annotations


class CommCounter:
    """Per-kind counters of bytes sent to other ranks (a rank's own share is not counted)."""

    def __init__(self, kinds: tuple[str, ...]) -> None:
        self.comm_bytes: dict[str, int] = {kind: 0 for kind in kinds}
        """Bytes sent to other ranks since the last `reset_comm_bytes`, by collective kind."""

    def reset_comm_bytes(self) -> dict[str, int]:
        """Zero the counters and return what they held (call once per step)."""
        before = dict(self.comm_bytes)
        for kind in before:
            self.comm_bytes[kind] = 0
        return before

    def _count(self, kind: str, num_bytes: int) -> None:
        self.comm_bytes[kind] += int(num_bytes)
