"""API keys → projects (tenants).

Keys are stored and compared as SHA-256 digests: a database dump reveals no usable key. API keys
are long random strings, so a fast hash is enough (a slow password hash would only add latency
to every call).

Configuration is the source of truth for configured keys: `register` (at every start) makes the
stored `config` keys exactly the configured ones, so a key removed from SLUICE_API_KEY[S] is gone
after a restart. Each replica caches a known key for `cache_seconds` only (default 5 s,
SLUICE_AUTH_CACHE_SECONDS), so a key removed or revoked by another replica stops working here
within that time. A revoked key (admin API) and every key of an archived project are refused
(`Store.project_for_key_hash`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence

from service.domain.errors import Unauthenticated
from service.storage.repository import Store

log = logging.getLogger(__name__)
DEFAULT_CACHE_SECONDS = 5.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def bearer_key(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The key of the `authorization: Bearer <key>` header; Unauthenticated when there is none."""
    header = next((str(v) for k, v in metadata or () if k == "authorization"), "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                              code="missing_api_key")
    return key.strip()


class Authenticator:
    def __init__(self, store: Store, cache_seconds: float = DEFAULT_CACHE_SECONDS) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        self._known: dict[str, tuple[str, float]] = {}  # digest -> (project, monotonic expiry)

    async def register(self, keys: dict[str, str]) -> None:
        """Synchronise the configured keys (raw key -> project), stored hashed."""
        removed = await self.store.sync_config_api_keys({hash_key(k): p for k, p in keys.items()})
        self._known.clear()
        if removed:
            log.info("removed %d API key(s) that are no longer configured", removed)

    def forget(self, key_hash: str | None = None, project: str | None = None) -> None:
        """Drop a key, or every key of a project, from this replica's cache: what was just
        revoked or archived here is refused here at once (other replicas: within the TTL)."""
        for digest, (owner, _) in list(self._known.items()):
            if digest == key_hash or owner == project:
                self._known.pop(digest, None)

    async def project(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        digest = hash_key(bearer_key(metadata))
        t = time.monotonic()
        cached = self._known.get(digest)
        if cached is not None and cached[1] > t:
            return cached[0]
        project = await self.store.project_for_key_hash(digest)
        if project is None:
            self._known.pop(digest, None)
            raise Unauthenticated("Incorrect API key provided.", code="invalid_api_key")
        if self.cache_seconds > 0:
            self._known[digest] = (project, t + self.cache_seconds)
        return project
