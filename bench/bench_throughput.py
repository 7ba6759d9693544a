"""Throughput under concurrent streams: ModelGrid with continuous batching vs transformers one request at a time.

    PYTHONPATH=. python bench/bench_throughput.py [--quick] [--streams 1,4,16,64] [--new-tokens 64] [--prompt 32]
                                                  [--rounds 3] [--max-seconds 900] [--torch-threads 1]
                                                  [--batch-wait-ms MS]

The checkpoint is write_random_checkpoint(num_layers=8, hidden_size=512, num_heads=8, intermediate_size=1376,
vocab_size=32000), float32, with eos_token_id removed so that every stream produces exactly --new-tokens
tokens (transformers gets min_new_tokens for the same effect). ModelGrid runs as real processes on loopback
(`modelgrid up --workers 2`: Redis, registry, scheduler, gateway, 2 workers, each worker holding one of the
two stages and running --torch-threads torch threads); the client is the async SDK, one task per stream.

A concurrency level starts that many greedy streams at once (each its own random prompt of --prompt ids);
levels below 4 streams repeat until 4 requests have run. The baseline is transformers' generate() running
the 16-stream level's requests one after another in this process (while ModelGrid idles). Each round runs
the baseline, then every level; rows show the median over rounds of aggregate tokens/s (all new tokens /
wall time) and latencies over all rounds: time to first token and inter-token latency p50/p99, each
worker's busy fraction (time its torch thread ran forward passes / wall time, from its Prometheus metrics),
the mean sessions per forward pass, and the CPU used by the workers, the gateway and this client (% of
one core). The ratios are medians of per-round ratios: rounds interleave, so load from other work on the
machine hits both sides of a ratio alike. Not a test: nothing is asserted about speed. Bounded:
--max-seconds stops starting new rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_platform import MODEL, ROOT, Platform, Runs, hf_generate, scrape, worker_metrics_port

MODEL_NAME = "bench-throughput"
WORKERS = 2
PROCESSES = ("worker-0", "worker-1", "gateway")  # whose CPU time is printed (from `modelgrid up`'s pid files)
BASELINE = "transformers, one at a time"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class Row:
    """One configuration's measurements over the rounds."""

    label: str
    runs: Runs  # latencies of every stream of every round
    tokens_per_s: list[float] = field(default_factory=list)  # one per round
    busy: list[list[float]] = field(default_factory=list)  # per round, per worker: fraction of the wall time
    per_pass: list[list[float]] = field(default_factory=list)  # per round, per worker: sessions per pass
    cpu: list[dict[str, float]] = field(default_factory=list)  # per round, per process: CPU time / wall time

    @property
    def median_tokens_per_s(self) -> float:
        return statistics.median(self.tokens_per_s)


# ---- the platform -----------------------------------------------------------------------------------

