"""API keys → projects (tenants).

Keys are stored and compared as SHA-256 digests: a database dump reveals no usable key. API keys
are long random strings, so a fast hash is enough (a slow password hash would only add latency
to every call).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from service.domain.errors import Unauthenticated
from service.storage.repository import Store


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._known: dict[str, str] = {}

    async def register(self, keys: dict[str, str]) -> None:
        """Store the configured keys (raw key -> project) hashed."""
        await self.store.put_api_keys({hash_key(k): p for k, p in keys.items()})

    async def project(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        header = next((str(v) for k, v in metadata or () if k == "authorization"), "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                                  code="missing_api_key")
        digest = hash_key(key.strip())
        project = self._known.get(digest) or await self.store.project_for_key_hash(digest)
        if project is None:
            raise Unauthenticated("Incorrect API key provided.", code="invalid_api_key")
        self._known[digest] = project
        return project
