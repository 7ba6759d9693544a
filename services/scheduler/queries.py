"""Read side: routes and placements, resolved through the registry when an alias is given."""

from __future__ import annotations

import random
from typing import Collection

from modelgrid.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.scheduler.controller import Controller
from services.scheduler.records import UNPLACEABLE, PlacementRecord, Route
from services.scheduler.routing import choose_route


class Queries:
    def __init__(self, controller: Controller, rng: random.Random | None = None) -> None:
        self._controller = controller
        self._state = controller.state
        self._registry = controller.registry
        self._rng = rng or random.Random()

    async def _resolve(self, model: str, version: str) -> tuple[str, PlacementRecord | None]:
        """(concrete version, its placement). A version with a placement needs no registry call."""
        if not model:
            raise InvalidArgument("model is required")
        if version:
            record = await self._state.get_placement(model, version)
            if record is not None:
                return version, record
        concrete = await self._registry.resolve_version(model, version)
        return concrete, await self._state.get_placement(model, concrete)

    async def _not_placed(self, model: str, version: str) -> Exception:
        label = f"model '{model}' {version}"
        controller = self._controller
        if controller.deployments is not None and (model, version) not in controller.deployments:
            await controller.refresh_deployments()  # it may have been deployed a moment ago
        if controller.deployments is not None and (model, version) not in controller.deployments:
            return FailedPrecondition(
                f"{label} is not deployed: only versions an alias points at are placed; point an alias at it"
            )
        controller.wake.set()
        return Unavailable(f"{label} is not placed yet; the scheduler is placing it, retry shortly")

    async def route(self, model: str, version: str, exclude: Collection[str] = ()) -> Route:
        version, record = await self._resolve(model, version)
        if record is None:
            raise await self._not_placed(model, version)
        if record.state == UNPLACEABLE:
            raise ResourceExhausted(record.message or f"{record.label} cannot be placed")
        ids = {r.worker_id for s in record.stages for r in s.replicas}
        workers, epoch = await self._state.workers_and_epoch(ids)
        sessions = {wid: w.active_sessions for wid, w in workers.items()}
        draining = {wid for wid, w in workers.items() if not w.serving}
        hops = choose_route(record.stages, sessions, exclude, record.label, self._rng, draining)
        # The newest epoch, not the placement's: workers fence Forward against the newest instruction they
        # got for the model, which may carry a later epoch than the placement's last change.
        return Route(model, version, self._controller.newest_epoch(epoch), tuple(hops))

    async def placement(self, model: str, version: str) -> PlacementRecord:
        version, record = await self._resolve(model, version)
        if record is None:
            raise NotFound(f"model '{model}' {version} has no placement (not deployed, or not placed yet)")
        return record

    async def placements(self) -> list[PlacementRecord]:
        records = await self._state.placements()
        return [records[k] for k in sorted(records)]
