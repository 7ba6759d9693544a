"""Registry rules on names and upload headers (pure functions)."""

from __future__ import annotations

import pytest

from modelgrid.errors import InvalidArgument, ResourceExhausted
from services.registry.config import RegistryConfig
from services.registry.records import FileEntry, Limits, UploadHeader
from services.registry.validation import check_alias, check_file_path, check_header, check_model_name

SHA = "ab" * 32
LIMITS = Limits(max_bytes=10_000, max_files=8)


def header(files: list[FileEntry] | None = None, **kw: object) -> UploadHeader:
    files = files if files is not None else [
        FileEntry("config.json", 10, SHA), FileEntry("model.safetensors", 100, SHA), FileEntry("tokenizer.json", 5, SHA)
    ]
    return UploadHeader(**{"model": "tiny", "aliases": [], "replicas": 0, "num_stages": 0, "files": files, **kw})


@pytest.mark.parametrize("name", ["a", "llama-3-8b", "qwen2.5-0.5b", "m_1", "0" * 64])
def test_good_model_names(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a..b", "..", "Llama", "-a", ".a", "a" * 65, "a b", "ä"])
def test_bad_model_names(name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid model name"):
        check_model_name(name)


def test_aliases() -> None:
    assert check_alias("prod") == "prod"
    for bad in ("v1", "v23", "Prod", "a/b", ""):
        with pytest.raises(InvalidArgument):
            check_alias(bad)
    assert check_alias("v1beta") == "v1beta"


@pytest.mark.parametrize("path", ["config.json", "model-00001-of-00002.safetensors", "merges.txt", "spiece.model"])
def test_good_paths(path: str) -> None:
    assert check_file_path(path) == path


@pytest.mark.parametrize("path", ["../config.json", "/etc/passwd", "sub/config.json", "a\\b", ".hidden", "", "a..b",
                                  "..", "x\x00y"])
def test_bad_paths(path: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid file path"):
        check_file_path(path)


def test_header_normalised() -> None:
    h = check_header(header(aliases=["prod", "latest", "prod"]), LIMITS)
    assert h.aliases == ["prod"]  # "latest" is implied, duplicates dropped
    upper = check_header(header([FileEntry("config.json", 1, SHA.upper()), FileEntry("m.safetensors", 1, SHA)]), LIMITS)
    assert upper.files[0].sha256 == SHA


@pytest.mark.parametrize(
    "files, message",
    [
        ([], "lists no files"),
        ([FileEntry("config.json", 1, SHA), FileEntry("pytorch_model.bin", 1, SHA)], "pickled weights are refused"),
        ([FileEntry("config.json", 1, SHA), FileEntry("m.safetensors", 1, SHA), FileEntry("x.pt", 1, SHA)],
         "pickled weights are refused"),
        ([FileEntry("config.json", 1, SHA), FileEntry("tokenizer.json", 1, SHA)], "no \\*.safetensors"),
        ([FileEntry("m.safetensors", 1, SHA)], "no config.json"),
        ([FileEntry("config.json", 1, SHA), FileEntry("config.json", 1, SHA)], "listed twice"),
        ([FileEntry("config.json", -1, SHA)], "negative size"),
        ([FileEntry("config.json", 1, "xyz")], "64 hex digits"),
    ],
)
def test_bad_headers(files: list[FileEntry], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_header(header(files), LIMITS)


def test_header_limits() -> None:
    big = [FileEntry("config.json", 1, SHA), FileEntry("model.safetensors", 20_000, SHA)]
    with pytest.raises(ResourceExhausted, match="--max-upload-bytes"):
        check_header(header(big), LIMITS)
    many = [FileEntry("config.json", 1, SHA)] + [FileEntry(f"f{i}.safetensors", 1, SHA) for i in range(8)]
    with pytest.raises(ResourceExhausted, match="--max-upload-files"):
        check_header(header(many), LIMITS)
    with pytest.raises(InvalidArgument, match="replicas"):
        check_header(header(replicas=-1), LIMITS)
    with pytest.raises(InvalidArgument, match="num_stages"):
        check_header(header(num_stages=-2), LIMITS)


def test_config_defaults_and_validation(tmp_path) -> None:
    from services.common.settings import parse_settings

    config = parse_settings(RegistryConfig, [], environ={})
    assert (config.listen, config.metrics_port, config.max_upload_bytes) == ("0.0.0.0:50052", 9092, 64 * 1024**3)
    config = parse_settings(RegistryConfig, ["--data-dir", str(tmp_path)], environ={"MODELGRID_DB_URL": ""})
    assert config.database_url() == f"sqlite:///{tmp_path.resolve() / 'registry.db'}"
    assert config.artifacts_dir == tmp_path / "artifacts"
    env = {"MODELGRID_REGISTRY_LISTEN": "127.0.0.1:7", "MODELGRID_DB_URL": "postgresql+psycopg://u@h/db"}
    config = parse_settings(RegistryConfig, [], environ=env)
    assert (config.listen, config.database_url()) == ("127.0.0.1:7", "postgresql+psycopg://u@h/db")
    for bad in (RegistryConfig(listen="nowhere"), RegistryConfig(max_upload_bytes=0), RegistryConfig(db_url="x.db")):
        with pytest.raises(ValueError):
            bad.validate()
