"""deploy/k8s agrees with the code and with itself: kinds, env, ports, probes, Services, GPU workers."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest
import yaml

from tests.unit.test_deploy_contract import (
    ROOT,
    assert_modules_exist,
    host_of,
    listen_port,
    metrics_port,
    port_of,
    problems_with_env,
    python_module,
    service_of,
    stop_budget_s,
)
from tests.unit.test_deploy_dockerfile import dockerfile_uid

K8S = ROOT / "deploy" / "k8s"
K8S_DEFAULT_TERMINATION_GRACE_S = 30
WEIGHT_LOADING_STARTUP_S = 600  # a worker may take this long to come up (CUDA init, big caches)
CLUSTER_NAMESPACED = {"Namespace"}  # kinds that are not namespaced, among those used here
# Pod-level settings read from elsewhere, not by the service config.
DOWNWARD = {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}


def load_manifests(directory: Path = K8S) -> dict[str, list[dict[str, Any]]]:
    """file name -> the objects in it (kustomization.yaml excluded)."""
    out = {}
    for path in sorted(directory.glob("*.y*ml")):
        if path.name in ("kustomization.yaml", "kustomization.yml"):
            continue
        with path.open() as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}: no apiVersion/kind/metadata"
            assert doc["metadata"].get("name"), f"{path.name}: {doc['kind']} without a name"
        out[path.name] = docs
    return out


@dataclass
class Container:
    """One ModelGrid container of a Deployment/StatefulSet, with its environment resolved."""

    workload: dict[str, Any]
    spec: dict[str, Any]
    service: str  # registry | scheduler | worker | gateway
    env: dict[str, str]  # MODELGRID_* and other variables, values resolved from ConfigMap/Secret

    @property
    def where(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']}"

    @property
    def pod(self) -> dict[str, Any]:
        return self.workload["spec"]["template"]

    def port(self, ref: int | str) -> int:
        if isinstance(ref, int):
            return ref
        for p in self.spec.get("ports", []):
            if p.get("name") == ref:
                return int(p["containerPort"])
        raise AssertionError(f"{self.where}: no container port named {ref!r}")


class Cluster:
    def __init__(self, manifests: dict[str, list[dict[str, Any]]]) -> None:
        self.objects = [doc for docs in manifests.values() for doc in docs]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} named {name!r}, found {len(found)}"
        return found[0]

    def config(self, name: str) -> dict[str, str]:
        return {k: str(v) for k, v in (self.named("ConfigMap", name).get("data") or {}).items()}

    def secret(self, name: str) -> dict[str, str]:
        s = self.named("Secret", name)
        assert not s.get("data"), "keep the placeholders readable in stringData"
        return {k: str(v) for k, v in (s.get("stringData") or {}).items()}

    def workloads(self) -> list[dict[str, Any]]:
        return self.of_kind("Deployment") + self.of_kind("StatefulSet")

    def containers(self) -> Iterator[Container]:
        for workload in self.workloads():
            for spec in workload["spec"]["template"]["spec"]["containers"]:
                parsed = python_module(spec.get("command"))
                if parsed and service_of(parsed[0]):
                    yield Container(workload, spec, service_of(parsed[0]), self.resolve_env(workload, spec))

    def resolve_env(self, workload: dict[str, Any], spec: dict[str, Any]) -> dict[str, str]:
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        assert not spec.get("envFrom"), f"{where}: name each variable (envFrom would pass unread MODELGRID_* ones)"
        env: dict[str, str] = {}
        for item in spec.get("env", []):
            name = item["name"]
            assert name not in env, f"{where}: {name} set twice"
            if "value" in item:
                value = str(item["value"])
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value):
                    assert ref in env, f"{where}: {name} uses $({ref}), which is not defined before it"
                env[name] = value
                continue
            source = item["valueFrom"]
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                data = self.config(ref["name"])
                assert ref["key"] in data, f"{where}: {name}: ConfigMap {ref['name']} has no key {ref['key']!r}"
                env[name] = data[ref["key"]]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                data = self.secret(ref["name"])
                assert ref["key"] in data, f"{where}: {name}: Secret {ref['name']} has no key {ref['key']!r}"
                env[name] = data[ref["key"]]
            elif "fieldRef" in source:
                env[name] = f"<{source['fieldRef']['fieldPath']}>"
            else:
                raise AssertionError(f"{where}: {name}: unsupported valueFrom {source}")
        return env

    def services_for(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Services whose selector picks pods with these labels."""
        return [
            s
            for s in self.of_kind("Service")
            if s["spec"].get("selector") and all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
        ]


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict[str, Any]]]:
    return load_manifests()


