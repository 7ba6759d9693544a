"""The platform end to end, as real processes: the issue "The platform", shown line by line.

A private redis-server, `python -m services.registry|scheduler|gateway|worker` (three CPU workers) on free
loopback ports with explicit flags, a SQLite registry in a temp dir. Two random checkpoints are registered:
a 6-layer Llama split over 2 workers and a 6-layer Qwen2 (GQA, tied embeddings, qkv biases) split over 3.
Every expected output is computed independently: token ids by transformers' greedy `generate`, weight bytes
from the safetensors headers.

What each test shows (the "Must show" lines of the issue):
  1. test_split_checkpoints_generate_what_transformers_generates: 2- and 3-stage greedy output equals
     transformers'; `modelgrid placement NAME --json` covers every layer exactly once.
  2. test_each_worker_holds_only_its_stages_weights: reported parameter bytes == the stage's tensor bytes.
  3. test_kill_9_a_worker_is_noticed_replaced_and_the_next_request_matches (runs last: it kills a worker).
  4. test_bad_request / test_bad_uploads / test_every_service_survives_bad_requests.
  5. test_readme_quick_start: `git clone` + the README's `make up` (= `modelgrid up --demo`) + a second shell.
The module shares one platform (module-scoped fixture); the quick-start test runs first, on its own.
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelgrid.channel import sync_channel
from modelgrid.client import Client
from modelgrid.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.e2e.test_up import process_alive, processes_mentioning
from tests.support import ROOT, RedisServer, Service, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LLAMA, QWEN = "plat-llama", "plat-qwen"
NUM_LAYERS = 6
VOCAB = {LLAMA: 512, QWEN: 640}
STAGES = {LLAMA: 2, QWEN: 3}
CONTEXT = 256  # max_position_embeddings of the llama, for the "beyond the context" request
PROMPT = [1, 17, 250, 3, 99, 42, 7, 300, 5]
NEW_TOKENS = 32
EOS = 2  # write_random_checkpoint's </s>
HEARTBEAT_S = 0.5
HEARTBEAT_TTL_S = 3 * HEARTBEAT_S  # "gone" after 3 missed intervals
DETECT_SLACK_S = 2.0  # a loaded 2-core machine: scheduling delays on top of the 3 intervals
WORKERS = ("w0", "w1", "w2")
SERVICE_NAMES = {"registry": "modelgrid.v1.Registry", "scheduler": "modelgrid.v1.Scheduler",
                 "gateway": "modelgrid.v1.Gateway", "worker": "modelgrid.v1.Worker"}
RPC_TIMEOUT_S = 60


def _child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MODELGRID_GATEWAY", None)
    return env


def modelgrid_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """The real CLI (`python -m modelgrid ...`) in a subprocess."""
    return subprocess.run([sys.executable, "-m", "modelgrid", *args], cwd=ROOT, env=_child_env(),
                          capture_output=True, text=True, timeout=timeout_s)


# ---- independent references ----------------------------------------------------------------------

def hf_greedy(directory: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation; it stops after EOS, as the gateway does (batch 1: no padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    return out[0, len(prompt):].tolist()


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_bytes(directory: Path) -> dict[str, int]:
    """Tensor name -> bytes, read from the safetensors headers with the `safetensors` library."""
    from safetensors import safe_open

    sizes = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                sizes[name] = math.prod(piece.get_shape()) * _DTYPE_BYTES[piece.get_dtype()]
    return sizes


def expected_stage_bytes(tensors: dict[str, int], start: int, end: int, num_layers: int) -> int:
    """Bytes of exactly the tensors stage [start, end) needs: its layers, the embeddings when first, the
    final norm and the LM head when last (the embedding matrix when the head is tied)."""
    first, last = start == 0, end == num_layers
    wanted = set()
    for name in tensors:
        if name.startswith("model.layers."):
            if start <= int(name.split(".")[2]) < end:
                wanted.add(name)
        elif name == "model.embed_tokens.weight":
            if first or (last and "lm_head.weight" not in tensors):
                wanted.add(name)
        elif name in ("model.norm.weight", "lm_head.weight"):
            if last:
                wanted.add(name)
        else:
            raise AssertionError(f"unexpected tensor {name!r} in the checkpoint")
    return sum(tensors[n] for n in wanted)


# ---- the platform --------------------------------------------------------------------------------

@dataclass
class Platform:
    tmp: Path
    redis: RedisServer
    registry: Service
    scheduler: Service
    gateway: Service
    workers: dict[str, Service]
    dirs: dict[str, Path]
    refs: dict[str, list[int]]  # model -> transformers' greedy tokens of PROMPT
    channels: list[grpc.Channel] = field(default_factory=list)

    def services(self) -> dict[str, Service]:
        return {"registry": self.registry, "scheduler": self.scheduler, "gateway": self.gateway, **self.workers}

    def channel(self, address: str) -> grpc.Channel:
        self.channels.append(sync_channel(address))
        return self.channels[-1]

    @functools.cached_property
    def gw(self) -> gateway_pb2_grpc.GatewayStub:
        return gateway_pb2_grpc.GatewayStub(self.channel(self.gateway.address))

    def client(self) -> Client:
        return Client(self.gateway.address, timeout=RPC_TIMEOUT_S)

    def greedy(self, model: str) -> list[int]:
        with self.client() as client:
            done = client.generate_text(model, prompt_ids=PROMPT, max_tokens=NEW_TOKENS, temperature=0.0)
        return done.token_ids

    def wait_placed(self, model: str, without: str = "", timeout_s: float = 120) -> common_pb2.Placement:
        """Poll the gateway's GetPlacement until the model is ready (and not on worker `without`)."""
        stub = self.gw
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                placement = stub.GetPlacement(common_pb2.GetPlacementRequest(model=model), timeout=10)
                holders = {r.worker_id for s in placement.stages for r in s.replicas}
                if placement.state == "ready" and without not in holders:
                    return placement
                last = f"{placement.state} {placement.message} on {sorted(holders)}"
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            time.sleep(0.1)
        pytest.fail(f"{model} not placed after {timeout_s} s (last: {last})\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{svc.log()[-2500:]}" for name, svc in self.services().items())


