"""Chaos under load: kill -9 a random worker, start it again, repeat, while clients keep generating.

    python scripts/chaos.py [--duration 60] [--workers 4] [--stages 2] [--replicas 2] [--clients 4]
                            [--period 6] [--down 1] [--max-requests 5000] [--seed N] [--json]

Starts a private platform on loopback in a temporary directory (tests/e2e/cluster.py: Redis, registry,
scheduler, gateway, --workers CPU workers; heartbeats every 0.5 s) and registers a small random Llama as
--stages stages x --replicas replicas with the real CLI. Then, for --duration seconds (and at most
--max-requests requests), --clients threads generate greedily (32 tokens) while a chaos loop, every
--period seconds, SIGKILLs a random worker, leaves it down for --down seconds and starts it again (same id,
same port), one failure at a time. A request succeeds when it completes with exactly the tokens of an
undisturbed run. Everything started is stopped at the end, whatever happens.

Reports: success rate, p50/p99 latency, each kill's recovery time (from the kill until every stage again has
--replicas ready copies), and the gateway's failover count. Exit code 0 when the success rate reaches
--target (default 0.99), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.e2e.cluster import Cluster, write_model  # noqa: E402

MODEL = "chaos"
PROMPT = [1, 17, 250, 3, 99, 42, 7]
NEW_TOKENS = 32


@dataclass
class ChaosReport:
    duration_s: float
    requests: int
    failed: int
    success_rate: float
    p50_latency_s: float
    p99_latency_s: float
    kills: list[str] = field(default_factory=list)  # worker ids, in order
    recovery_s: list[float] = field(default_factory=list)  # per kill: until fully replicated again
    rejoin_s: list[float] = field(default_factory=list)  # per kill: from the worker healthy again to replicated
    failovers: float = 0.0
    failover_step_s: float = 0.0  # mean time a generation step lost to a failure (gateway metric)
    errors: list[str] = field(default_factory=list)  # the first few failures

    def summary(self) -> str:
        recovery = (f"recovery after each kill {', '.join(f'{r:.1f}' for r in self.recovery_s)} s "
                    f"(max {max(self.recovery_s):.1f} s; of which after the worker was up again: max "
                    f"{max(self.rejoin_s):.2f} s)" if self.recovery_s else "no kill completed")
        return (f"{self.requests} requests in {self.duration_s:.0f} s, {self.failed} failed: success "
                f"{self.success_rate * 100:.2f}%; latency p50 {self.p50_latency_s * 1000:.0f} ms, p99 "
                f"{self.p99_latency_s * 1000:.0f} ms; {len(self.kills)} kills ({', '.join(self.kills)}); "
                f"{recovery}; {self.failovers:.0f} hop failovers, each costing its step "
                f"{self.failover_step_s * 1000:.0f} ms on average")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_chaos(
    duration_s: float = 60.0,
    workers: int = 4,
    stages: int = 2,
    replicas: int = 2,
    clients: int = 4,
    period_s: float = 6.0,
    down_s: float = 1.0,
    max_requests: int = 5000,
    seed: int | None = None,
    root: Path | None = None,
    log=print,
) -> ChaosReport:
    """Start a platform, run load and chaos for duration_s, stop everything, report."""
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    root = root or Path(tempfile.mkdtemp(prefix="modelgrid-chaos-"))
    cluster = Cluster(root, workers=workers, worker_grace_s=5)
    log(f"chaos: seed {seed}, {workers} workers, {stages} stages x {replicas} replicas, dir {root}")
    try:
        cluster.start()
        cluster.register(write_model(root / "checkpoint"), MODEL, replicas=replicas, stages=stages)
        cluster.wait_replicated(MODEL, replicas, stages, timeout_s=120)
        reference = cluster.generate(MODEL, PROMPT, NEW_TOKENS)
        if reference.error is not None:
            raise RuntimeError(f"the undisturbed run failed: {reference.error}")
        return _load_and_chaos(cluster, reference.tokens, rng, duration_s, stages, replicas, clients, period_s,
                               down_s, max_requests, log)
    except BaseException:
        log(cluster.logs_tail())
        raise
    finally:
        cluster.stop()


def _load_and_chaos(
    cluster: Cluster, expected: list[int], rng: random.Random, duration_s: float, stages: int, replicas: int,
    clients: int, period_s: float, down_s: float, max_requests: int, log,
) -> ChaosReport:
    stop = threading.Event()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    metrics = ("modelgrid_gateway_failovers_total", "modelgrid_gateway_failover_seconds_sum",
               "modelgrid_gateway_failover_seconds_count")
    before = [cluster.metric(name) for name in metrics]

    def client() -> None:
        while not stop.is_set():
            with lock:
                if len(latencies) + len(errors) >= max_requests:
                    stop.set()
                    return
            result = cluster.generate(MODEL, PROMPT, NEW_TOKENS, timeout_s=60)
            with lock:
                if result.error is not None:
                    errors.append(f"{result.error.code().name}: {result.error.details()}")
                elif result.tokens != expected:
                    errors.append(f"wrong tokens: {result.tokens[:8]}...")
                else:
                    latencies.append(result.total_s)

    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(clients)]
    started = time.monotonic()
    end = started + duration_s
    for thread in threads:
        thread.start()
    kills: list[str] = []
    recovery: list[float] = []
    rejoin: list[float] = []
    try:
        while time.monotonic() + down_s < end and not stop.is_set():
            victim = rng.choice(sorted(cluster.workers))
            service = cluster.workers[victim]
            killed_at = time.monotonic()
            service.kill()
            kills.append(victim)
            log(f"chaos: t={killed_at - started:5.1f} s kill -9 {victim}")
            time.sleep(down_s)
            service.start(120)
            up_at = time.monotonic()
            cluster.wait_replicated(MODEL, replicas, stages, timeout_s=120)
            recovery.append(time.monotonic() - killed_at)
            rejoin.append(time.monotonic() - up_at)
            log(f"chaos: t={time.monotonic() - started:5.1f} s {victim} back, fully replicated again "
                f"{recovery[-1]:.1f} s after the kill")
            pause = killed_at + period_s - time.monotonic()
            if pause > 0:
                stop.wait(min(pause, max(0.0, end - time.monotonic())))
        while time.monotonic() < end and not stop.is_set():
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(90)
    elapsed = time.monotonic() - started
    total = len(latencies) + len(errors)
    failed_hops, lost_s, steps = (cluster.metric(name) - b for name, b in zip(metrics, before))
    return ChaosReport(
        duration_s=elapsed,
        requests=total,
        failed=len(errors),
        success_rate=len(latencies) / total if total else 0.0,
        p50_latency_s=statistics.median(latencies) if latencies else 0.0,
        p99_latency_s=percentile(latencies, 0.99),
        kills=kills,
        recovery_s=recovery,
        rejoin_s=rejoin,
        failovers=failed_hops,
        failover_step_s=lost_s / steps if steps else 0.0,
        errors=errors[:5],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load and chaos (default 60)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--period", type=float, default=6.0, help="seconds between kills (default 6)")
    parser.add_argument("--down", type=float, default=1.0, help="seconds a killed worker stays down (default 1)")
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--target", type=float, default=0.99, help="success rate to reach (default 0.99)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.duration > 3600:
        parser.error("--duration must be in (0, 3600] seconds")
    if args.workers < args.stages * args.replicas:
        parser.error(f"--workers must be >= stages x replicas = {args.stages * args.replicas}")
    report = run_chaos(args.duration, args.workers, args.stages, args.replicas, args.clients, args.period,
                       args.down, args.max_requests, args.seed, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(asdict(report), indent=2) if args.json else report.summary())
    return 0 if report.success_rate >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