@pytest.fixture(scope="module")
def cluster(manifests: dict[str, list[dict[str, Any]]]) -> Cluster:
    return Cluster(manifests)


def worker_container(cluster: Cluster) -> Container:
    workers = [c for c in cluster.containers() if c.service == "worker"]
    assert len(workers) == 1, f"expected one worker container, got {[c.where for c in workers]}"
    return workers[0]


# ---------------------------------------------------------------- structure


def test_kustomization_lists_every_manifest(manifests: dict[str, list[dict[str, Any]]]) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization.get("resources", [])
    assert sorted(resources) == sorted(manifests), "kustomization.yaml resources must be exactly the manifests here"
    assert kustomization.get("namespace"), "kustomization.yaml should set the namespace"


def test_every_kind_is_there(cluster: Cluster) -> None:
    for kind in ("Namespace", "ConfigMap", "Secret", "PodDisruptionBudget", "PersistentVolumeClaim"):
        assert cluster.of_kind(kind), f"no {kind}"
    services = sorted(c.service for c in cluster.containers())
    assert services == ["gateway", "registry", "scheduler", "worker"], services
    deployments = {c.service for c in cluster.containers() if c.workload["kind"] == "Deployment"}
    assert {"gateway", "registry", "scheduler"} <= deployments
    assert worker_container(cluster).workload["kind"] == "StatefulSet"
    assert any(s["spec"].get("clusterIP") == "None" for s in cluster.of_kind("Service")), "no headless Service"


def test_selectors_match_their_pods(cluster: Cluster) -> None:
    for workload in cluster.workloads():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{workload['metadata']['name']}: selector does not match its pods"


def test_every_command_runs_an_existing_module(cluster: Cluster) -> None:
    modules = set()
    for workload in cluster.workloads():
        for spec in workload["spec"]["template"]["spec"]["containers"]:
            parsed = python_module(spec.get("command"))
            assert parsed or "redis" in spec["image"], f"{workload['metadata']['name']}: not `python -m ...`"
            if parsed:
                modules.add(parsed[0])
    assert_modules_exist(modules, "deploy/k8s")


# ---------------------------------------------------------------- configuration


def test_containers_set_only_variables_their_service_reads(cluster: Cluster) -> None:
    problems = []
    for c in cluster.containers():
        _module, args = python_module(c.spec["command"])
        if args or c.spec.get("args"):
            problems.append(f"{c.where}: configure through MODELGRID_* variables, not flags")
        problems += problems_with_env(c.service, c.env, f"deploy/k8s {c.where}")
        for name, value in c.env.items():
            if not name.startswith("MODELGRID_"):
                assert DOWNWARD.get(name) and value == f"<{DOWNWARD[name]}>", f"{c.where}: unexpected variable {name}"
    assert not problems, "\n".join(problems)


def test_configmap_holds_only_modelgrid_settings_someone_reads(cluster: Cluster) -> None:
    used = {k for c in cluster.containers() for k in c.env}
    for configmap in cluster.of_kind("ConfigMap"):
        for key in configmap.get("data") or {}:
            assert key.startswith("MODELGRID_"), f"ConfigMap key {key}: not a MODELGRID_* setting"
            assert key in used, f"ConfigMap key {key} is not read by any container"


def test_secret_holds_the_database_url_and_the_bootstrap_key(cluster: Cluster) -> None:
    (secret,) = cluster.of_kind("Secret")
    keys = set(secret.get("stringData") or {})
    assert {"MODELGRID_DB_URL", "MODELGRID_BOOTSTRAP_API_KEY"} <= keys
    registry = next(c for c in cluster.containers() if c.service == "registry")
    (item,) = [e for e in registry.spec["env"] if e["name"] == "MODELGRID_DB_URL"]
    assert "secretKeyRef" in item.get("valueFrom", {}), "the database URL (with its password) comes from the Secret"
    assert urlsplit(registry.env["MODELGRID_DB_URL"]).scheme == "postgresql+psycopg"


# ---------------------------------------------------------------- ports, probes, Services


