"""Assembling the registry: database, artifact store, domain object, gRPC server."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from modelgrid.channel import CHUNK_BYTES
from modelgrid.v1 import jobs_pb2_grpc, registry_pb2_grpc
from services.common.server import RunningServer, create_server
from services.registry.artifacts import ArtifactStore
from services.registry.config import RegistryConfig
from services.registry.db import RegistryDB
from services.registry.job_db import JobDB
from services.registry.job_servicer import JobStoreServicer
from services.registry.keys import ApiKeys, KeyStore
from services.registry.records import Limits
from services.registry.registry import Registry
from services.registry.servicer import RegistryServicer

log = logging.getLogger(__name__)

SERVICE_NAME = "modelgrid.v1.Registry"
JOBS_SERVICE_NAME = "modelgrid.v1.JobStore"


@dataclass
class RegistryServer(RunningServer):
    """A running registry: the gRPC server plus the Registry behind it; stop() also closes the database."""

    registry: Registry | None = None

    async def stop(self, grace: float) -> None:
        await super().stop(grace)
        if self.registry is not None:
            await asyncio.to_thread(self.registry.db.close)


def build_registry(config: RegistryConfig) -> Registry:
    store = ArtifactStore(config.artifacts_dir)
    store.clean_stale_uploads()
    db = RegistryDB(config.database_url())
    return Registry(db, store, Limits(config.max_upload_bytes, config.max_upload_files), CHUNK_BYTES)


async def start_registry(config: RegistryConfig) -> RegistryServer:
    """Open the database, create tables, and serve on config.listen (port 0 = any free port)."""
    registry = await asyncio.to_thread(build_registry, config)
    try:
        keys = ApiKeys(await asyncio.to_thread(KeyStore, registry.db))
        await asyncio.to_thread(keys.bootstrap, config.bootstrap_api_key)
        jobs = JobStoreServicer(await asyncio.to_thread(JobDB, registry.db))
    except BaseException:
        registry.db.close()
        raise
    servicer = RegistryServicer(registry, keys)

    def add(server: grpc.aio.Server) -> None:
        registry_pb2_grpc.add_RegistryServicer_to_server(servicer, server)
        jobs_pb2_grpc.add_JobStoreServicer_to_server(jobs, server)

    try:
        running = await create_server(config.listen, add, [SERVICE_NAME, JOBS_SERVICE_NAME], "registry")
    except BaseException:
        registry.db.close()
        raise
    log.info("registry listening on port %d, artifacts in %s", running.port, registry.store.root)
    return RegistryServer(
        server=running.server,
        port=running.port,
        health=running.health,
        service_names=running.service_names,
        registry=registry,
    )
