"""RegistryServicer: each RPC parses its request, calls the Registry, and builds the reply."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc

from modelgrid.errors import ModelGridError
from modelgrid.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.common.rpc import rpc
from services.registry import convert
from services.registry.keys import ApiKeys, KeyStore
from services.registry.registry import Registry

log = logging.getLogger(__name__)

# A refused upload reads what the client still sends, up to this long, before it answers (see _drain).
UPLOAD_DRAIN_S = 30.0


async def _drain(requests: AsyncIterator[object], seconds: float) -> None:
    """Read the rest of a client stream, for at most `seconds`. When a server ends a client-streaming call
    while an asyncio client is still writing, grpc.aio may report INTERNAL "Internal error from Core" to that
    client instead of the server's status (grpc/grpc#36066); the gateway proxies uploads with such a client,
    so a refused upload would reach the user as INTERNAL now and then. Answering after the client's last
    message sidesteps it; the bound keeps a slow or endless client from holding the call."""
    try:
        async with asyncio.timeout(seconds):
            async for _ in requests:
                pass
    except TimeoutError:
        log.info("a refused upload was still sending after %.0f s; answering it now", seconds)
    except grpc.aio.AioRpcError:
        pass  # the client went away: nobody to answer


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, registry: Registry, keys: ApiKeys | None = None) -> None:
        self.registry = registry
        self.keys = keys if keys is not None else ApiKeys(KeyStore(registry.db))

    @rpc
    async def UploadVersion(
        self, requests: AsyncIterator[common_pb2.UploadVersionChunk], context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelVersion:
        try:
            record = await self.registry.upload(convert.upload_parts(requests))
        except ModelGridError:
            await _drain(requests, UPLOAD_DRAIN_S)
            raise
        return convert.version_to_proto(record)

    @rpc
    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        models = await self.registry.list_models()
        return common_pb2.ListModelsResponse(models=[convert.model_to_proto(m) for m in models])

    @rpc
    async def GetModel(
        self, request: common_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Model:
        return convert.model_to_proto(await self.registry.get_model(request.name))

    @rpc
    async def ResolveVersion(
        self, request: registry_pb2.ResolveVersionRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelVersion:
        return convert.version_to_proto(await self.registry.resolve(request.model, request.version))

    @rpc
    async def SetAlias(
        self, request: common_pb2.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelVersion:
        record = await self.registry.set_alias(request.model, request.alias, request.version)
        return convert.version_to_proto(record)

    @rpc
    async def SetReplicas(
        self, request: common_pb2.SetReplicasRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Model:
        return convert.model_to_proto(await self.registry.set_replicas(request.model, request.replicas))

    @rpc
    async def ListDeployments(
        self, request: registry_pb2.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListDeploymentsResponse:
        deployments = await self.registry.list_deployments()
        return registry_pb2.ListDeploymentsResponse(deployments=[convert.deployment_to_proto(d) for d in deployments])

    @rpc
    async def FetchTensors(
        self, request: registry_pb2.FetchTensorsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.TensorChunk]:
        async for piece in self.registry.fetch_tensors(request.model, request.version, list(request.names)):
            yield convert.tensor_chunk(piece)

    @rpc
    async def FetchFile(
        self, request: registry_pb2.FetchFileRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.FileChunk]:
        async for offset, data in self.registry.fetch_file(request.model, request.version, request.path):
            yield convert.file_chunk(request.path, offset, data)

    # ---- API keys (services/registry/keys.py) ------------------------------------------------

    @rpc
    async def CreateKey(
        self, request: common_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.CreateKeyResponse:
        record, secret = await self.keys.create(request.name, request.admin, convert.key_limits(request.limits))
        return common_pb2.CreateKeyResponse(key=convert.key_to_proto(record), secret=secret)

    @rpc
    async def ListKeys(
        self, request: common_pb2.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListKeysResponse:
        records = await self.keys.list(request.include_revoked)
        return common_pb2.ListKeysResponse(keys=[convert.key_to_proto(k) for k in records])

    @rpc
    async def RevokeKey(
        self, request: common_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ApiKey:
        return convert.key_to_proto(await self.keys.revoke(request.key))

    @rpc
    async def VerifyKey(
        self, request: registry_pb2.VerifyKeyRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ApiKey:
        return convert.key_to_proto(await self.keys.verify(request.secret))
