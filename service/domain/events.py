"""What Sluice tells about a batch as it happens: webhook events and watch-stream events.

Webhooks use OpenAI's event names and shape (`batch.completed`, ...: `{id, object: "event", type,
created_at, data: {id}}`), so a receiver written for OpenAI's batch webhooks works unchanged.
Watch streams send the batch itself, labelled with why it was sent.

No I/O here: storage writes the events, the engine delivers them, the edge streams them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from enum import StrEnum
from itertools import pairwise
from typing import Any

from service.domain.model import BatchStatus, can_transition

# OpenAI's batch webhook event types, one per terminal status.
WEBHOOK_EVENT_TYPES: dict[BatchStatus, str] = {
    BatchStatus.COMPLETED: "batch.completed",
    BatchStatus.FAILED: "batch.failed",
    BatchStatus.EXPIRED: "batch.expired",
    BatchStatus.CANCELLED: "batch.cancelled",
}
TERMINAL_WEBHOOK_EVENT_TYPES = tuple(WEBHOOK_EVENT_TYPES.values())
# Sluice's own event: a running batch passed one of the progress thresholds an endpoint asked for.
PROGRESS_EVENT_TYPE = "batch.progress"
ALL_WEBHOOK_EVENT_TYPES = (*TERMINAL_WEBHOOK_EVENT_TYPES, PROGRESS_EVENT_TYPE)
DEFAULT_PROGRESS_THRESHOLDS = (25, 50, 75)


def webhook_payload(event_id: str, event_type: str, created_at: int, batch_id: str,
                    progress: int | None = None) -> dict[str, Any]:
    """OpenAI's webhook event object. The `id` doubles as the Standard Webhooks `webhook-id`, so
    every attempt to deliver the same event carries the same id and receivers can deduplicate.
    A progress event adds the threshold it passed (`data.progress`, in percent of the lines)."""
    data: dict[str, Any] = {"id": batch_id}
    if progress is not None:
        data["progress"] = progress
    return {"id": event_id, "object": "event", "type": event_type, "created_at": created_at, "data": data}


def progress_subscription(event_types: Sequence[str], thresholds: Sequence[int]) -> tuple[list[str], tuple[int, ...]]:
    """The event types and progress thresholds an endpoint gets, from what was asked (the webhooks
    file or the admin API): thresholds alone ask for `batch.progress`; `batch.progress` alone gets
    25, 50 and 75. Raises ValueError, with a message for the user, for thresholds out of 1-99."""
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 < t < 100 for t in thresholds):
        raise ValueError(f"progress thresholds are whole percents from 1 to 99, got {list(thresholds)!r}")
    events = list(dict.fromkeys(event_types)) or list(TERMINAL_WEBHOOK_EVENT_TYPES)
    chosen = tuple(sorted(set(thresholds)))
    if chosen and PROGRESS_EVENT_TYPE not in events:
        events.append(PROGRESS_EVENT_TYPE)
    if PROGRESS_EVENT_TYPE in events and not chosen:
        chosen = DEFAULT_PROGRESS_THRESHOLDS
    return events, chosen


def thresholds_passed(before: int, after: int, total: int, thresholds: Collection[int]) -> list[int]:
    """The thresholds (percent of `total` lines ended) that a batch passed when its ended lines
    went from `before` to `after`: each one exactly once over any sequence of increases, since
    the intervals (before, after] of successive updates do not overlap. 100 is never a threshold
    (the terminal event says it)."""
    if total <= 0 or after <= before:
        return []
    return sorted(t for t in thresholds if 0 < t < 100 and before * 100 < t * total <= after * 100)


class WatchEvent(StrEnum):
    """Why a watch stream sent the batch."""

    SNAPSHOT = "snapshot"  # the first message: the batch as it is now (also after a reconnect)
    STATUS = "status"  # the status changed
    PROGRESS = "progress"  # counts, usage, cost or another field changed; the status did not


# The order in which a batch can pass through the non-terminal statuses. A batch visits at most
# one of finalizing and cancelling (neither leads to the other), so their relative order is moot.
_PASSAGE = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.CANCELLING)


def statuses_between(previous: BatchStatus, current: BatchStatus,
                     visited: Collection[BatchStatus]) -> list[BatchStatus]:
    """The statuses a batch went through to get from `previous` to `current` (`current`
    included, `previous` not), given the statuses it has a timestamp for (`visited`).

    A watcher polls; a status that lasted less than one poll (a `finalizing` of a few
    milliseconds) is still reported, in order, because the batch keeps the stamp of every status
    it entered and the state machine fixes the order. If the stamps do not describe a legal path
    (they always should), only `current` is returned."""
    if previous == current:
        return []
    start = _PASSAGE.index(previous) + 1 if previous in _PASSAGE else len(_PASSAGE)
    end = _PASSAGE.index(current) if current in _PASSAGE else len(_PASSAGE)
    path = [s for s in _PASSAGE[start:end] if s in visited] + [current]
    legal = all(can_transition(a, b) for a, b in pairwise([previous, *path]))
    return path if legal else [current]