def wait_placed(client, name: str, timeout_s: float) -> str:  # noqa: ANN001 - modelgrid.Client
    """Wait until every stage is ready; the cut, e.g. "[0,6) on worker-0, [6,8) on worker-1"."""
    from modelgrid.errors import NotFound

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            placement = client.placement(name)
            if placement.ready:
                return ", ".join(f"[{s.start_layer},{s.end_layer}) on " + "+".join(r.worker_id for r in s.replicas)
                                 for s in placement.stages)
        except NotFound:  # registered, not placed yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not placed after {timeout_s:.0f} s")
        time.sleep(0.2)


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """user + system CPU seconds of each process (Linux /proc), and of this one as "client"."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in {**pids, "client": os.getpid()}.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            out[name] = float("nan")
    return out


# ---- one level ----------------------------------------------------------------------------------------

async def run_level(address: str, api_key: str | None, prompts: list[list[int]], concurrency: int,
                    new_tokens: int, runs: Runs) -> tuple[int, float]:
    """Run prompts `concurrency` at a time (the streams of a group start together); (tokens, wall seconds)."""
    from modelgrid.aio import AsyncClient

    produced = 0

    async def one(client: AsyncClient, prompt: list[int]) -> None:
        nonlocal produced
        stamps = []
        start = time.perf_counter()
        async for _ in client.generate(MODEL_NAME, prompt_ids=prompt, max_tokens=new_tokens, temperature=0.0):
            stamps.append(time.perf_counter())
        if len(stamps) != new_tokens:
            raise RuntimeError(f"a stream stopped after {len(stamps)} of {new_tokens} tokens")
        runs.add(stamps, start)
        produced += len(stamps)

    async with AsyncClient(address, timeout=600, api_key=api_key) as client:
        started = time.perf_counter()
        for first in range(0, len(prompts), concurrency):
            await asyncio.gather(*(one(client, p) for p in prompts[first : first + concurrency]))
        wall = time.perf_counter() - started
    return produced, wall


@dataclass
class Target:
    """The running platform, as the measurements need it."""

    address: str
    api_key: str | None
    ports: list[int]  # the workers' metrics ports
    pids: dict[str, int]


def measure(target: Target, row: Row, prompts: list[list[int]], concurrency: int, new_tokens: int) -> None:
    before, cpu_before = [scrape(p) for p in target.ports], cpu_seconds(target.pids)
    tokens, wall = asyncio.run(run_level(target.address, target.api_key, prompts, concurrency, new_tokens, row.runs))
    after, cpu_after = [scrape(p) for p in target.ports], cpu_seconds(target.pids)
    busy, per_pass = [], []
    for a, b in zip(before, after):
        busy.append((b["modelgrid_worker_busy_seconds"] - a["modelgrid_worker_busy_seconds"]) / wall)
        passes = b["modelgrid_worker_forward_passes"] - a["modelgrid_worker_forward_passes"]
        steps = b["modelgrid_worker_forward_steps"] - a["modelgrid_worker_forward_steps"]
        per_pass.append(steps / passes if passes else 0.0)
    row.tokens_per_s.append(tokens / wall)
    row.busy.append(busy)
    row.per_pass.append(per_pass)
    row.cpu.append({name: (cpu_after[name] - cpu_before[name]) / wall for name in cpu_after})


def run_baseline(model, row: Row, prompts: list[list[int]], new_tokens: int) -> None:  # noqa: ANN001
    started = time.perf_counter()
    for prompt in prompts:
        hf_generate(model, prompt, new_tokens, row.runs)
    row.tokens_per_s.append(len(prompts) * new_tokens / (time.perf_counter() - started))


# ---- report ---------------------------------------------------------------------------------------------

def report(args: argparse.Namespace, rows: dict[str, Row]) -> None:
    ms = 1000.0
    rounds = len(rows[BASELINE].tokens_per_s)
    print()
    print("checkpoint: llama, " + ", ".join(f"{k} {v}" for k, v in MODEL.items()) + ", float32, CPU")
    print(f"prompt {args.prompt} ids, {args.new_tokens} new tokens per stream (greedy, EOS ignored), "
          f"{rounds} round(s); ModelGrid: {WORKERS} worker processes, one stage each, {args.torch_threads} torch "
          f"thread(s) each, batch wait " + (f"{args.batch_wait_ms:g} ms" if args.batch_wait_ms is not None
                                             else "the workers' default"))
    print(f"stages: {args.cut}")
    names = "/".join(n.replace("worker-", "w") for n in (*PROCESSES, "client"))
    print(f"{'':28} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}  "
          f"{'busy w0/w1':>10} {'sessions/pass':>14}  CPU % {names}")
    print(f"{'':28} {'median':>9} {'ms':>9} {'ms':>9} {'ms':>8} {'ms':>8}  {'':>10} {'w0/w1':>14}")
    for row in rows.values():
        runs = row.runs
        line = (f"{row.label:28} {row.median_tokens_per_s:9.1f} {percentile(runs.ttfts, 0.5) * ms:9.1f} "
                f"{percentile(runs.ttfts, 0.99) * ms:9.1f} {percentile(runs.gaps, 0.5) * ms:8.1f} "
                f"{percentile(runs.gaps, 0.99) * ms:8.1f}")
        if row.busy:
            busy = [statistics.median(r[i] for r in row.busy) for i in range(WORKERS)]
            per_pass = [statistics.median(r[i] for r in row.per_pass) for i in range(WORKERS)]
            cpu = [statistics.median(r[n] for r in row.cpu) for n in (*PROCESSES, "client")]
            line += (f"  {'/'.join(f'{b:.0%}' for b in busy):>10} {'/'.join(f'{p:.1f}' for p in per_pass):>14}  "
                     f"{'/'.join(f'{c * 100:.0f}' for c in cpu)}")
        print(line)
    print(f"load average (1 min) before / after: {args.load_before:.2f} / {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores (other work on the machine slows every row)")
    label = {c: f"modelgrid, {c} stream{'s' if c > 1 else ''}" for c in (1, 16)}
    if label[16] in rows:
        sixteen = rows[label[16]].tokens_per_s
        if label[1] in rows:
            ratios = [a / b for a, b in zip(sixteen, rows[label[1]].tokens_per_s)]
            print(f"16 streams vs ModelGrid 1 stream: {statistics.median(ratios):.2f}x "
                  f"(per round: {', '.join(f'{r:.2f}' for r in ratios)}; target >= 6x)")
        ratios = [a / b for a, b in zip(sixteen, rows[BASELINE].tokens_per_s)]
        print(f"16 streams vs transformers one at a time: {statistics.median(ratios):.2f}x "
              f"(per round: {', '.join(f'{r:.2f}' for r in ratios)}; target >= 4x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1, 4, 16 streams of 16 tokens, 1 round")
    parser.add_argument("--streams", default="1,4,16,64", help="concurrency levels, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per worker process")
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="the workers' --batch-wait-ms")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="start no round after this long")
    args = parser.parse_args()
    args.load_before = os.getloadavg()[0]
    args.cut = "unknown"
    if args.quick:
        args.streams, args.new_tokens, args.prompt, args.rounds = "1,4,16", 16, 16, 1
    concurrency = [int(c) for c in args.streams.split(",")]
    sys.path.insert(0, str(ROOT))

    import torch
    from transformers import AutoModelForCausalLM

    from modelgrid.model import write_random_checkpoint

    started = time.monotonic()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, MODEL["vocab_size"], (args.prompt,), generator=generator).tolist()
               for _ in range(max(concurrency + [16]))]
    rows = {BASELINE: Row(BASELINE, Runs("transformers"))}
    rows.update({f"modelgrid, {c} stream{'s' if c > 1 else ''}": Row("", Runs(str(c))) for c in concurrency})
    for label, row in rows.items():
        row.label = label
    with tempfile.TemporaryDirectory(prefix="mg-bench-") as tmp:
        directory = write_random_checkpoint(Path(tmp) / "ckpt", **MODEL)
        config = json.loads((directory / "config.json").read_text())
        config["eos_token_id"] = None  # no stream ends early: each produces exactly --new-tokens
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()

        data_dir = Path(tmp) / "data"
        env = {"MODELGRID_WORKER_TORCH_THREADS": str(args.torch_threads)}
        if args.batch_wait_ms is not None:
            env["MODELGRID_WORKER_BATCH_WAIT_MS"] = str(args.batch_wait_ms)
        platform = Platform(data_dir, workers=WORKERS, extra_env=env)
        try:
            platform.wait_ready(300)
            with platform.client() as client:
                client.register(directory, MODEL_NAME, replicas=1, stages=WORKERS)
                args.cut = wait_placed(client, MODEL_NAME, 300)
            key_file = data_dir / "api-key"  # the admin key `modelgrid up` made (when auth is on)
            target = Target(
                platform.address, key_file.read_text().strip() if key_file.exists() else None,
                [worker_metrics_port(data_dir, f"worker-{i}") for i in range(WORKERS)],
                {name: int((data_dir / "run" / f"{name}.pid").read_text()) for name in PROCESSES},
            )
            hf_generate(model, prompts[0], 4, None)  # warm-ups
            asyncio.run(run_level(target.address, target.api_key, prompts[:2], 2, 4, Runs("warm-up")))
            for rnd in range(args.rounds):
                if rnd and time.monotonic() - started > args.max_seconds:
                    print(f"stopping after {rnd} round(s) (--max-seconds {args.max_seconds:.0f})")
                    break
                run_baseline(model, rows[BASELINE], prompts[: 4 if args.quick else 16], args.new_tokens)
                for c, row in zip(concurrency, list(rows.values())[1:]):
                    measure(target, row, prompts[:c] * max(1, 4 // c), c, args.new_tokens)
                print(f"round {rnd + 1}: " + ", ".join(f"{r.label} {r.tokens_per_s[-1]:.1f}" for r in rows.values())
                      + " tokens/s", flush=True)
        finally:
            platform.stop()
    report(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
