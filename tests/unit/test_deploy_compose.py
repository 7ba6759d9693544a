"""docker-compose.yml agrees with the code: modules, MODELGRID_* variables, ports, health, volumes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.unit.test_deploy_contract import (
    ROOT,
    assert_modules_exist,
    host_of,
    listen_port,
    port_of,
    problems_with_env,
    python_module,
    service_of,
    stop_budget_s,
)
from tests.unit.test_deploy_dockerfile import dockerfile_args

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_DEFAULT_STOP_GRACE_S = 10.0
URL_DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "postgresql": 5432, "postgres": 5432}
IMAGE_PORTS = {"redis": 6379, "postgres": 5432}  # by image name


def interpolate(value: Any) -> Any:
    """Resolve compose's ${VAR:-default} / ${VAR-default} / ${VAR} / $$ as with an empty environment."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if not isinstance(value, str):
        return value
    pattern = r"\$\$|\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}|\$[A-Za-z_][A-Za-z0-9_]*"
    return re.sub(pattern, lambda m: "$" if m.group(0) == "$$" else (m.group(1) or ""), value)


def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    with path.open() as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), f"{path}: no services"
    return interpolate(data)


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def parse_duration_s(text: str | int | float) -> float:
    """Compose durations: "45s", "1m30s", "500ms", or a bare number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def modelgrid_services(compose: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """compose service name -> (ModelGrid service, definition), for the ones running `python -m services.<x>`."""
    out = {}
    for name, svc in compose["services"].items():
        parsed = python_module(svc.get("command"))
        if parsed and service_of(parsed[0]):
            out[name] = (service_of(parsed[0]), svc)
    return out


def port_of_compose_service(compose: dict[str, Any], name: str) -> int:
    """The port a compose service listens on: its ModelGrid listen port, or its image's well-known one."""
    mg = modelgrid_services(compose)
    if name in mg:
        service, svc = mg[name]
        return listen_port(service, environment(svc))
    image = compose["services"][name].get("image", "")
    for prefix, port in IMAGE_PORTS.items():
        if image.split("/")[-1].startswith(prefix + ":") or image == prefix:
            return port
    raise AssertionError(f"do not know the port of compose service {name!r} (image {image!r})")


def peers(env: dict[str, str], services: set[str]) -> list[tuple[str, str, int]]:
    """(variable, compose service, port) for every value that dials another compose service."""
    out = []
    for key, value in env.items():
        if not key.startswith("MODELGRID_"):
            continue
        if "://" in value:
            url = urlsplit(value)
            if url.hostname in services:
                out.append((key, url.hostname, url.port or URL_DEFAULT_PORTS[url.scheme.split("+")[0]]))
        elif re.fullmatch(r"[A-Za-z0-9.-]+:\d+", value) and host_of(value) in services:
            out.append((key, host_of(value), port_of(value)))
    return out


# ---------------------------------------------------------------- structure


