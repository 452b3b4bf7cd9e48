"""API keys: configuration is the source of truth for configured keys, and a removal (or a
revocation of an API-created key) holds on every replica within the auth cache's lifetime."""

from __future__ import annotations

import grpc

from service.edge.auth import hash_key
from sluice.v1 import batch_pb2
from tests.harness import KEY_A, KEY_B, Client, gateway, make_settings, md, until
from tests.rpc_errors import expect_error

KEY_C = "sk-test-created-by-api-0000"


async def lists(c: Client, key: str) -> bool:
    try:
        await c.stub.ListBatches(batch_pb2.ListBatchesRequest(), metadata=md(key))
        return True
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
        return False


async def test_a_key_removed_from_configuration_is_refused_at_once_after_restart(db_url: str) -> None:
    both = make_settings(db_url)
    async with gateway(both) as (app, c):
        assert await lists(c, KEY_A) and await lists(c, KEY_B)
        await app.store.add_api_key(hash_key(KEY_C), "gamma")  # created later, through an API
        assert await lists(c, KEY_C)
    async with gateway(make_settings(db_url, api_keys={KEY_A: "alpha"})) as (_, c):
        assert await lists(c, KEY_A)
        err = await expect_error(c.stub.ListBatches(batch_pb2.ListBatchesRequest(), metadata=md(KEY_B)),
                                 grpc.StatusCode.UNAUTHENTICATED)
        assert err.envelope["code"] == "invalid_api_key"
        assert await lists(c, KEY_C), "a key created through the API is not configuration's to remove"
    async with gateway(make_settings(db_url, api_keys={KEY_A: "alpha", KEY_B: "beta"})) as (_, c):
        assert await lists(c, KEY_B), "configured again: works again"


async def test_removal_and_revocation_hold_on_another_replica_within_the_cache_time(db_url: str) -> None:
    """Replica 1 has just used keys B and C (cached); replica 2 starts without B, and C is revoked
    there. Replica 1 refuses both once its short cache lapses, with no restart."""
    async with gateway(make_settings(db_url, auth_cache_seconds=0.5)) as (app1, c1):
        await app1.store.add_api_key(hash_key(KEY_C), "gamma")
        assert await lists(c1, KEY_B) and await lists(c1, KEY_C)
        async with gateway(make_settings(db_url, api_keys={KEY_A: "alpha"})) as (app2, c2):
            assert not await lists(c2, KEY_B)
            assert await app2.store.revoke_api_key(hash_key(KEY_C))
            assert not await lists(c2, KEY_C)

            async def refused_on_replica_1() -> bool:
                return not await lists(c1, KEY_B) and not await lists(c1, KEY_C)

            await until("replica 1 to refuse the removed and the revoked key", refused_on_replica_1, timeout=30)
            assert await lists(c1, KEY_A)
