"""Forcing an interleaving with another replica, at the database: a hook that runs just before
the claim's lease UPDATE is sent, inside the claim's own transaction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine


def _lease_update_batch(statement: str, parameters: Any) -> str | None:
    """The batch id a statement leases, if it is the claim's lease UPDATE (sets `lease_owner`
    under a condition on `lease_until`, which `release` and `renew` do not have)."""
    flat = " ".join(statement.split()).lower()
    if not (flat.startswith("update batches set lease_owner") and "lease_until <" in flat):
        return None
    values = parameters.values() if isinstance(parameters, dict) else parameters
    return next((v for v in values if isinstance(v, str) and v.startswith("batch_")), None)


def before_lease_update(engine: AsyncEngine, action: Callable[[Any, str], None]) -> Callable[[], None]:
    """Run `action(connection, batch_id)` just before each lease UPDATE on `engine` is sent
    (inside the claim's own transaction). Returns a function that turns the hook off. (It is not
    removed from the engine: a hook may be waiting inside an event dispatch, and removing a
    listener then breaks SQLAlchemy's iteration over them; it goes with the engine.)"""
    active = [True]

    def hook(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        batch_id = _lease_update_batch(statement, parameters) if active[0] else None
        if batch_id is not None:
            action(conn, batch_id)

    def turn_off() -> None:
        active[0] = False

    event.listen(engine.sync_engine, "before_cursor_execute", hook)
    return turn_off
