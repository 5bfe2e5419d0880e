"""The coordinators an HTTP tier sends its requests to, over one gRPC channel each."""

from __future__ import annotations

import itertools

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.config import HttpSettings
from specdec.v1 import generation_pb2_grpc
from specdec.wire.rpc import channel_credentials, message_options

HEALTH_TIMEOUT_S = 1.0


class CoordinatorPool:
    """Requests take the coordinators in turn; `in_turn` also names the others, for a request that finds its
    first choice unavailable before any output."""

    def __init__(self, settings: HttpSettings):
        credentials, options = channel_credentials(settings), message_options(settings)
        self.addrs = list(settings.coordinator_addrs)
        self.channels = [grpc.aio.secure_channel(addr, credentials, options) if credentials
                         else grpc.aio.insecure_channel(addr, options) for addr in self.addrs]
        self.stubs = [generation_pb2_grpc.GenerationStub(channel) for channel in self.channels]
        self._turn = itertools.count()

    def in_turn(self) -> list[generation_pb2_grpc.GenerationStub]:
        first = next(self._turn) % len(self.stubs)
        return self.stubs[first:] + self.stubs[:first]

    async def any_serving(self) -> bool:
        for channel in self.channels:
            try:
                response = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                continue
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return True
        return False

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
