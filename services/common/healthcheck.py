"""Container health probe: `python -m services.common.healthcheck HOST:PORT [--service NAME]`.

Asks grpc.health.v1 on HOST:PORT and exits 0 when the answer is SERVING, 1 otherwise (NOT_SERVING,
unknown service, no answer within the timeout). docker-compose healthchecks run it inside each
container; Kubernetes uses its native gRPC probes instead. It imports grpc only (never torch), so
a probe costs a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 3.0) -> str:
    """The serving status name of service on address ("SERVING", "NOT_SERVING", ...) or the RPC error code."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Exit 0 if the gRPC server at ADDRESS reports SERVING, else 1.")
    parser.add_argument("address", help="host:port of the gRPC server, e.g. 127.0.0.1:50051")
    parser.add_argument("--service", default="", help="service name to check (default: the whole server)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="seconds to wait for an answer")
    args = parser.parse_args(argv)
    status = check(args.address, args.service, args.timeout_s)
    if status == "SERVING":
        return 0
    print(f"{args.address} {args.service or '(server)'}: {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
