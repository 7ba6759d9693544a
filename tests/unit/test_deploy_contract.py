"""What the deployment files (Dockerfile, docker-compose.yml, deploy/k8s) are checked against.

The truth is the code: each service's config dataclass (services/<name>/config.py, fields declared
with `setting(default, "ENV", help)`) says which MODELGRID_* variables the service reads and its
default ports. The helpers here read it; the tests here pin the few defaults the deployment files
rely on (the ports fixed in the team brief).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("registry", "scheduler", "worker", "gateway")

# Fixed by the team brief: every deployment file and the launcher use these.
LISTEN_ENV = {
    "gateway": "MODELGRID_GATEWAY_LISTEN",
    "registry": "MODELGRID_REGISTRY_LISTEN",
    "scheduler": "MODELGRID_SCHEDULER_LISTEN",
    "worker": "MODELGRID_WORKER_LISTEN",
}
LISTEN_PORT = {"gateway": 50051, "registry": 50052, "scheduler": 50053, "worker": 50061}
METRICS_ENV = {
    "gateway": "MODELGRID_GATEWAY_METRICS_PORT",
    "registry": "MODELGRID_REGISTRY_METRICS_PORT",
    "scheduler": "MODELGRID_SCHEDULER_METRICS_PORT",
    "worker": "MODELGRID_WORKER_METRICS_PORT",
}
METRICS_PORT = {"gateway": 9091, "registry": 9092, "scheduler": 9093, "worker": 9094}

# Settings a multi-container deployment must set for each service, whatever their defaults: the
# peers' addresses (defaults are loopback), the registry's production database and artifacts
# directory, the worker's advertised address (default 127.0.0.1:<port>, unreachable from others).
MUST_SET = {
    "registry": {"MODELGRID_DB_URL", "MODELGRID_DATA_DIR"},
    "scheduler": {"MODELGRID_REDIS_URL", "MODELGRID_REGISTRY_ADDR"},
    "worker": {"MODELGRID_WORKER_ADVERTISE", "MODELGRID_SCHEDULER_ADDR", "MODELGRID_REGISTRY_ADDR"},
    "gateway": {"MODELGRID_REGISTRY_ADDR", "MODELGRID_SCHEDULER_ADDR"},
}
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


@dataclass(frozen=True)
class Setting:
    """One field of a service's config dataclass."""

    field: str
    env: str
    default: Any  # dataclasses.MISSING when the field has none


def _settings_of(cls: type) -> list[Setting]:
    out = []
    for f in dataclasses.fields(cls):
        if "env" not in f.metadata:
            continue
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        out.append(Setting(f.name, f.metadata["env"], default))
    return out


@functools.cache
def service_settings(service: str) -> dict[str, Setting]:
    """The settings of services/<service>/config.py by environment variable name.

    The config dataclass is found by scanning the module for dataclasses whose fields carry an
    "env" metadata (preferring those defined in the module itself).
    """
    if not (ROOT / "services" / service / "config.py").exists():
        pytest.fail(f"services/{service}/config.py does not exist")
    module = importlib.import_module(f"services.{service}.config")
    classes = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and dataclasses.is_dataclass(obj)
        and any("env" in f.metadata for f in dataclasses.fields(obj))
    ]
    own = [cls for cls in classes if cls.__module__ == module.__name__]
    classes = own or classes
    assert classes, f"services/{service}/config.py has no dataclass with setting(...) fields"
    settings: dict[str, Setting] = {}
    for cls in classes:
        for s in _settings_of(cls):
            settings[s.env] = s
    return settings


def settings_by_field(service: str) -> dict[str, Setting]:
    return {s.field: s for s in service_settings(service).values()}


def effective(service: str, env: Mapping[str, str], env_name: str) -> Any:
    """The value the service runs with: the environment's if set, else the dataclass default."""
    if env_name in env:
        return env[env_name]
    settings = service_settings(service)
    assert env_name in settings, f"services/{service}/config.py has no setting for {env_name}"
    return settings[env_name].default


def port_of(address: str) -> int:
    """The port of "host:port"."""
    host, sep, port = str(address).rpartition(":")
    assert sep and port.isdigit(), f"{address!r} is not host:port"
    return int(port)


def host_of(address: str) -> str:
    return str(address).rpartition(":")[0]


def listen_port(service: str, env: Mapping[str, str]) -> int:
    return port_of(effective(service, env, LISTEN_ENV[service]))


def metrics_port(service: str, env: Mapping[str, str]) -> int:
    return int(effective(service, env, METRICS_ENV[service]))


# How many times grace_s a SIGTERM may take: the worker first waits up to grace_s for open sessions
# (serve_forever's on_stop=app.drain(grace_s)), then the server drains calls for up to grace_s.
DRAIN_PHASES = {"worker": 2}
# Time to exit after the drain (closing clients, flushing logs) before the orchestrator's SIGKILL.
EXIT_MARGIN_S = 5.0


