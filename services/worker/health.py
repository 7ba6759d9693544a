"""A health servicer whose SERVING answer proves the device still computes (a tiny tensor op)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)

PROBE_TTL_S = 1.0  # reuse a probe result this long: probes hammered by kubelets stay cheap
PROBE_TIMEOUT_S = 5.0  # a device that takes longer than this for 4 floats is not healthy


class DeviceHealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 where SERVING also requires the device probe to pass.

    The probe runs in a thread of its own (not the torch thread), so a long forward step does not
    make the worker look dead, while a hung or lost GPU does.
    """

    def __init__(self, probe: Callable[[], bool]) -> None:
        super().__init__()
        self._probe = probe
        self._checked_at = -1e9
        self._ok = True
        self._inflight: asyncio.Future | None = None

    async def device_ok(self) -> bool:
        if time.monotonic() - self._checked_at < PROBE_TTL_S:
            return self._ok
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(asyncio.to_thread(self._probe))
        try:
            self._ok = bool(await asyncio.wait_for(asyncio.shield(self._inflight), PROBE_TIMEOUT_S))
        except asyncio.TimeoutError:
            log.error("device probe did not finish within %.0f s", PROBE_TIMEOUT_S)
            self._ok = False
        self._checked_at = time.monotonic()
        return self._ok

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        reply = await super().Check(request, context)
        if reply is not None and reply.status == health_pb2.HealthCheckResponse.SERVING and not await self.device_ok():
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return reply