def test_compose_parses_and_has_every_part(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for needed in ("redis", "postgres"):
        assert needed in services, f"docker-compose.yml has no {needed} service"
    kinds = sorted(s for s, _ in modelgrid_services(compose).values())
    for service in ("registry", "scheduler", "gateway"):
        assert kinds.count(service) == 1, f"expected one {service} in docker-compose.yml, got {kinds.count(service)}"
    default_workers = [
        n for n, (s, svc) in modelgrid_services(compose).items() if s == "worker" and not svc.get("profiles")
    ]
    assert len(default_workers) == 2, f"expected two workers without a profile, got {default_workers}"


def test_every_command_runs_an_existing_module(compose: dict[str, Any]) -> None:
    modules = set()
    for name, svc in compose["services"].items():
        for command in (svc.get("command"), (svc.get("healthcheck") or {}).get("test", [])[1:]):
            parsed = python_module(command)
            if parsed:
                modules.add(parsed[0])
    assert_modules_exist(modules, "docker-compose.yml")


def test_modelgrid_services_are_configured_only_through_env_they_read(compose: dict[str, Any]) -> None:
    problems = []
    for name, (service, svc) in modelgrid_services(compose).items():
        _module, args = python_module(svc["command"])
        if args:
            problems.append(f"{name}: configure through MODELGRID_* environment variables, not flags {args}")
        problems += problems_with_env(service, environment(svc), f"docker-compose.yml {name}")
    assert not problems, "\n".join(problems)


def test_all_modelgrid_services_share_one_image_per_base(compose: dict[str, Any]) -> None:
    dockerfile = dockerfile_args()
    for name, (_service, svc) in modelgrid_services(compose).items():
        assert svc.get("image"), f"{name}: give the image a name so the services share it"
        build = svc.get("build")
        assert build, f"{name}: no build section"
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (ROOT / context / "Dockerfile").is_file(), f"{name}: build context {context!r} has no Dockerfile"
        args = {} if isinstance(build, str) else (build.get("args") or {})
        unknown = set(args) - set(dockerfile)
        assert not unknown, f"{name}: build args {sorted(unknown)} are not ARGs of the Dockerfile"
    images: dict[str, set] = {}
    for name, (_service, svc) in modelgrid_services(compose).items():
        build = svc["build"]
        args = (build.get("args") or {}) if isinstance(build, dict) else {}
        images.setdefault(svc["image"], set()).add(tuple(sorted(args.items())))
    for image, variants in images.items():
        assert len(variants) == 1, f"image {image!r} is built with different args: {variants}"


# ---------------------------------------------------------------- ports, addresses, health


def test_peer_addresses_name_compose_services_on_their_ports(compose: dict[str, Any]) -> None:
    names = set(compose["services"])
    problems = []
    for name, svc in compose["services"].items():
        for key, peer, port in peers(environment(svc), names):
            expected = port_of_compose_service(compose, peer)
            if port != expected:
                problems.append(f"{name}: {key} dials {peer}:{port}, but {peer} listens on {expected}")
    assert not problems, "\n".join(problems)


def test_services_wait_for_healthy_peers(compose: dict[str, Any]) -> None:
    names = set(compose["services"])
    problems = []
    for name, svc in compose["services"].items():
        depends = svc.get("depends_on") or {}
        if isinstance(depends, list):
            problems.append(f"{name}: depends_on must use condition: service_healthy")
            continue
        for key, peer, _port in peers(environment(svc), names):
            if peer == name:
                continue
            condition = (depends.get(peer) or {}).get("condition")
            if condition != "service_healthy":
                problems.append(f"{name}: dials {peer} ({key}) but lacks depends_on {peer}: service_healthy")
        for peer in depends:
            if not compose["services"][peer].get("healthcheck"):
                problems.append(f"{name}: depends on {peer}, which has no healthcheck")
    assert not problems, "\n".join(problems)


def test_modelgrid_healthchecks_probe_grpc_health_on_the_listen_port(compose: dict[str, Any]) -> None:
    for name, (service, svc) in modelgrid_services(compose).items():
        test = (svc.get("healthcheck") or {}).get("test")
        assert isinstance(test, list) and test[0] == "CMD", f"{name}: healthcheck.test must be an exec-form CMD list"
        parsed = python_module(test[1:])
        assert parsed and parsed[0] == "services.common.healthcheck", f"{name}: run services.common.healthcheck"
        address = parsed[1][0]
        assert host_of(address) in ("127.0.0.1", "localhost"), f"{name}: the check runs in the container: 127.0.0.1"
        assert port_of(address) == listen_port(service, environment(svc)), f"{name}: healthcheck port != listen port"


def test_gateway_publishes_grpc_and_http(compose: dict[str, Any]) -> None:
    (name, (service, svc)), = [(n, v) for n, v in modelgrid_services(compose).items() if v[0] == "gateway"]
    published = {}
    for entry in svc.get("ports") or []:
        host, _, container = str(entry).rpartition(":")
        published[int(container.split("/")[0])] = host
    grpc_port = listen_port(service, environment(svc))
    assert grpc_port in published, f"{name}: gRPC port {grpc_port} not published"
    assert 8000 in published, f"{name}: HTTP port 8000 not published"


def test_workers_advertise_their_own_dns_name_and_are_distinct(compose: dict[str, Any]) -> None:
    seen_ids, seen_addresses = set(), set()
    for name, (service, svc) in modelgrid_services(compose).items():
        if service != "worker":
            continue
        env = environment(svc)
        advertise = env.get("MODELGRID_WORKER_ADVERTISE", "")
        assert host_of(advertise) == name, f"{name}: MODELGRID_WORKER_ADVERTISE={advertise!r} must be {name}:<port>"
        assert port_of(advertise) == listen_port(service, env), f"{name}: advertised port != listen port"
        worker_id = env.get("MODELGRID_WORKER_ID") or name
        assert worker_id not in seen_ids and advertise not in seen_addresses, f"{name}: worker id/address reused"
        seen_ids.add(worker_id)
        seen_addresses.add(advertise)


def test_stop_grace_period_covers_the_drain(compose: dict[str, Any]) -> None:
    for name, (service, svc) in modelgrid_services(compose).items():
        needed = stop_budget_s(service, environment(svc))
        if needed is None:
            continue
        stop = parse_duration_s(svc.get("stop_grace_period", COMPOSE_DEFAULT_STOP_GRACE_S))
        assert stop >= needed, f"{name}: stop_grace_period {stop:.0f}s < the {needed:.0f}s the {service} may drain for"


# ---------------------------------------------------------------- state, GPU


def test_state_lives_on_declared_volumes(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})

    def mounts(svc: dict[str, Any]) -> dict[str, str]:
        out = {}
        for v in svc.get("volumes") or []:
            source, target = (v.split(":")[0], v.split(":")[1]) if isinstance(v, str) else (v["source"], v["target"])
            out[target] = source
        return out

    for name, svc in compose["services"].items():
        for target, source in mounts(svc).items():
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source!r} is not declared under top-level volumes"
    for name, (service, svc) in modelgrid_services(compose).items():
        env = environment(svc)
        for key in ("MODELGRID_DATA_DIR", "MODELGRID_WORKER_CACHE_DIR"):
            if key in env:
                assert env[key] in mounts(svc), f"{name}: {key}={env[key]} is not a mounted volume"
        if service == "registry":
            assert "MODELGRID_DATA_DIR" in env, f"{name}: the registry's artifacts need MODELGRID_DATA_DIR on a volume"
    redis = compose["services"]["redis"]
    command = redis.get("command") or []
    command = command.split() if isinstance(command, str) else command
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes", "redis: appendonly yes"
    assert "/data" in mounts(redis), "redis: /data must be a volume"
    postgres = compose["services"]["postgres"]
    assert "/var/lib/postgresql/data" in mounts(postgres), "postgres: its data dir must be a volume"