def _service(tmp: Path, name: str, module: str, *args: str, env: dict[str, str] | None = None) -> Service:
    port = free_port()
    argv = ["--listen", f"127.0.0.1:{port}", "--metrics-port", "-1", "--grace-s", "2", *args]
    return Service(module, argv, port, tmp / f"{name}.log", env={"PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    from modelgrid.model import write_random_checkpoint

    tmp = tmp_path_factory.mktemp("platform")
    dirs = {
        LLAMA: write_random_checkpoint(tmp / "llama", "llama", num_layers=NUM_LAYERS, hidden_size=64, num_heads=4,
                                       vocab_size=VOCAB[LLAMA], max_position_embeddings=CONTEXT, seed=11,
                                       init_std=0.2, random_norms_and_biases=True),
        QWEN: write_random_checkpoint(tmp / "qwen", "qwen2", num_layers=NUM_LAYERS, hidden_size=64, num_heads=4,
                                      num_kv_heads=2, vocab_size=VOCAB[QWEN], tie_word_embeddings=True, seed=12,
                                      init_std=0.2, random_norms_and_biases=True),
    }
    redis = RedisServer().start()
    registry = _service(tmp, "registry", "registry", "--data-dir", str(tmp / "registry"),
                        "--db-url", f"sqlite:///{tmp / 'registry.db'}")
    scheduler = _service(tmp, "scheduler", "scheduler", "--redis-url", redis.url, "--registry", registry.address,
                         "--heartbeat-interval-s", str(HEARTBEAT_S), "--heartbeat-ttl-s", str(HEARTBEAT_TTL_S),
                         "--reconcile-interval-s", "0.5", "--kv-reserve-tokens", "256")
    workers = {
        wid: _service(tmp, wid, "worker", "--worker-id", wid, "--scheduler", scheduler.address,
                      "--registry", registry.address, "--device", "cpu", "--memory-bytes", str(1 << 30),
                      "--cache-dir", str(tmp / f"cache-{wid}"))
        for wid in WORKERS
    }
    gateway = _service(tmp, "gateway", "gateway", "--registry", registry.address, "--scheduler", scheduler.address,
                       "--redis-url", redis.url, "--max-failovers", "6",
                       # no API keys (auth has its own tests) and no HTTP API port; as env, which a gateway
                       # without these settings ignores
                       env={"MODELGRID_AUTH": "disabled", "MODELGRID_GATEWAY_HTTP_PORT": "-1"})
    plat = Platform(tmp, redis, registry, scheduler, gateway, workers, dirs, refs={})
    try:
        # All processes start at once (the workers retry registration until the scheduler answers);
        # meanwhile this process computes the references with transformers.
        with ThreadPoolExecutor(len(plat.services())) as pool:
            started = [pool.submit(svc.start, 120) for svc in plat.services().values()]
            plat.refs = {model: hf_greedy(d, PROMPT, NEW_TOKENS) for model, d in dirs.items()}
            for future in started:
                future.result()
        result = modelgrid_cli("models", "register", str(dirs[LLAMA]), "--name", LLAMA, "--stages", "2",
                               "--replicas", "1", "--json", "--gateway", gateway.address)
        assert result.returncode == 0, result.stderr
        with plat.client() as client:
            client.register(dirs[QWEN], QWEN, replicas=1, stages=3)
        for model in (LLAMA, QWEN):
            plat.wait_placed(model)
        yield plat
    finally:
        for channel in plat.channels:
            channel.close()
        for svc in plat.services().values():
            if svc.proc is not None:
                svc.stop()
        redis.stop()


def placement_json(gateway: str, model: str) -> dict:
    result = modelgrid_cli("placement", model, "--json", "--gateway", gateway)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def covered_layers(placement: dict) -> list[int]:
    stages = sorted(placement["stages"], key=lambda s: s["first_layer"])
    return [layer for s in stages for layer in range(s["first_layer"], s["last_layer"] + 1)]


# ---- 5. the README quick start (first: it runs its own platform) -----------------------------------

def _read_lines(proc: subprocess.Popen, lines: list[str], q: queue.Queue) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        q.put(line)
    q.put(None)


def test_readme_quick_start(tmp_path: Path) -> None:
    """README quick start, from a fresh clone: `make up` (= install, then `modelgrid up --demo`) in one shell,
    `modelgrid generate --model demo --prompt "hello"` in a second one, then Ctrl-C leaves nothing running.

    Installing into a fresh .venv would reinstall torch, so the clone runs with this interpreter and
    PYTHONPATH=<clone>, from the clone's directory (the default data dir ./modelgrid-data lands in it). The
    gateway moves off 50051 (--port) so parallel runs cannot collide; the second shell finds it through
    MODELGRID_GATEWAY, as the README says (and the API key, if any, in ./modelgrid-data/api-key).
    """
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout with a commit")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    makefile = (clone / "Makefile").read_text()
    rule = re.search(r"^up:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert rule and rule.group(1).strip().endswith("modelgrid up --demo"), "`make up` should run `modelgrid up --demo`"
    readme = clone / "README.md"
    if readme.exists():  # committed by the lead with the docs
        assert "make up" in readme.read_text(), "the README's quick start should say `make up`"

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(clone)}
    for name in ("MODELGRID_GATEWAY", "MODELGRID_DATA_DIR", "MODELGRID_API_KEY"):
        env.pop(name, None)
    where = subprocess.run([sys.executable, "-c", "import modelgrid, services; print(modelgrid.__file__)"],
                           cwd=clone, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(str(clone)), where  # the clone's code runs, not this checkout's

    port = free_port()
    ports = ["--port", str(port)]
    up_help = subprocess.run([sys.executable, "-m", "modelgrid", "up", "--help"], cwd=clone, env=env,
                             capture_output=True, text=True, timeout=60)
    if "--http-port" in up_help.stdout:  # the OpenAI-compatible API's port (8000) moves off its default too
        ports += ["--http-port", str(free_port())]
    up = subprocess.Popen([sys.executable, "-m", "modelgrid", "up", "--demo", *ports], cwd=clone,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(up, lines, q), daemon=True).start()
    data = clone / "modelgrid-data"
    pids: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline, "modelgrid up --demo not ready after 240 s:\n" + "\n".join(lines)
            try:
                line = q.get(timeout=1.0)
            except queue.Empty:
                continue
            assert line is not None, f"modelgrid up exited with {up.wait()} before ready:\n" + "\n".join(lines)
            if line.startswith("ready"):
                break
        pids = {p.stem: int(p.read_text()) for p in (data / "run").glob("*.pid") if p.stem != "launcher"}
        assert {"redis", "registry", "scheduler", "worker-0", "worker-1", "gateway"} <= set(pids), pids
        assert (data / "registry.db").exists()  # the default data dir, in the clone

        second_shell = {**env, "MODELGRID_GATEWAY": f"127.0.0.1:{port}"}
        result = subprocess.run([sys.executable, "-m", "modelgrid", "generate", "--model", "demo", "--prompt", "hello"],
                                cwd=clone, env=second_shell, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith("\n") and "error" not in result.stderr, result
        result = subprocess.run([sys.executable, "-m", "modelgrid", "generate", "--model", "demo", "--prompt", "hello",
                                 "--max-tokens", "4", "--temperature", "0", "--json"],
                                cwd=clone, env=second_shell, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        assert len(out["token_ids"]) == 4 or out["finish_reason"] == "stop", out

        up.send_signal(signal.SIGTERM)  # Ctrl-C in the first shell
        assert up.wait(60) == 0, "\n".join(lines)
        deadline = time.monotonic() + 10
        while (alive := [n for n, pid in pids.items() if process_alive(pid)]) or processes_mentioning(str(clone)):
            assert time.monotonic() < deadline, f"left running: {alive} {processes_mentioning(str(clone))}"
            time.sleep(0.1)
    finally:  # whatever happened, leave nothing running (the children also die with the launcher)
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid_file in (data / "run").glob("*.pid"):
            pids.setdefault(pid_file.stem, int(pid_file.read_text() or 0))
        for pid in pids.values():
            if pid and process_alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---- 1. split over 2 and 3 workers, same tokens as transformers ---------------------------------------

@pytest.mark.parametrize("model", [LLAMA, QWEN])
def test_split_checkpoints_generate_what_transformers_generates(platform: Platform, model: str) -> None:
    placement = placement_json(platform.gateway.address, model)
    assert placement["state"] == "ready", placement
    assert len(placement["stages"]) == STAGES[model], placement
    assert covered_layers(placement) == list(range(NUM_LAYERS)), placement  # every layer exactly once
    assert len({s["worker_id"] for s in placement["stages"]}) == STAGES[model], placement  # distinct workers

    ref = platform.refs[model]
    assert len(ref) == NEW_TOKENS or ref[-1] == EOS, ref
    assert platform.greedy(model) == ref


# ---- 2. each worker holds only its stage's weights --------------------------------------------------

def test_each_worker_holds_only_its_stages_weights(platform: Platform) -> None:
    result = modelgrid_cli("workers", "--json", "--gateway", platform.gateway.address)
    assert result.returncode == 0, result.stderr
    listed = {w["worker_id"]: w for w in json.loads(result.stdout)}
    assert set(listed) == set(WORKERS), listed

    placed: dict[str, set[tuple[str, int, int]]] = {wid: set() for wid in WORKERS}
    for model in (LLAMA, QWEN):
        for stage in placement_json(platform.gateway.address, model)["stages"]:
            for replica in stage["replicas"]:
                placed[replica["worker_id"]].add((model, stage["start_layer"], stage["end_layer"]))
    tensors = {model: safetensors_bytes(d) for model, d in platform.dirs.items()}
    whole = {model: sum(sizes.values()) for model, sizes in tensors.items()}

    for wid, svc in platform.workers.items():
        status = worker_pb2_grpc.WorkerStub(platform.channel(svc.address)).GetStatus(
            worker_pb2.GetStatusRequest(), timeout=10)
        direct = {(s.model, s.start_layer, s.end_layer): s.param_bytes for s in status.stages}
        via_cli = {(s["model"], s["start_layer"], s["end_layer"]): s["param_bytes"] for s in listed[wid]["stages"]}
        assert direct == via_cli, (wid, direct, via_cli)
        assert set(direct) == placed[wid], (wid, direct, placed[wid])  # nothing beyond its own stages
        for (model, start, end), param_bytes in direct.items():
            want = expected_stage_bytes(tensors[model], start, end, NUM_LAYERS)
            print(f"{wid}: {model} [{start}, {end}) holds {param_bytes} bytes (safetensors: {want}; "
                  f"whole checkpoint {whole[model]})")
            assert param_bytes == want, (wid, model, start, end)
            assert param_bytes < whole[model]


# ---- 4. bad requests: the right code, a clear message, nothing breaks ---------------------------------

TokenIds = common_pb2.TokenIds
BAD_REQUESTS = [
    ("unknown model", dict(model="no-such-model", text="hi"), "NOT_FOUND", "no-such-model"),
    ("unknown version", dict(model=LLAMA, version="v9", text="hi"), "NOT_FOUND", "v9"),
    ("no prompt", dict(model=LLAMA), "INVALID_ARGUMENT", "prompt is empty"),
    ("empty text", dict(model=LLAMA, text=""), "INVALID_ARGUMENT", "prompt is empty"),
    ("empty ids", dict(model=LLAMA, token_ids=TokenIds(ids=[])), "INVALID_ARGUMENT", "prompt is empty"),
    ("max_tokens 0", dict(model=LLAMA, text="hi", max_tokens=0), "INVALID_ARGUMENT", "max_tokens must be in [1,"),
    ("max_tokens -3", dict(model=LLAMA, text="hi", max_tokens=-3), "INVALID_ARGUMENT", "max_tokens must be in [1,"),
    ("beyond context", dict(model=LLAMA, token_ids=TokenIds(ids=PROMPT), max_tokens=CONTEXT), "INVALID_ARGUMENT",
     f"context of {CONTEXT}"),
    ("temperature < 0", dict(model=LLAMA, text="hi", temperature=-0.5), "INVALID_ARGUMENT", "temperature must be"),
    ("temperature NaN", dict(model=LLAMA, text="hi", temperature=float("nan")), "INVALID_ARGUMENT",
     "temperature must be"),
    ("top_p 0", dict(model=LLAMA, text="hi", top_p=0.0), "INVALID_ARGUMENT", "top_p must be in (0, 1]"),
    ("top_p 1.5", dict(model=LLAMA, text="hi", top_p=1.5), "INVALID_ARGUMENT", "top_p must be in (0, 1]"),
    ("top_p -0.1", dict(model=LLAMA, text="hi", top_p=-0.1), "INVALID_ARGUMENT", "top_p must be in (0, 1]"),
    ("id = vocab", dict(model=LLAMA, token_ids=TokenIds(ids=[1, VOCAB[LLAMA]])), "INVALID_ARGUMENT",
     f"[0, {VOCAB[LLAMA]})"),
    ("id beyond qwen vocab", dict(model=QWEN, token_ids=TokenIds(ids=[5, 10**6])), "INVALID_ARGUMENT",
     f"[0, {VOCAB[QWEN]})"),
    ("negative id", dict(model=LLAMA, token_ids=TokenIds(ids=[1, -1])), "INVALID_ARGUMENT", "negative"),
    ("model ../", dict(model="../etc", text="hi"), "INVALID_ARGUMENT", "model name '../etc' is invalid"),
    ("model a/../b", dict(model="a/../b", text="hi"), "INVALID_ARGUMENT", "is invalid"),
    ("version ../", dict(model=LLAMA, version="../v1", text="hi"), "INVALID_ARGUMENT", "version '../v1' is invalid"),
]


@pytest.mark.parametrize("fields,code,message", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(platform: Platform, fields: dict, code: str, message: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(platform.gw.Generate(gateway_pb2.GenerateRequest(**fields), timeout=RPC_TIMEOUT_S))
    assert info.value.code().name == code, info.value.details()
    assert message in info.value.details(), info.value.details()


def test_bad_uploads_are_refused_with_a_message(platform: Platform, tmp_path: Path) -> None:
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (no_weights / name).write_bytes((platform.dirs[LLAMA] / name).read_bytes())
    (no_weights / "pytorch_model.bin").write_bytes(b"not really a pickle")

    result = modelgrid_cli("models", "register", str(no_weights), "--name", "no-weights",
                           "--gateway", platform.gateway.address)
    assert result.returncode == 1, result
    assert "error: INVALID_ARGUMENT" in result.stderr and "no *.safetensors" in result.stderr, result.stderr

    # The same upload straight to the gateway (no client-side check): the registry refuses it.
    from modelgrid.upload import iter_upload_chunks, plan_upload, sha256_file

    files = [no_weights / "config.json", no_weights / "tokenizer.json"]
    header = common_pb2.UploadHeader(model="no-weights", files=[
        common_pb2.FileInfo(path=f.name, size=f.stat().st_size, sha256=sha256_file(f)) for f in files])
    chunks = [common_pb2.UploadVersionChunk(header=header)] + [
        common_pb2.UploadVersionChunk(chunk=common_pb2.FileChunk(path=f.name, offset=0, data=f.read_bytes()))
        for f in files]
    with pytest.raises(grpc.RpcError) as info:
        platform.gw.RegisterModel(iter(chunks), timeout=RPC_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "no *.safetensors" in info.value.details()

    # A good checkpoint under a name that tries to climb out of the artifacts directory.
    evil = iter_upload_chunks(plan_upload(platform.dirs[LLAMA]), "../evil")
    with pytest.raises(grpc.RpcError) as info:
        platform.gw.RegisterModel(evil, timeout=RPC_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "../evil" in info.value.details()
    assert not (platform.tmp / "evil").exists() and not (platform.tmp / "registry" / "evil").exists()

    result = modelgrid_cli("generate", "--model", "no-such-model", "--prompt", "x", "--gateway",
                           platform.gateway.address)
    assert result.returncode == 1 and "error: NOT_FOUND" in result.stderr, result.stderr


def test_every_service_survives_bad_requests(platform: Platform) -> None:
    """Runs after the bad requests: every process is up, SERVING, logged no traceback, and serves a good request."""
    for name, svc in platform.services().items():
        assert svc.proc is not None and svc.proc.poll() is None, f"{name} exited:\n{svc.log()}"
        health = health_pb2_grpc.HealthStub(platform.channel(svc.address))
        kind = "worker" if name in platform.workers else name
        for service in ("", SERVICE_NAMES[kind]):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, (name, service)
        assert "Traceback" not in svc.log(), f"{name} logged a traceback:\n{svc.log()}"
    assert platform.greedy(LLAMA) == platform.refs[LLAMA]


# ---- 3. kill -9 a worker (last: the platform loses a worker) -------------------------------------------

def test_kill_9_a_worker_is_noticed_replaced_and_the_next_request_matches(platform: Platform) -> None:
    before = platform.wait_placed(LLAMA)
    assert all(len(s.replicas) == 1 for s in before.stages)  # no replica to fall back on
    victim = before.stages[-1].replicas[0].worker_id
    scheduler = scheduler_pb2_grpc.SchedulerStub(platform.channel(platform.scheduler.address))
    assert victim in {w.worker_id for w in scheduler.ListWorkers(common_pb2.ListWorkersRequest(), timeout=10).workers}

    killed = time.monotonic()
    platform.workers[victim].proc.send_signal(signal.SIGKILL)
    platform.workers[victim].proc.wait()
    while True:
        listed = {w.worker_id for w in scheduler.ListWorkers(common_pb2.ListWorkersRequest(), timeout=10).workers}
        noticed = time.monotonic() - killed
        if victim not in listed:
            break
        assert noticed < 30, f"{victim} still listed {noticed:.1f} s after kill -9"
        time.sleep(0.02)
    print(f"scheduler noticed kill -9 of {victim} after {noticed:.2f} s "
          f"(heartbeat {HEARTBEAT_S} s, bound {3 * HEARTBEAT_S + DETECT_SLACK_S} s)")
    assert noticed <= 3 * HEARTBEAT_S + DETECT_SLACK_S
    assert listed == set(WORKERS) - {victim}

    after = platform.wait_placed(LLAMA, without=victim)
    spans = [(s.start_layer, s.end_layer) for s in after.stages]
    assert [layer for a, b in spans for layer in range(a, b)] == list(range(NUM_LAYERS)), spans
    holders = [r.worker_id for s in after.stages for r in s.replicas]
    assert victim not in holders and len(set(holders)) == len(holders) == STAGES[LLAMA], holders
    assert after.epoch > before.epoch

    assert platform.greedy(LLAMA) == platform.refs[LLAMA]
