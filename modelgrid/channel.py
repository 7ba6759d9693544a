"""gRPC channel settings shared by every server and client of ModelGrid."""

from __future__ import annotations

import grpc

# One finite max message size for servers and channels alike. Tensors above it travel chunked.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Chunk size for streamed tensors and files: well under MAX_MESSAGE_BYTES.
CHUNK_BYTES = 4 * 1024 * 1024

# Channels ping their connection this often, and drop it when a ping goes unanswered this long: the only way
# to find a peer that hangs without closing anything (a stopped process, a paused VM), whose calls would
# otherwise wait for their deadlines. A ping is a few bytes; servers allow them (SERVER_OPTIONS).
KEEPALIVE_MS = 5_000
KEEPALIVE_TIMEOUT_MS = 5_000

GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # since grpc/grpc#34647 the wait for a ping's answer is this one (default 60 s), not keepalive_timeout_ms
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# Servers must accept those pings: by default a server allows one ping per 5 minutes on a connection
# without data and, after two early ones, closes it with GOAWAY "too_many_pings" (seen in CI logs).
SERVER_OPTIONS: list[tuple[str, int]] = [
    *GRPC_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
]


def aio_channel(address: str) -> grpc.aio.Channel:
    """A persistent insecure asyncio channel with ModelGrid's options."""
    return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)


def sync_channel(address: str) -> grpc.Channel:
    """A persistent insecure blocking channel with ModelGrid's options."""
    return grpc.insecure_channel(address, options=GRPC_OPTIONS)
