"""RegistryServicer: each RPC parses its request, calls the Registry, and builds the reply."""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from modelgrid.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.common.rpc import rpc
from services.registry import convert
from services.registry.keys import ApiKeys, KeyStore
from services.registry.registry import Registry


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, registry: Registry, keys: ApiKeys | None = None) -> None:
        self.registry = registry
        self.keys = keys if keys is not None else ApiKeys(KeyStore(registry.db))

    @rpc
    async def UploadVersion(
        self, requests: AsyncIterator[common_pb2.UploadVersionChunk], context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelVersion:
        record = await self.registry.upload(convert.upload_parts(requests))
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