def grace_s(service: str, env: Mapping[str, str]) -> float | None:
    """The SIGTERM drain the service runs with (its `grace_s` field), or None if it has none."""
    by_field = settings_by_field(service)
    if "grace_s" not in by_field:
        return None
    return float(effective(service, env, by_field["grace_s"].env))


def stop_budget_s(service: str, env: Mapping[str, str]) -> float | None:
    """Seconds a container needs between SIGTERM and SIGKILL to drain fully, or None if it has no grace."""
    grace = grace_s(service, env)
    if grace is None:
        return None
    return DRAIN_PHASES.get(service, 1) * grace + EXIT_MARGIN_S


def problems_with_env(service: str, env: Mapping[str, str], where: str) -> list[str]:
    """Why the MODELGRID_* variables set for a container of `service` are wrong (empty when right).

    Every variable must be read by the service's config dataclass; settings without a default,
    the MUST_SET ones, and those whose default points at loopback (other containers are not on
    the same loopback) must be set.
    """
    settings = service_settings(service)
    out = []
    for name in env:
        if name.startswith("MODELGRID_") and name not in settings:
            out.append(f"{where}: sets {name}, which services/{service}/config.py does not read")
    for s in settings.values():
        if s.env in env:
            continue
        if s.default is dataclasses.MISSING:
            out.append(f"{where}: {s.env} has no default in services/{service}/config.py and is not set")
        elif s.env in MUST_SET[service]:
            out.append(f"{where}: {s.env} must be set for {service} (default {s.default!r} is for one machine)")
        elif isinstance(s.default, str) and any(lo in s.default for lo in LOOPBACK):
            out.append(f"{where}: {s.env} is not set and its default {s.default!r} is loopback")
    for name in MUST_SET[service] - set(env):
        if name not in settings:
            out.append(f"{where}: {name} must be set, and services/{service}/config.py does not even read it")
    return sorted(set(out))


def python_module(command: Sequence[str] | None) -> tuple[str, list[str]] | None:
    """("services.x", [args...]) for a `python -m services.x args...` command, else None."""
    if not command or isinstance(command, str):
        return None
    argv = [str(a) for a in command]
    if not re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", argv[0]) or "-m" not in argv:
        return None
    i = argv.index("-m")
    return argv[i + 1], argv[i + 2 :]


def module_file(module: str) -> Path | None:
    """The file `python -m module` runs from this repository, or None if there is none."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base / "__main__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def assert_modules_exist(modules: set[str], where: str) -> None:
    """Fail for a `python -m` module that does not exist."""
    missing = sorted(m for m in modules if module_file(m) is None)
    assert not missing, f"{where} runs `python -m` on modules that do not exist: {missing}"


def service_of(module: str) -> str | None:
    """"gateway" for "services.gateway"; None for other modules."""
    parts = module.split(".")
    if len(parts) == 2 and parts[0] == "services" and parts[1] in SERVICES:
        return parts[1]
    return None


# ---------------------------------------------------------------- the contract the files rely on


@pytest.mark.parametrize("service", SERVICES)
def test_config_reads_the_listen_and_metrics_ports_of_the_brief(service: str) -> None:
    settings = service_settings(service)
    assert LISTEN_ENV[service] in settings, f"services/{service}/config.py does not read {LISTEN_ENV[service]}"
    assert port_of(settings[LISTEN_ENV[service]].default) == LISTEN_PORT[service]
    assert METRICS_ENV[service] in settings, f"services/{service}/config.py does not read {METRICS_ENV[service]}"
    assert int(settings[METRICS_ENV[service]].default) == METRICS_PORT[service]


@pytest.mark.parametrize("service", SERVICES)
def test_config_reads_what_deployments_must_set(service: str) -> None:
    missing = MUST_SET[service] - set(service_settings(service))
    assert not missing, f"services/{service}/config.py does not read {sorted(missing)}"


def test_problems_with_env_catches_unknown_and_missing_variables() -> None:
    service = "worker"
    good = {name: "x:1" for name in MUST_SET[service]}
    assert not any("NO_SUCH" in p or "ADVERTISE" in p for p in problems_with_env(service, good, "here"))
    bad = problems_with_env(service, {**good, "MODELGRID_NO_SUCH_SETTING": "1"}, "here")
    assert any("MODELGRID_NO_SUCH_SETTING" in p for p in bad)
    missing = problems_with_env(service, {k: v for k, v in good.items() if k != "MODELGRID_WORKER_ADVERTISE"}, "here")
    assert any("MODELGRID_WORKER_ADVERTISE" in p for p in missing)


def test_python_module_and_module_file() -> None:
    assert python_module(["python", "-m", "services.gateway"]) == ("services.gateway", [])
    assert python_module(["/opt/venv/bin/python3", "-m", "services.common.healthcheck", "a:1"]) == (
        "services.common.healthcheck",
        ["a:1"],
    )
    assert python_module(["redis-server", "--appendonly", "yes"]) is None
    assert module_file("services.common.healthcheck") == ROOT / "services" / "common" / "healthcheck.py"
    assert module_file("services.nope") is None
