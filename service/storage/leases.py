"""Named leases: background work that one replica at a time should do (the file sweeper).

A lease is a row (`leases`) taken with a compare-and-set: free, expired, or already ours. The
holder renews it by taking it again before it runs out; a replica that dies loses it when
`until` passes, and another takes over. Work done under a lease must still be safe to do twice
(a holder can stall past its lease): the lease saves effort, it does not guarantee exclusivity.
"""

from __future__ import annotations

import time

from sqlalchemy import or_, update

from service.storage.db import Sessions, insert_for
from service.storage.tables import LeaseRow


class Leases:
    def __init__(self, sessions: Sessions, dialect: str) -> None:
        self.sessions = sessions
        self._dialect = dialect

    async def acquire(self, name: str, owner: str, seconds: float) -> bool:
        """Take or renew `name` for `seconds`; False while another owner holds it."""
        t = time.time()
        insert = insert_for(self._dialect, LeaseRow)
        async with self.sessions.begin() as s:
            await s.execute(insert.values(name=name, owner=None, until=0.0).on_conflict_do_nothing(
                index_elements=["name"]))
            res = await s.execute(update(LeaseRow).where(
                LeaseRow.name == name, or_(LeaseRow.owner.is_(None), LeaseRow.owner == owner, LeaseRow.until < t),
            ).values(owner=owner, until=t + seconds))
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    async def release(self, name: str, owner: str) -> None:
        """Give `name` up at once (a clean shutdown), so another replica need not wait it out."""
        async with self.sessions.begin() as s:
            await s.execute(update(LeaseRow).where(LeaseRow.name == name, LeaseRow.owner == owner)
                            .values(owner=None, until=0.0))
