"""gRPC channel settings shared by every server and client of ModelGrid."""

from __future__ import annotations

import grpc

# One finite max message size for servers and channels alike. Tensors above it travel chunked.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Chunk size for streamed tensors and files: well under MAX_MESSAGE_BYTES.
CHUNK_BYTES = 4 * 1024 * 1024

# Channels between our services ping their connection this often, and drop it when a ping goes unanswered
# this long: the only way to find a peer that hangs without closing anything (a stopped process, a paused
# VM), whose calls would otherwise wait for their deadlines. Since grpc/grpc#34647 the wait for a ping's
# answer is grpc.http2.ping_timeout_ms (default 60 s); keepalive_timeout_ms alone no longer bounds it.
KEEPALIVE_MS = 5_000
KEEPALIVE_TIMEOUT_MS = 5_000
# Clients of the SDK and CLI, a worker downloading weights from the registry, and every server towards its
# callers may sit behind a slow link where a ping's answer waits behind megabytes of a transfer: they ping
# less often and wait longer.
CLIENT_KEEPALIVE_MS = 20_000
CLIENT_KEEPALIVE_TIMEOUT_MS = 20_000


def _options(keepalive_ms: int, timeout_ms: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


GRPC_OPTIONS = _options(KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS)  # channels between our services
CLIENT_OPTIONS = _options(CLIENT_KEEPALIVE_MS, CLIENT_KEEPALIVE_TIMEOUT_MS)  # the SDK's and CLI's channels

# Servers must accept the services' pings: by default a server allows one ping per 5 minutes on a connection
# without data and, after two early ones, closes it with GOAWAY "too_many_pings" (seen in CI logs).
SERVER_OPTIONS: list[tuple[str, int]] = [
    *CLIENT_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
]


def aio_channel(address: str, options: list[tuple[str, int]] = GRPC_OPTIONS) -> grpc.aio.Channel:
    """A persistent insecure asyncio channel with ModelGrid's options (between services by default)."""
    return grpc.aio.insecure_channel(address, options=options)


def sync_channel(address: str, options: list[tuple[str, int]] = GRPC_OPTIONS) -> grpc.Channel:
    """A persistent insecure blocking channel with ModelGrid's options (between services by default)."""
    return grpc.insecure_channel(address, options=options)