def test_registry_uses_the_compose_postgres(compose: dict[str, Any]) -> None:
    (svc,) = [svc for service, svc in modelgrid_services(compose).values() if service == "registry"]
    url = urlsplit(environment(svc)["MODELGRID_DB_URL"])
    pg = environment(compose["services"]["postgres"])
    assert url.scheme == "postgresql+psycopg", "the registry talks to PostgreSQL through psycopg 3"
    assert url.hostname == "postgres"
    assert url.username == pg["POSTGRES_USER"] and url.password == pg["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == pg["POSTGRES_DB"]
    test = compose["services"]["postgres"]["healthcheck"]["test"]
    assert "pg_isready" in " ".join(test if isinstance(test, list) else [test])


def test_gpu_profile_reserves_nvidia_devices(compose: dict[str, Any]) -> None:
    gpu = {n: (s, svc) for n, (s, svc) in modelgrid_services(compose).items() if "gpu" in (svc.get("profiles") or [])}
    assert gpu and all(s == "worker" for s, _ in gpu.values()), "the gpu profile must hold GPU workers"
    cpu_images = {svc["image"] for n, (s, svc) in modelgrid_services(compose).items() if n not in gpu}
    device_ids = []
    for name, (_service, svc) in gpu.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), name
        device_ids += [i for d in devices for i in d.get("device_ids", [])]
        assert environment(svc).get("MODELGRID_DEVICE", "auto").startswith(("cuda", "auto")), f"{name}: device"
        assert svc["image"] not in cpu_images, f"{name}: GPU workers need the CUDA image, not the CPU one"
        assert {"BASE_IMAGE", "TORCH_INDEX_URL"} <= set(svc["build"].get("args") or {}), f"{name}: CUDA build args"
    assert len(device_ids) == len(set(device_ids)), f"GPU workers share a device: {device_ids}"
    for name, (service, svc) in modelgrid_services(compose).items():
        if service == "worker" and name not in gpu:
            assert environment(svc).get("MODELGRID_DEVICE") == "cpu", f"{name}: default workers run on CPU"


def test_interpolate_and_duration_helpers() -> None:
    assert interpolate("a${X:-b}c${Y-d}e${Z}f$$g") == "abcdef$g"
    assert parse_duration_s("1m30s") == 90.0 and parse_duration_s(5) == 5.0
    with pytest.raises(AssertionError):
        parse_duration_s("forever")


def _compose_cli() -> list[str] | None:
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) is None:
            continue
        probe = subprocess.run([*cli, "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return cli
    return None


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_docker_compose_config_accepts_the_file(profile: str | None) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed here; the YAML checks above still ran")
    args = [*cli, "-f", str(COMPOSE)] + (["--profile", profile] if profile else []) + ["config", "--quiet"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
