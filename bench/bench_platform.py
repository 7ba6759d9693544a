"""Platform benchmark, batch 1 on CPU: transformers' generate in-process vs ModelGrid over loopback.

    PYTHONPATH=. python bench/bench_platform.py [--reps 5] [--new-tokens 64] [--prompt 32] [--max-seconds 600]

The checkpoint is write_random_checkpoint(num_layers=8, hidden_size=512, num_heads=8, intermediate_size=1376,
vocab_size=32000), float32. ModelGrid runs as real processes (`modelgrid up --workers 3`: Redis, registry,
scheduler, gateway, 3 workers) and serves the same checkpoint registered three times, split over 1, 2 and
3 workers; the client is the SDK (modelgrid.Client), streaming from the gateway. Greedy decoding, a
32-token prompt given as ids, 64 new tokens: transformers' EOS is disabled, and ModelGrid's outputs are
checked to be 64 tokens long and equal to transformers' (the random model never emits EOS here).

Also timed in this process: ModelGrid's own model code with the whole model as one stage (the compute the
workers do, without the platform). Printed per configuration (median over the repetitions, runs interleaved so background load hits all alike):
tokens/s over the whole generation (prefill included, as generate() does), time to first token, per-token
decode latency p50/p99. The latency a stage hop adds is derived from the decode latencies: the compute is the
same whatever the split, so (latency with k stages - latency with 1 stage) / (k - 1) is the cost of a hop.
Then, to see where a hop's time goes, one session runs through the 2-worker route with its steps sent
directly from this process (no gateway) on each worker's step stream (ForwardStream, what the gateway uses),
and the same stages run loaded in this process: step time = stage compute + RPC/handoff, next to a bare
GetStatus round trip (a unary gRPC call alone).

Reading the numbers: on a small shared CPU box every process competes for the same cores, so a stage computes
slower inside a worker than alone (the workers' torch threads, `modelgrid up` splitting the cores between
them, and any other load); the "best run" line is the least disturbed repetition. --env K=V sets variables
for the platform's processes only (e.g. OMP_WAIT_POLICY=PASSIVE) to try such settings.
Not a test: nothing is asserted about speed. Bounded: --max-seconds stops the repetitions early.
"""

from __future__ import annotations

import argparse
import functools
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

MODEL = dict(num_layers=8, hidden_size=512, num_heads=8, intermediate_size=1376, vocab_size=32000)
ROOT = Path(__file__).resolve().parent.parent
STAGE_COUNTS = (1, 2, 3)


@dataclass
class Runs:
    """Timings of repeated generations of one configuration."""

    name: str
    totals: list[float] = field(default_factory=list)  # seconds per generation, request to last token
    ttfts: list[float] = field(default_factory=list)  # request to first token
    gaps: list[float] = field(default_factory=list)  # between consecutive tokens (decode steps), all runs

    def add(self, stamps: list[float], start: float) -> None:
        self.totals.append(stamps[-1] - start)
        self.ttfts.append(stamps[0] - start)
        self.gaps.extend(b - a for a, b in zip(stamps, stamps[1:]))

    def tokens_per_s(self, new_tokens: int) -> float:
        return new_tokens / statistics.median(self.totals)

    def gap(self, q: float) -> float:
        ordered = sorted(self.gaps)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- transformers, in-process ----------------------------------------------------------------------

