"""Plain records the registry's domain code passes around (no SQLAlchemy, no protobuf)."""

from __future__ import annotations

from dataclasses import dataclass, field

LATEST = "latest"  # the alias the registry keeps on the newest version of every model


@dataclass(frozen=True)
class FileEntry:
    """One file of a version, as declared by the uploader and verified on receipt."""

    path: str  # a plain name inside the version's directory, e.g. "model.safetensors"
    size: int
    sha256: str  # lower-case hex


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are in a stored safetensors file."""

    file: str  # name of the .safetensors file in the version's directory
    dtype: str  # torch dtype name without "torch.": "float32", "bfloat16", ...
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the tensor's data in the file
    end: int  # exclusive
    sha256: str  # lower-case hex of the tensor's bytes

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class VersionFacts:
    """What registration learns from a validated checkpoint."""

    architecture: str
    kind: str  # "decoder" | "encoder"
    num_layers: int
    layer_bytes: list[int]  # bytes of each transformer layer, in the checkpoint's dtype
    embed_bytes: int
    head_bytes: int
    kv_bytes_per_token_per_layer: int  # in the checkpoint's dtype; 0 for encoders
    vocab_size: int
    max_context: int
    config_json: str  # config.json, verbatim
    files: list[FileEntry]
    tensors: dict[str, TensorEntry]  # every tensor of every safetensors file


@dataclass(frozen=True)
class VersionRecord:
    """A registered version as stored (without its tensor manifest)."""

    model: str
    version: str  # "v1", "v2", ...
    number: int  # 1, 2, ...: the order of registration
    architecture: str
    kind: str
    num_layers: int
    layer_bytes: list[int]
    embed_bytes: int
    head_bytes: int
    kv_bytes_per_token_per_layer: int
    vocab_size: int
    max_context: int
    config_json: str
    files: list[FileEntry]
    aliases: list[str]  # aliases that point at it now, "latest" included
    created_unix_ms: int


@dataclass(frozen=True)
class ModelRecord:
    name: str
    replicas: int
    num_stages: int  # 0 = the scheduler chooses
    versions: list[VersionRecord]  # oldest first
    aliases: dict[str, str]  # alias -> version, "latest" included
    created_unix_ms: int


@dataclass(frozen=True)
class Deployment:
    """A version the scheduler should keep placed (an alias points at it)."""

    version: VersionRecord
    replicas: int
    num_stages: int


@dataclass(frozen=True)
class UploadHeader:
    """The first message of an upload: what is registered and which files follow."""

    model: str
    aliases: list[str]
    replicas: int  # 0 keeps the model's value (1 for a new model)
    num_stages: int  # 0 keeps the model's value (auto for a new model)
    files: list[FileEntry]


@dataclass(frozen=True)
class FilePart:
    """A piece of one uploaded file."""

    path: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class TensorPiece:
    """A chunk of one tensor for FetchTensors; sha256 is set on the tensor's last piece only."""

    name: str
    entry: TensorEntry
    offset: int  # within the tensor
    data: bytes
    sha256: str = ""


@dataclass(frozen=True)
class Limits:
    """Bounds on one upload."""

    max_bytes: int
    max_files: int


@dataclass
class Manifest:
    """What FetchTensors / FetchFile need of a version: its files and tensors."""

    model: str
    version: str
    files: list[FileEntry]
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
