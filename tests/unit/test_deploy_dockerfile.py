"""The Dockerfile and .dockerignore agree with the repository: sources, torch pin, user, command."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from functools import cache
from pathlib import Path

import pytest

from tests.unit.test_deploy_contract import ROOT, module_file, python_module

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


@cache
def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def dockerfile_args() -> dict[str, str | None]:
    """ARG name -> default (None when it has none)."""
    out: dict[str, str | None] = {}
    for word, rest in instructions():
        if word == "ARG":
            name, sep, default = rest.partition("=")
            out[name.strip()] = default.strip().strip('"') if sep else None
    return out


def copy_sources() -> list[str]:
    """The build-context paths COPY/ADD take (not those copied from other stages)."""
    sources = []
    for word, rest in instructions():
        if word not in ("COPY", "ADD"):
            continue
        if rest.startswith("["):
            parts = json.loads(rest)
        else:
            parts = rest.split()
        if any(p.startswith("--from") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        assert len(parts) >= 2, f"{word} {rest}: needs sources and a destination"
        sources += parts[:-1]
    return sources


def dockerfile_uid() -> int:
    """The numeric uid the image runs as (the last USER)."""
    users = [rest for word, rest in instructions() if word == "USER"]
    assert users, "the Dockerfile never switches away from root (no USER)"
    user = users[-1].split(":")[0]
    assert user.isdigit(), f"USER {user}: use a numeric uid so Kubernetes' runAsNonRoot can verify it"
    return int(user)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def ignored(path: str, patterns: list[str] | None = None) -> bool:
    """Whether the build context leaves path out (the last matching pattern wins; ! re-includes)."""
    patterns = dockerignore_patterns() if patterns is None else patterns
    parts = path.strip("/").split("/")
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = _pattern_regex(pattern.lstrip("!").strip().strip("/"))
        if any(rx.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            result = not negate
    return result


# ---------------------------------------------------------------- tests


def test_base_image_is_a_build_argument_defaulting_to_slim_python() -> None:
    args = dockerfile_args()
    assert args.get("BASE_IMAGE") == "python:3.11-slim"
    first_from = next(i for i, (word, _) in enumerate(instructions()) if word == "FROM")
    assert any(word == "ARG" and rest.startswith("BASE_IMAGE") for word, rest in instructions()[:first_from])
    froms = [rest.split()[0] for word, rest in instructions() if word == "FROM"]
    assert froms and all(f in ("${BASE_IMAGE}", "$BASE_IMAGE") for f in froms), froms


def test_torch_comes_from_the_chosen_index_at_the_pinned_version() -> None:
    args = dockerfile_args()
    pins = [d for d in pyproject()["project"]["dependencies"] if re.match(r"torch\s*==", d)]
    assert len(pins) == 1, f"pyproject.toml should pin torch once, got {pins}"
    assert args.get("TORCH_VERSION") == pins[0].split("==")[1].strip(), "TORCH_VERSION must equal the pyproject pin"
    assert (args.get("TORCH_INDEX_URL") or "").startswith("https://download.pytorch.org/whl/cpu")
    runs = [rest for word, rest in instructions() if word == "RUN"]
    torch_runs = [i for i, r in enumerate(runs) if re.search(r"torch==\$\{?TORCH_VERSION", r)]
    assert torch_runs, "no RUN installs torch==${TORCH_VERSION}"
    assert re.search(r"--index-url\s+\"?\$\{?TORCH_INDEX_URL", runs[torch_runs[0]]), "torch must use TORCH_INDEX_URL"
    package_runs = [i for i, r in enumerate(runs) if re.search(r"pip install (\S+ )*\.(\s|$)", r)]
    assert package_runs, "no RUN does `pip install .`"
    assert torch_runs[0] < package_runs[0], "install torch before the package, so the pin is already satisfied"


def test_copied_sources_exist_are_in_the_context_and_cover_the_package() -> None:
    sources = copy_sources()
    assert "." not in sources and "./" not in sources, "copy what the build needs, not the whole context"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file or directory in the repository"
        assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
        assert not source.endswith(WEIGHT_SUFFIXES), f"COPY {source}: no weights in the image"
    assert "pyproject.toml" in sources
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in include)
    ]
    assert packages, "pyproject's packages.find matches no package"
    copied_top = {Path(s).parts[0] for s in sources}
    for package in packages:
        assert package in copied_top, f"package {package}/ is installed by pyproject.toml but not copied"
    readme = pyproject()["project"].get("readme")
    if isinstance(readme, str) and (ROOT / readme).exists():
        assert readme in sources, f"pyproject.toml names {readme}: copy it too"
    words = [word for word, _ in instructions()]
    last_copy = max(i for i, w in enumerate(words) if w in ("COPY", "ADD"))
    package_run = next(
        i for i, (w, r) in enumerate(instructions()) if w == "RUN" and re.search(r"pip install (\S+ )*\.(\s|$)", r)
    )
    assert last_copy < package_run, "`pip install .` must come after the sources are copied"


def test_runs_as_a_non_root_user() -> None:
    assert dockerfile_uid() != 0


def test_default_command_runs_an_existing_service() -> None:
    cmds = [rest for word, rest in instructions() if word == "CMD"]
    assert cmds, "no CMD"
    command = json.loads(cmds[-1])  # exec form, so SIGTERM reaches python
    parsed = python_module(command)
    assert parsed and module_file(parsed[0]), f"CMD {command}: not `python -m <existing module>`"


def test_no_weights_or_downloads_baked_in() -> None:
    for word, rest in instructions():
        assert not (word == "ADD" and "://" in rest), f"ADD {rest}: no downloads into the image"
        if word == "RUN":
            assert not re.search(r"snapshot_download|huggingface-cli|hf_hub_download|\.safetensors", rest), rest


@pytest.mark.parametrize(
    "path",
    [".venv/lib/python3.11/site.py", ".git/HEAD", "data/registry.db", "models/x/model.safetensors",
     "model.safetensors", "services/gateway/__pycache__/x.pyc", "tests/unit/test_x.py", ".pytest_cache/v"],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert ignored(path), f".dockerignore lets {path} into the build context"


@pytest.mark.parametrize(
    "path", ["pyproject.toml", "modelgrid/channel.py", "modelgrid/v1/worker_pb2.py", "services/common/healthcheck.py"]
)
def test_dockerignore_keeps_the_sources(path: str) -> None:
    assert not ignored(path), f".dockerignore leaves out {path}, which the build needs"


def test_ignore_matcher() -> None:
    assert ignored("a/b/c.bin", ["**/*.bin"]) and ignored("c.bin", ["**/*.bin"])
    assert ignored("data/x", ["data"]) and not ignored("x/data", ["data"])
    assert not ignored("data/keep", ["data", "!data/keep"])