class _Stamps:
    """A generate() streamer recording when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:  # noqa: ANN001 - transformers' streamer protocol
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(model, prompt: list[int], new_tokens: int, runs: Runs | None) -> list[int]:  # noqa: ANN001
    import torch

    stamps = _Stamps()
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, streamer=stamps, pad_token_id=0)
    if runs is not None:
        runs.add(stamps.times, start)
    return out[0, len(prompt):].tolist()


def own_generate(stage, prompt: list[int], new_tokens: int, runs: Runs | None) -> list[int]:  # noqa: ANN001
    """ModelGrid's own model code, the whole model as one stage in this process, greedy: what the platform
    costs on top of its compute is the gap between this and the workers."""
    import torch

    cache = stage.new_cache(len(prompt) + new_tokens)
    x, tokens, stamps = torch.tensor(prompt), [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(new_tokens):
            token = int(stage(x, cache, last_only=True)[-1].argmax())
            stamps.append(time.perf_counter())
            tokens.append(token)
            x = torch.tensor([token])
    if runs is not None:
        runs.add(stamps, start)
    return tokens


# ---- ModelGrid, real processes -----------------------------------------------------------------------

class Platform:
    """`modelgrid up --workers 3` in a subprocess, stopped with SIGTERM (Ctrl-C) at the end."""

    def __init__(self, data_dir: Path, workers: int, extra_env: dict[str, str]) -> None:
        from tests.support import free_port

        self.port = free_port()
        self.data_dir = data_dir
        self.scheduler = ""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **extra_env}
        argv = [sys.executable, "-m", "modelgrid", "up", "--workers", str(workers), "--port", str(self.port),
                "--data-dir", str(data_dir), "--log-level", "WARNING",
                "--http-port", "-1"]  # the OpenAI-compatible HTTP API is not benchmarked here
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def worker_threads(self) -> str:
        """The --torch-threads `modelgrid up` gave its workers ("default" when it passes none)."""
        found = set()
        for pid_file in (self.data_dir / "run").glob("worker-*.pid"):
            try:
                argv = Path(f"/proc/{int(pid_file.read_text())}/cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            found.add(argv[argv.index(b"--torch-threads") + 1].decode() if b"--torch-threads" in argv else "default")
        return ", ".join(sorted(found)) or "?"

    def client(self):  # noqa: ANN201 - modelgrid.Client, imported late (PYTHONPATH)
        """An SDK client with the admin API key `modelgrid up` saved in the data dir (when auth is on)."""
        from modelgrid.client import Client

        key_file = self.data_dir / "api-key"
        key = {"api_key": key_file.read_text().strip()} if key_file.exists() else {}
        return Client(self.address, timeout=300, **key)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
            found = re.match(r"\s*scheduler\s+(\S+:\d+)\s", line)  # the launcher's table of services
            if found:
                self.scheduler = found.group(1)
        self.lines.put(None)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError("modelgrid up exited before ready:\n" + "".join(seen))
            seen.append(line)
            if line.startswith("ready"):
                return
        raise RuntimeError(f"modelgrid up not ready after {timeout_s} s:\n" + "".join(seen))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def worker_metrics_port(data_dir: Path, worker_id: str) -> int:
    """The metrics port `modelgrid up` gave a worker (the launcher logs every child's command line)."""
    text = (data_dir / "logs" / f"{worker_id}.log").read_text(errors="replace")
    return int(re.findall(r"--metrics-port (\d+)", text)[-1])


def scrape(port: int) -> dict[str, float]:
    """A worker's batching counters from its Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    wanted = ("modelgrid_worker_busy_seconds", "modelgrid_worker_forward_passes", "modelgrid_worker_forward_steps")
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name in wanted:
            out[family.name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return out


class PassTimes:
    """Forward passes of a route's workers over some generations, from their Prometheus counters: the time a
    worker's torch thread spent per pass, i.e. a stage's compute inside the platform."""

    def __init__(self, platform: Platform, client, name: str) -> None:  # noqa: ANN001 - modelgrid.Client
        workers = [stage.replicas[0].worker_id for stage in client.placement(name).stages]
        self.ports = [worker_metrics_port(platform.data_dir, w) for w in workers]
        self.busy = [0.0] * len(workers)
        self.passes = [0.0] * len(workers)

    def around(self, run):  # noqa: ANN001, ANN201 - run() -> its result; counts the passes it caused
        before = [scrape(p) for p in self.ports]
        result = run()
        for i, (a, b) in enumerate(zip(before, (scrape(p) for p in self.ports))):
            self.busy[i] += b["modelgrid_worker_busy_seconds"] - a["modelgrid_worker_busy_seconds"]
            self.passes[i] += b["modelgrid_worker_forward_passes"] - a["modelgrid_worker_forward_passes"]
        return result

    def per_pass(self) -> list[float]:
        return [b / p if p else 0.0 for b, p in zip(self.busy, self.passes)]


def wait_ready(client, name: str, timeout_s: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not client.placement(name).ready:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not placed after {timeout_s} s: {client.placement(name)}")
        time.sleep(0.2)


def mg_generate(client, name: str, prompt: list[int], new_tokens: int, runs: Runs | None) -> list[int]:  # noqa: ANN001
    stamps, tokens = [], []
    start = time.perf_counter()
    for chunk in client.generate(name, prompt_ids=prompt, max_tokens=new_tokens, temperature=0.0):
        stamps.append(time.perf_counter())
        tokens.append(chunk.token_id)
    if runs is not None:
        runs.add(stamps, start)
    return tokens


# ---- where a hop's time goes: Forward called directly on the workers ----------------------------------

@dataclass
class HopProbe:
    """One hop of a route, timed per decode step."""

    span: tuple[int, int]
    forward: list[float] = field(default_factory=list)  # a step on the step stream, round trip from this process
    compute: list[float] = field(default_factory=list)  # the same stage's forward in this process
    status_rtt: list[float] = field(default_factory=list)  # GetStatus round trip: gRPC alone, no torch


class DirectStream:
    """A worker's ForwardStream from a blocking client: one step out, its result back."""

    def __init__(self, stub) -> None:  # noqa: ANN001 - worker_pb2_grpc.WorkerStub
        from modelgrid.v1 import worker_pb2

        self._pb = worker_pb2
        self._out: queue.Queue = queue.Queue()
        self._replies = stub.ForwardStream(iter(self._out.get, None), timeout=600)

    def step(self, request):  # noqa: ANN001, ANN201 - ForwardRequest -> ForwardResponse
        self._out.put(self._pb.ForwardBatchRequest(steps=[request]))
        (result,) = next(self._replies).results
        if result.code:
            raise RuntimeError(f"{result.code}: {result.message}")
        return result.response

    def close(self) -> None:
        self._out.put(None)
        for _ in self._replies:
            pass


def probe_hops(platform: Platform, directory: Path, name: str, prompt: list[int], new_tokens: int) -> list[HopProbe]:
    """Run one greedy session through the route of `name` with direct Worker.Forward calls (what the gateway
    sends, without the gateway), then the same steps through the same stages loaded in this process."""
    import torch

    from modelgrid.channel import sync_channel
    from modelgrid.model import load_stage
    from modelgrid.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

    with sync_channel(platform.scheduler) as channel:
        route = scheduler_pb2_grpc.SchedulerStub(channel).GetRoute(scheduler_pb2.GetRouteRequest(model=name), timeout=30)
    channels = [sync_channel(h.address) for h in route.hops]
    stubs = [worker_pb2_grpc.WorkerStub(c) for c in channels]
    streams = [DirectStream(stub) for stub in stubs]  # what the gateway sends its steps over
    probes = [HopProbe((h.start_layer, h.end_layer)) for h in route.hops]
    session, ids, position = uuid.uuid4().hex, list(prompt), 0
    try:
        for step in range(new_tokens):
            reply = None
            for i, hop in enumerate(route.hops):
                request = worker_pb2.ForwardRequest(
                    session_id=session, model=route.model, version=route.version, start_layer=hop.start_layer,
                    end_layer=hop.end_layer, epoch=route.epoch, position=position, step=step,
                    max_session_tokens=len(prompt) + new_tokens, sampling=common_pb2.SamplingParams(temperature=0.0),
                    num_stages=len(route.hops))
                if i == 0:
                    request.tokens.ids.extend(ids)
                else:
                    request.hidden.CopyFrom(reply.hidden)
                start = time.perf_counter()
                reply = streams[i].step(request)
                if step:  # decode steps only
                    probes[i].forward.append(time.perf_counter() - start)
            position += len(ids)
            ids = [reply.token.token_id]
        for probe, stub in zip(probes, stubs):
            for _ in range(new_tokens):
                start = time.perf_counter()
                stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=10)
                probe.status_rtt.append(time.perf_counter() - start)
    finally:
        for stream in streams:
            stream.close()
        for stub in stubs:
            stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=session), timeout=10)
        for channel in channels:
            channel.close()

    stages = [load_stage(directory, *p.span) for p in probes]
    caches = [stage.new_cache(len(prompt) + new_tokens) for stage in stages]
    x = torch.tensor(prompt)
    with torch.inference_mode():
        for step in range(new_tokens):
            h = x
            for probe, stage, cache in zip(probes, stages, caches):
                start = time.perf_counter()
                h = stage.forward(h, cache, last_only=stage.is_last)
                if step:
                    probe.compute.append(time.perf_counter() - start)
            x = torch.tensor([int(h[-1].argmax())])
    return probes


