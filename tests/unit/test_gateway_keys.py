"""The gateway's side of API keys, without a network: reading the key from metadata or headers, the
verification cache (TTL, revocation, registry outages), admin checks, the access policy, traffic stats."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from modelgrid.errors import PermissionDenied, Unauthenticated, Unavailable
from services.gateway.auth import ANONYMOUS, Authenticator, KeyLimits, Principal, bearer_token
from services.gateway.guard import KEYED, POLICY
from services.gateway.limits import RateLimited
from services.gateway.metering import Traffic

ALICE = Principal("key_a", "alice", admin=False, limits=KeyLimits(10, 0, 1))


@pytest.mark.parametrize(
    "credentials, token",
    [
        ((("authorization", "Bearer mg_abc"),), "mg_abc"),
        ((("x-other", "1"), ("authorization", "bearer   mg_abc ")), "mg_abc"),
        (grpc.aio.Metadata(("authorization", "Bearer mg_abc")), "mg_abc"),
        ({"authorization": "Bearer mg_abc"}, "mg_abc"),
        ({"Authorization": "Bearer mg_abc"}, "mg_abc"),
        ("Bearer mg_abc", "mg_abc"),
        ("mg_abc", "mg_abc"),
        ((("authorization", b"Bearer mg_abc"),), "mg_abc"),
        (None, None),
        ((), None),
        ({"authorization": "Bearer "}, None),
        ((("x-api-key", "mg_abc"),), None),
    ],
)
def test_bearer_token(credentials, token) -> None:
    assert bearer_token(credentials) == token


class Registry:
    """Stands in for Registry.VerifyKey: a dict of keys, with a switch to make it unreachable."""

    def __init__(self) -> None:
        self.keys = {"mg_alice": ALICE}
        self.calls = 0
        self.down = False

    async def verify(self, secret: str, timeout: float) -> Principal:
        self.calls += 1
        await asyncio.sleep(0)
        if self.down:
            raise Unavailable("registry at 127.0.0.1:1 is unavailable: connection refused")
        if secret not in self.keys:
            raise Unauthenticated("unknown API key")
        return self.keys[secret]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_answers_are_cached_for_the_ttl_so_a_revoke_lands_within_it() -> None:
    registry, clock = Registry(), Clock()
    auth = Authenticator(registry.verify, ttl_s=2.0, clock=clock)
    assert await auth.authenticate((("authorization", "Bearer mg_alice"),)) == ALICE
    assert await auth.authenticate("mg_alice") == ALICE
    assert registry.calls == 1
    del registry.keys["mg_alice"]  # revoked in the registry
    clock.now += 1.9
    assert await auth.authenticate("mg_alice") == ALICE  # still cached
    clock.now += 0.2
    with pytest.raises(Unauthenticated, match="unknown API key"):
        await auth.authenticate("mg_alice")
    assert registry.calls == 2


async def test_wrong_keys_are_cached_too_and_concurrent_checks_share_one_lookup() -> None:
    registry, clock = Registry(), Clock()
    auth = Authenticator(registry.verify, ttl_s=2.0, clock=clock)
    results = await asyncio.gather(*(auth.authenticate("mg_wrong") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, Unauthenticated) for r in results) and registry.calls == 1
    await asyncio.gather(*(auth.authenticate("mg_alice") for _ in range(5)))
    assert registry.calls == 2


async def test_missing_key_says_how_to_send_one() -> None:
    auth = Authenticator(Registry().verify)
    with pytest.raises(Unauthenticated, match="authorization: Bearer <key>"):
        await auth.authenticate(())


async def test_a_known_key_survives_a_registry_outage_but_a_new_one_does_not() -> None:
    registry, clock = Registry(), Clock()
    auth = Authenticator(registry.verify, ttl_s=2.0, stale_s=60.0, clock=clock)
    await auth.authenticate("mg_alice")
    registry.down = True
    clock.now += 10
    assert await auth.authenticate("mg_alice") == ALICE
    with pytest.raises(Unavailable, match="cannot check the API key now"):
        await auth.authenticate("mg_bob")
    clock.now += 100  # longer than stale_s without a successful check
    with pytest.raises(Unavailable):
        await auth.authenticate("mg_alice")


async def test_disabled_auth_makes_everyone_an_unlimited_admin() -> None:
    auth = Authenticator(None, mode="disabled")
    assert await auth.authenticate(None) is ANONYMOUS and ANONYMOUS.admin and ANONYMOUS.limits == KeyLimits()
    with pytest.raises(ValueError, match="needs a verify function"):
        Authenticator(None)
    with pytest.raises(ValueError, match="auth mode must be one of"):
        Authenticator(Registry().verify, mode="optional")


def test_admin_check() -> None:
    auth = Authenticator(Registry().verify)
    auth.require_admin(ANONYMOUS, "SetAlias")
    with pytest.raises(PermissionDenied, match="SetAlias needs an admin API key; key 'alice' is not"):
        auth.require_admin(ALICE, "SetAlias")


def test_policy_protects_every_method_but_health() -> None:
    gateway = "/modelgrid.v1.Gateway/"
    assert POLICY["/grpc.health.v1.Health/Check"].public
    assert POLICY.get("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", KEYED) == KEYED
    assert POLICY.get(gateway + "ListModels", KEYED) == KEYED and POLICY.get(gateway + "GetPlacement", KEYED) == KEYED
    for method in ("RegisterModel", "SetAlias", "SetReplicas", "CreateKey", "ListKeys", "RevokeKey", "ListWorkers",
                   "ListPlacements", "GetStats"):
        assert POLICY[gateway + method].admin, method
    assert POLICY[gateway + "Generate"].stream and POLICY[gateway + "Generate"].tokens
    assert POLICY[gateway + "Embed"].tokens and not POLICY[gateway + "Embed"].stream
    from modelgrid.v1 import gateway_pb2

    methods = {m.name for m in gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].methods}
    assert not any(POLICY.get(gateway + m, KEYED).public for m in methods)


def test_rate_limited_carries_retry_after() -> None:
    err = RateLimited("API key 'alice' is over its limit of 3 requests per minute", 0.2, "requests")
    assert err.code == "RESOURCE_EXHAUSTED" and err.retry_after_s == 1
    assert err.message.endswith("retry in 1 s") and err.trailing_metadata == (("retry-after-s", "1"),)
    assert RateLimited("x", 7.01, "tokens").trailing_metadata == (("retry-after-s", "8"),)


def test_traffic_counts_the_last_window_per_model() -> None:
    clock = Clock()
    traffic = Traffic(window_s=60, clock=clock, started=clock.now)
    traffic.record("a", True, 5, 10)
    traffic.record("a", False, 3, 0)
    clock.now += 30
    traffic.record("b", True, 7, 0)
    (a, b) = traffic.snapshot()
    assert (a.model, a.requests, a.errors, a.prompt_tokens, a.completion_tokens) == ("a", 2, 1, 8, 10)
    assert (b.model, b.requests) == ("b", 1)
    clock.now += 31
    assert [m.model for m in traffic.snapshot()] == ["b"]
    assert traffic.requests_total == 3