def test_probes_are_native_grpc_on_the_listen_port(cluster: Cluster) -> None:
    for c in cluster.containers():
        port = listen_port(c.service, c.env)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c.spec, f"{c.where}: no {probe}"
            assert "grpc" in c.spec[probe], f"{c.where}: {probe} must use the gRPC health protocol"
            assert c.port(c.spec[probe]["grpc"]["port"]) == port, f"{c.where}: {probe} port != listen port {port}"
        assert c.port("grpc") == port, f"{c.where}: container port 'grpc' != listen port {port}"


def test_metrics_ports_agree(cluster: Cluster) -> None:
    for c in cluster.containers():
        port = metrics_port(c.service, c.env)
        assert c.port("metrics") == port, f"{c.where}: container port 'metrics' != metrics port {port}"
        annotations = c.pod["metadata"].get("annotations") or {}
        if "prometheus.io/port" in annotations:
            assert int(annotations["prometheus.io/port"]) == port, f"{c.where}: prometheus.io/port"


def test_every_service_is_reachable_on_its_listen_port(cluster: Cluster) -> None:
    for c in cluster.containers():
        port = listen_port(c.service, c.env)
        services = cluster.services_for(c.pod["metadata"]["labels"])
        assert services, f"{c.where}: no Service selects its pods"
        ok = [
            s
            for s in services
            for p in s["spec"]["ports"]
            if p["port"] == port and c.port(p.get("targetPort", p["port"])) == port
        ]
        assert ok, f"{c.where}: no Service exposes port {port} on the listen port"


def service_port_target(cluster: Cluster, service_name: str, port: int) -> int:
    """The container port a Service's port leads to."""
    svc = cluster.named("Service", service_name)
    (entry,) = [p for p in svc["spec"]["ports"] if p["port"] == port] or [None]
    assert entry, f"Service {service_name} has no port {port}"
    target = entry.get("targetPort", port)
    if isinstance(target, int):
        return target
    selector = svc["spec"]["selector"].items()
    pods = [w for w in cluster.workloads() if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
    assert pods, f"Service {service_name} selects no workload"
    for container in pods[0]["spec"]["template"]["spec"]["containers"]:
        for p in container.get("ports", []):
            if p.get("name") == target:
                return int(p["containerPort"])
    raise AssertionError(f"Service {service_name}: targetPort {target!r} names no container port")


def test_addresses_dial_services_that_lead_to_the_listen_port(cluster: Cluster) -> None:
    service_names = {s["metadata"]["name"] for s in cluster.of_kind("Service")}
    listen_by_service = {c.service: listen_port(c.service, c.env) for c in cluster.containers()}
    checked = 0
    for c in cluster.containers():
        for key, value in c.env.items():
            if key.endswith("_ADDR"):
                host, port = host_of(value).split(".")[0], port_of(value)
                assert host in service_names, f"{c.where}: {key}={value}: no Service {host!r}"
                target = service_port_target(cluster, host, port)
                peer = key.removeprefix("MODELGRID_").removesuffix("_ADDR").lower()
                assert target == listen_by_service[peer], f"{c.where}: {key}={value} leads to port {target}"
                checked += 1
            elif key == "MODELGRID_REDIS_URL":
                url = urlsplit(value)
                if url.hostname in service_names:
                    assert service_port_target(cluster, url.hostname, url.port or 6379) == 6379
    assert checked >= 5, "expected the scheduler, worker and gateway to dial their peers"


# ---------------------------------------------------------------- workers


def test_workers_are_a_gpu_statefulset_behind_a_headless_service(cluster: Cluster) -> None:
    w = worker_container(cluster)
    sts = w.workload
    limits = w.spec["resources"].get("limits", {})
    assert str(limits.get("nvidia.com/gpu")) == "1", "workers must request nvidia.com/gpu: 1 (in limits)"
    requests = w.spec["resources"].get("requests", {})
    assert str(requests.get("nvidia.com/gpu", "1")) == "1", "GPU requests must equal limits"
    headless = cluster.named("Service", sts["spec"]["serviceName"])
    assert headless["spec"].get("clusterIP") == "None", "the StatefulSet's serviceName must be a headless Service"
    assert headless in cluster.services_for(w.pod["metadata"]["labels"])
    port = listen_port("worker", w.env)
    expected = f"$(POD_NAME).{sts['spec']['serviceName']}.$(POD_NAMESPACE).svc.cluster.local:{port}"
    assert w.env["MODELGRID_WORKER_ADVERTISE"] == expected
    assert w.env["POD_NAME"] == "<metadata.name>" and w.env["POD_NAMESPACE"] == "<metadata.namespace>"
    assert w.env.get("MODELGRID_WORKER_ID") == "$(POD_NAME)", "a stable worker id across restarts"


def test_worker_startup_probe_allows_for_loading_weights(cluster: Cluster) -> None:
    probe = worker_container(cluster).spec["startupProbe"]
    total = probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)
    assert total >= WEIGHT_LOADING_STARTUP_S, f"startup probe gives up after {total}s"