# ---- report ----------------------------------------------------------------------------------------------

def report(
    args: argparse.Namespace, hf: Runs, own: Runs, mg: dict[int, Runs], passes: PassTimes, probes: list[HopProbe],
    threads: int, worker_threads: str,
) -> None:
    ms = 1000.0
    print()
    print("checkpoint: llama, " + ", ".join(f"{k} {v}" for k, v in MODEL.items()) + ", float32, CPU")
    print(f"batch 1, prompt {args.prompt} ids, {args.new_tokens} new tokens (greedy, EOS ignored), {os.cpu_count()} "
          f"cores, torch threads: transformers {threads}, each worker {worker_threads}; median of {len(hf.totals)} runs")
    print(f"{'configuration':34} {'tokens/s':>9} {'TTFT ms':>8} {'decode p50 ms':>14} {'decode p99 ms':>14}")
    rows = [("transformers generate, in-process", hf), ("modelgrid's stage, in-process", own)] + [
        (f"modelgrid, {k} worker{'s' if k > 1 else ''} (loopback)", runs) for k, runs in mg.items()]
    for label, runs in rows:
        print(f"{label:34} {runs.tokens_per_s(args.new_tokens):9.1f} {statistics.median(runs.ttfts) * ms:8.1f} "
              f"{runs.gap(0.5) * ms:14.2f} {runs.gap(0.99) * ms:14.2f}")
    one = mg[1]
    for k in (2, 3):
        if k in mg:
            p50 = (mg[k].gap(0.5) - one.gap(0.5)) / (k - 1) * ms
            p99 = (mg[k].gap(0.99) - one.gap(0.99)) / (k - 1) * ms
            print(f"added latency per stage hop, from 1 -> {k} workers: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    print(f"1 worker vs modelgrid's stage in-process, per decode step (the stage computing in a worker process, "
          f"one hop, the gateway, the client's stream): p50 {(one.gap(0.5) - own.gap(0.5)) * ms:.2f} ms")
    best = {label: args.new_tokens / min(runs.totals) for label, runs in rows}
    print("best run (least disturbed by other load), tokens/s: "
          + ", ".join(f"{label.split(' (')[0]} {tps:.1f}" for label, tps in best.items()))
    if probes:
        med = statistics.median
        print(f"steps sent directly on the {len(probes)}-worker route's step streams (decode steps, p50 ms):")
        for i, p in enumerate(probes):
            print(f"  hop {i} layers [{p.span[0]}, {p.span[1]}): step {med(p.forward) * ms:.2f} = stage compute "
                  f"in-process {med(p.compute) * ms:.2f} + RPC/handoff {(med(p.forward) - med(p.compute)) * ms:.2f} "
                  f"(a bare GetStatus round trip: {med(p.status_rtt) * ms:.2f})")
        k = len(probes)
        if k in mg:
            direct = sum(med(p.forward) for p in probes)
            print(f"  the gateway adds per decode step over direct steps: {(mg[k].gap(0.5) - direct) * ms:.2f} ms "
                  f"(its decode p50 {mg[k].gap(0.5) * ms:.2f} - sum of direct steps {direct * ms:.2f})")
    if 2 in mg:
        two = mg[2].tokens_per_s(args.new_tokens)
        print(f"2 workers vs modelgrid's own stage in-process (what the platform costs over its compute): "
              f"{two / own.tokens_per_s(args.new_tokens):.2f}x")
        stages = passes.per_pass()
        print(f"  per decode step: the workers' passes {' + '.join(f'{p * ms:.2f}' for p in stages)} ms (mean per "
              f"pass, the prompt's included; the whole model in this process: {own.gap(0.5) * ms:.2f} ms), the rest "
              f"{(mg[2].gap(0.5) - sum(stages)) * ms:.2f} ms: the hops, the gateway, the client's stream")
        print(f"2 workers vs transformers in-process: {two / hf.tokens_per_s(args.new_tokens):.2f}x (target >= 0.9x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop repeating after this long")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="environment of the platform's processes only (e.g. OMP_WAIT_POLICY=PASSIVE)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    import torch
    from transformers import AutoModelForCausalLM

    from modelgrid.model import load_stage, write_random_checkpoint

    started = time.monotonic()
    prompt = torch.randint(3, MODEL["vocab_size"], (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory(prefix="mg-bench-") as tmp:
        directory = write_random_checkpoint(Path(tmp) / "ckpt", **MODEL)
        extra_env = dict(item.split("=", 1) for item in args.env)
        platform = Platform(Path(tmp) / "data", workers=max(STAGE_COUNTS), extra_env=extra_env)
        try:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
            model.generation_config.eos_token_id = None  # never stop early: exactly new_tokens
            platform.wait_ready(300)
            with platform.client() as client:
                for k in STAGE_COUNTS:
                    client.register(directory, f"bench-s{k}", replicas=1, stages=k)
                for k in STAGE_COUNTS:
                    wait_ready(client, f"bench-s{k}", 300)
                reference = hf_generate(model, prompt, args.new_tokens, None)  # also the warm-up
                whole = load_stage(directory, 0, MODEL["num_layers"])
                if own_generate(whole, prompt, args.new_tokens, None) != reference:
                    print("WARNING: modelgrid's stage in-process generated tokens differing from transformers'")
                for k in STAGE_COUNTS:
                    tokens = mg_generate(client, f"bench-s{k}", prompt, args.new_tokens, None)
                    if tokens != reference:
                        print(f"WARNING: {k} worker(s) generated {len(tokens)} tokens differing from transformers' "
                              f"{len(reference)}: {tokens[:8]}... vs {reference[:8]}...")
                hf, own, mg = Runs("transformers"), Runs("own"), {k: Runs(f"{k} workers") for k in STAGE_COUNTS}
                passes = PassTimes(platform, client, "bench-s2")
                for rep in range(args.reps):
                    if rep and time.monotonic() - started > args.max_seconds:
                        print(f"stopping after {rep} repetitions (--max-seconds {args.max_seconds:.0f})")
                        break
                    hf_generate(model, prompt, args.new_tokens, hf)
                    own_generate(whole, prompt, args.new_tokens, own)
                    for k in STAGE_COUNTS:
                        run = functools.partial(mg_generate, client, f"bench-s{k}", prompt, args.new_tokens, mg[k])
                        tokens = passes.around(run) if k == 2 else run()
                        assert len(tokens) == args.new_tokens, f"{k} workers stopped after {len(tokens)} tokens"
                probes = probe_hops(platform, directory, "bench-s2", prompt, args.new_tokens) if platform.scheduler else []
                worker_threads = platform.worker_threads()
        finally:
            platform.stop()
    report(args, hf, own, mg, passes, probes, torch.get_num_threads(), worker_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
