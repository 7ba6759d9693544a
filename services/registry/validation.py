"""Rules on names and upload headers, checked before a byte is written (pure functions)."""

from __future__ import annotations

import re

from modelgrid.errors import InvalidArgument, ResourceExhausted
from services.registry.records import LATEST, FileEntry, Limits, UploadHeader

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ALIAS_NAME = MODEL_NAME
VERSION_NAME = re.compile(r"^v[1-9][0-9]*$")
FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHT_SUFFIX = ".safetensors"
MAX_REPLICAS = 1024
MAX_STAGES = 1024


def check_model_name(name: str) -> str:
    if not MODEL_NAME.match(name) or ".." in name:
        raise InvalidArgument(
            f"invalid model name {name!r}: use 1-64 characters a-z 0-9 . _ -, starting with a letter "
            "or digit, without '..' (e.g. 'llama-3-8b')"
        )
    return name


def check_alias(alias: str) -> str:
    """An alias looks like a model name and never like a version ("v3"), so references stay unambiguous."""
    if not ALIAS_NAME.match(alias) or ".." in alias:
        raise InvalidArgument(
            f"invalid alias {alias!r}: use 1-64 characters a-z 0-9 . _ -, starting with a letter or digit "
            "(e.g. 'prod')"
        )
    if VERSION_NAME.match(alias):
        raise InvalidArgument(f"invalid alias {alias!r}: it looks like a version name; pick e.g. 'prod' or 'canary'")
    return alias


def check_replicas(replicas: int, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not low <= replicas <= MAX_REPLICAS:
        raise InvalidArgument(f"replicas must be between {low} and {MAX_REPLICAS}, got {replicas}")
    return replicas


def check_num_stages(num_stages: int) -> int:
    if not 0 <= num_stages <= MAX_STAGES:
        raise InvalidArgument(f"num_stages must be between 0 (auto) and {MAX_STAGES}, got {num_stages}")
    return num_stages


def check_file_path(path: str) -> str:
    """Upload paths are plain file names: no directories, no '..', nothing absolute, no hidden files."""
    if not FILE_NAME.match(path) or ".." in path:
        raise InvalidArgument(
            f"invalid file path {path!r} in the upload: files must be plain names inside the checkpoint "
            "directory (letters, digits, . _ + -; no '/', no '..', not hidden)"
        )
    return path


def is_weight_file(path: str) -> bool:
    return path.endswith(WEIGHT_SUFFIX) or path.endswith(PICKLE_SUFFIXES)


def check_header(header: UploadHeader, limits: Limits) -> UploadHeader:
    """Validate an upload header and return it normalised (aliases deduplicated, sha256 lower-case)."""
    check_model_name(header.model)
    aliases = []
    for alias in header.aliases:
        check_alias(alias)
        if alias != LATEST and alias not in aliases:  # "latest" follows the new version anyway
            aliases.append(alias)
    check_replicas(header.replicas, allow_zero=True)
    check_num_stages(header.num_stages)
    if not header.files:
        raise InvalidArgument("the upload header lists no files; send config.json, *.safetensors and tokenizer.json")
    if len(header.files) > limits.max_files:
        raise ResourceExhausted(
            f"the upload has {len(header.files)} files; this registry accepts at most {limits.max_files} "
            "(--max-upload-files)"
        )
    files, seen = [], set()
    for f in header.files:
        check_file_path(f.path)
        if f.path in seen:
            raise InvalidArgument(f"file {f.path!r} is listed twice in the upload header")
        seen.add(f.path)
        if f.size < 0:
            raise InvalidArgument(f"file {f.path!r} has a negative size {f.size}")
        sha = f.sha256.lower()
        if not SHA256_HEX.match(sha):
            raise InvalidArgument(f"file {f.path!r}: sha256 must be 64 hex digits, got {f.sha256!r}")
        files.append(FileEntry(f.path, f.size, sha))
    pickled = sorted(p for p in seen if p.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise InvalidArgument(
            f"pickled weights are refused ({', '.join(pickled)}): loading them can run arbitrary code. Upload "
            "safetensors only (convert with save_pretrained(dir, safe_serialization=True))"
        )
    if not any(p.endswith(WEIGHT_SUFFIX) for p in seen):
        raise InvalidArgument("the upload has no *.safetensors weights; weights must be in safetensors format")
    if "config.json" not in seen:
        raise InvalidArgument("the upload has no config.json (the Hugging Face model config)")
    total = sum(f.size for f in files)
    if total > limits.max_bytes:
        raise ResourceExhausted(
            f"the upload is {total} bytes; this registry accepts at most {limits.max_bytes} (--max-upload-bytes)"
        )
    return UploadHeader(header.model, aliases, header.replicas, header.num_stages, files)
