"""Who is calling: API keys checked against the registry, with a short cache.

    principal = await authenticator.authenticate(metadata_or_headers_or_token)   # UNAUTHENTICATED
    authenticator.require_admin(principal, "RegisterModel")                      # PERMISSION_DENIED

`authenticate` takes what a front end has: gRPC invocation metadata (a sequence of (key, value) or a
grpc.aio.Metadata), HTTP headers (any mapping with .get("authorization")), or the token itself
("Bearer <key>" or the bare key). It returns a Principal (key id, name, admin, limits).

The registry stores only the keys' sha256 and answers Registry.VerifyKey. Answers (good and bad) are
cached per key for ttl_s seconds, so a revoke takes effect within ttl_s on every gateway and a flood of
wrong keys costs the registry one lookup per key and ttl. While the registry is unreachable, a key
verified within the last stale_s seconds keeps working (nothing can be revoked meanwhile anyway).

With mode "disabled" (a gateway behind another auth layer) every caller is ANONYMOUS: an admin
without limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence, Union

from modelgrid.errors import DeadlineExceeded, PermissionDenied, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

REQUIRED, DISABLED = "required", "disabled"
MODES = (REQUIRED, DISABLED)
HEADER = "authorization"
MAX_TOKEN_CHARS = 256


@dataclass(frozen=True)
class KeyLimits:
    """Limits of one key, enforced by services/gateway/limits.py; 0 = unlimited."""

    requests_per_minute: int = 0  # per rate window (a minute unless the gateway's --rate-window-s says otherwise)
    tokens_per_minute: int = 0  # prompt + generated tokens per rate window
    max_streams: int = 0  # generation streams open at once


@dataclass(frozen=True)
class Principal:
    """The caller: an API key (key_id, name) or ANONYMOUS when auth is disabled."""

    key_id: str
    name: str
    admin: bool
    limits: KeyLimits = field(default_factory=KeyLimits)


ANONYMOUS = Principal(key_id="", name="anonymous", admin=True)

Credentials = Union[str, Mapping[str, Any], Sequence[tuple[str, Any]], None]
Verify = Callable[[str, float], Awaitable[Principal]]  # (secret, timeout) -> Principal, or a ModelGridError

_principal: ContextVar[Principal | None] = ContextVar("modelgrid_principal", default=None)


def current_principal() -> Principal:
    """The caller of the request handled in this context (set by the gateway's guard interceptor)."""
    return _principal.get() or ANONYMOUS


def set_current_principal(principal: Principal) -> None:
    _principal.set(principal)


def bearer_token(credentials: Credentials) -> str | None:
    """The key in credentials (metadata, headers or a token), without its "Bearer " scheme; None if absent."""
    value: Any = credentials
    if isinstance(credentials, Mapping):
        value = credentials.get(HEADER) or credentials.get("Authorization")
    elif credentials is not None and not isinstance(credentials, str):
        value = next((v for k, v in credentials if k.lower() == HEADER), None)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    return value or None


@dataclass
class _Entry:
    expires: float  # monotonic time after which the registry is asked again
    verified: float  # monotonic time of the registry's answer
    principal: Principal | None = None
    denied: str | None = None  # why the registry refused the key (unknown or revoked)


class Authenticator:
    """Turns credentials into a Principal (see the module doc)."""

    def __init__(
        self,
        verify: Verify | None,
        mode: str = REQUIRED,
        ttl_s: float = 2.0,
        stale_s: float = 300.0,
        timeout_s: float = 5.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"auth mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == REQUIRED and verify is None:
            raise ValueError("auth mode 'required' needs a verify function (Registry.VerifyKey)")
        self.mode = mode
        self._verify = verify
        self._ttl_s = ttl_s
        self._stale_s = stale_s
        self._timeout_s = timeout_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # sha256(key) -> last answer
        self._inflight: dict[str, asyncio.Future[_Entry]] = {}

    @property
    def enabled(self) -> bool:
        return self.mode == REQUIRED

    async def authenticate(self, credentials: Credentials) -> Principal:
        """The caller's Principal; Unauthenticated (missing, unknown or revoked key) or Unavailable."""
        if not self.enabled:
            return ANONYMOUS
        token = bearer_token(credentials)
        if token is None:
            raise Unauthenticated(
                "missing API key: send the metadata (or HTTP header) 'authorization: Bearer <key>'; "
                "an admin creates keys with `modelgrid keys create`"
            )
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("unknown API key")
        digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        entry = self._entries.get(digest)
        if entry is None or entry.expires <= self._clock():
            entry = await self._refresh(digest, token, entry)
        if entry.denied is not None:
            raise Unauthenticated(entry.denied)
        assert entry.principal is not None
        return entry.principal

    def require_admin(self, principal: Principal, what: str) -> None:
        if not principal.admin:
            raise PermissionDenied(f"{what} needs an admin API key; key {principal.name!r} is not an admin key")

    def forget(self) -> None:
        """Drop every cached answer (e.g. right after revoking a key through this gateway)."""
        self._entries.clear()

    async def _refresh(self, digest: str, token: str, old: _Entry | None) -> _Entry:
        """One registry lookup per key at a time; concurrent callers share it."""
        pending = self._inflight.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(digest, token, old))
            self._inflight[digest] = pending
            pending.add_done_callback(lambda _f: self._inflight.pop(digest, None))
        return await asyncio.shield(pending)

    async def _lookup(self, digest: str, token: str, old: _Entry | None) -> _Entry:
        assert self._verify is not None
        try:
            principal = await self._verify(token, self._timeout_s)
            entry = _Entry(expires=0.0, verified=self._clock(), principal=principal)
        except Unauthenticated as err:
            entry = _Entry(expires=0.0, verified=self._clock(), denied=err.message)
        except (Unavailable, DeadlineExceeded) as err:
            if old is not None and old.principal is not None and self._clock() - old.verified <= self._stale_s:
                log.warning("cannot verify key %r with the registry (%s); using its last answer", old.principal.name,
                            err.message)
                old.expires = self._clock() + min(self._ttl_s, 1.0)
                return old
            raise Unavailable(f"cannot check the API key now: {err.message}") from None
        entry.expires = entry.verified + self._ttl_s
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return entry
