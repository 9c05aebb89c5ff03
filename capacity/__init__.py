"""Capacity: the bounded queue of rollout groups whose permits bound staleness."""

from capacity.queue import (
    BatchTimeout,
    CapacityLeak,
    Counters,
    QueueClosed,
    ReleaseReason,
    RolloutQueue,
    Slot,
    SlotError,
)

__all__ = [
    "BatchTimeout",
    "CapacityLeak",
    "Counters",
    "QueueClosed",
    "ReleaseReason",
    "RolloutQueue",
    "Slot",
    "SlotError",
]
