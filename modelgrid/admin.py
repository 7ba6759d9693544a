"""SDK types and conversions for the gateway's admin calls: API keys and traffic stats (used by Client, AsyncClient
and the CLI's `keys` and `status` verbs)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from modelgrid.errors import InvalidArgument
from modelgrid.v1 import common_pb2, gateway_pb2

API_KEY_ENV = "MODELGRID_API_KEY"


def resolve_api_key(api_key: str | None) -> str | None:
    """api_key, else $MODELGRID_API_KEY, else None (calls go without a key)."""
    return api_key or os.environ.get(API_KEY_ENV) or None


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries the key on every call."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


@dataclass(frozen=True)
class KeyLimits:
    """0 = unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_streams: int = 0


@dataclass(frozen=True)
class ApiKeyInfo:
    key_id: str
    name: str
    prefix: str  # the key's first characters
    admin: bool
    limits: KeyLimits
    created_unix_ms: int
    revoked_unix_ms: int  # 0 while active

    @property
    def active(self) -> bool:
        return not self.revoked_unix_ms


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKeyInfo
    secret: str = field(repr=False)  # the key itself: shown once, never stored by the platform


@dataclass(frozen=True)
class ModelStats:
    model: str
    requests: int  # Generate/Embed calls that ended in the window
    errors: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GatewayStats:
    uptime_s: float
    window_s: float  # the per-model numbers cover the last window_s seconds
    active_streams: int
    requests_total: int
    models: list[ModelStats]


def create_key_request(
    name: str, admin: bool, requests_per_minute: int, tokens_per_minute: int, max_streams: int
) -> common_pb2.CreateKeyRequest:
    if not name:
        raise InvalidArgument("a key needs a name")
    if min(requests_per_minute, tokens_per_minute, max_streams) < 0:
        raise InvalidArgument("limits must be >= 0 (0 = unlimited)")
    limits = common_pb2.KeyLimits(
        requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute, max_streams=max_streams
    )
    return common_pb2.CreateKeyRequest(name=name, admin=admin, limits=limits)


def key_from_proto(k: common_pb2.ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        key_id=k.key_id,
        name=k.name,
        prefix=k.prefix,
        admin=k.admin,
        limits=KeyLimits(k.limits.requests_per_minute, k.limits.tokens_per_minute, k.limits.max_streams),
        created_unix_ms=k.created_unix_ms,
        revoked_unix_ms=k.revoked_unix_ms,
    )


def created_from_proto(reply: common_pb2.CreateKeyResponse) -> CreatedKey:
    return CreatedKey(key_from_proto(reply.key), reply.secret)


def stats_from_proto(s: gateway_pb2.GatewayStats) -> GatewayStats:
    return GatewayStats(
        uptime_s=s.uptime_s,
        window_s=s.window_s,
        active_streams=s.active_streams,
        requests_total=s.requests_total,
        models=[ModelStats(m.model, m.requests, m.errors, m.prompt_tokens, m.completion_tokens) for m in s.models],
    )
