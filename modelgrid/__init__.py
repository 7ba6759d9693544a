"""ModelGrid client SDK. Imports without torch: the model code lives in modelgrid.model.

    import modelgrid

    with modelgrid.Client("localhost:50051") as client:
        print(client.generate_text("demo", prompt="hello", max_tokens=8).text)
"""

from modelgrid import errors
from modelgrid.aio import AsyncClient
from modelgrid.client import Client
from modelgrid.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ModelGridError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from modelgrid.types import (
    Completion,
    GenerateChunk,
    ModelInfo,
    Placement,
    PlacedStage,
    Replica,
    Usage,
    VersionInfo,
    WorkerInfo,
)

__all__ = [
    "Client", "AsyncClient", "errors",
    "ModelGridError", "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition", "ResourceExhausted",
    "Unavailable", "Aborted", "Unauthenticated", "PermissionDenied", "DeadlineExceeded", "Cancelled",
    "Completion", "GenerateChunk", "ModelInfo", "VersionInfo", "Placement", "PlacedStage", "Replica", "Usage",
    "WorkerInfo",
]