def test_worker_disruption_budget(cluster: Cluster) -> None:
    w = worker_container(cluster)
    budgets = [
        p for p in cluster.of_kind("PodDisruptionBudget")
        if p["spec"]["selector"]["matchLabels"].items() <= w.pod["metadata"]["labels"].items()
    ]
    assert budgets, "no PodDisruptionBudget selects the workers"
    assert "maxUnavailable" in budgets[0]["spec"] or "minAvailable" in budgets[0]["spec"]


def test_termination_grace_covers_the_drain(cluster: Cluster) -> None:
    for c in cluster.containers():
        needed = stop_budget_s(c.service, c.env)
        if needed is None:
            continue
        given = c.pod["spec"].get("terminationGracePeriodSeconds", K8S_DEFAULT_TERMINATION_GRACE_S)
        assert given >= needed, f"{c.where}: terminationGracePeriodSeconds {given} < the {needed:.0f}s it may drain"


# ---------------------------------------------------------------- state, resources, security


def test_state_is_on_persistent_volumes(cluster: Cluster) -> None:
    for c in cluster.containers():
        mounts = {m["mountPath"]: m["name"] for m in c.spec.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in c.pod["spec"].get("volumes", [])}
        templates = {t["metadata"]["name"] for t in c.workload["spec"].get("volumeClaimTemplates", [])}
        for key in ("MODELGRID_DATA_DIR", "MODELGRID_WORKER_CACHE_DIR"):
            if key not in c.env:
                continue
            assert c.env[key] in mounts, f"{c.where}: {key}={c.env[key]} is not a mounted volume"
            name = mounts[c.env[key]]
            if name in templates:
                continue
            claim = volumes[name].get("persistentVolumeClaim", {}).get("claimName")
            assert claim, f"{c.where}: {key} must be on a PersistentVolumeClaim"
            cluster.named("PersistentVolumeClaim", claim)
    registry = next(c for c in cluster.containers() if c.service == "registry")
    assert "MODELGRID_DATA_DIR" in registry.env


def test_every_container_requests_resources(cluster: Cluster) -> None:
    for workload in cluster.workloads():
        for spec in workload["spec"]["template"]["spec"]["containers"]:
            requests = (spec.get("resources") or {}).get("requests") or {}
            assert {"cpu", "memory"} <= set(requests), f"{workload['metadata']['name']}/{spec['name']}: requests"


def test_modelgrid_pods_run_as_the_image_user(cluster: Cluster) -> None:
    uid = dockerfile_uid()
    for c in cluster.containers():
        security = c.pod["spec"].get("securityContext") or {}
        assert security.get("runAsNonRoot") is True, f"{c.where}: runAsNonRoot"
        assert security.get("runAsUser", uid) == uid and security.get("fsGroup") == uid, f"{c.where}: uid/fsGroup {uid}"


def test_images_are_the_ones_kustomize_sets(cluster: Cluster) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    names = {i["name"] for i in kustomization.get("images", [])}
    for c in cluster.containers():
        assert c.spec["image"] in names, f"{c.where}: image {c.spec['image']!r} is not in kustomization images"
    control = {c.spec["image"] for c in cluster.containers() if c.service != "worker"}
    assert worker_container(cluster).spec["image"] not in control, "workers need the CUDA image"


def test_kubectl_kustomize_builds_into_one_namespace() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed here; the manifest checks above still ran")
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    raw = Cluster(load_manifests())
    assert sorted(d["kind"] for d in built) == sorted(o["kind"] for o in raw.objects)
    for d in built:
        if d["kind"] in CLUSTER_NAMESPACED:
            assert d["metadata"]["name"] == namespace
        else:
            assert d["metadata"].get("namespace") == namespace, f"{d['kind']}/{d['metadata']['name']}"
