"""Why a stage computes slower inside the pipeline than in a loop: the cost of idling between passes.

    PYTHONPATH=. python bench/bench_stage_idle.py [--gap-ms 8] [--steps 60] [--reps 3]

In a pipeline at batch 1 each worker waits while the other stages compute, so its core idles between its
passes. This runs one stage (layers [0, 6) of the benchmark checkpoint, one torch thread, decode steps) in this
process three ways: passes back to back; with the thread sleeping --gap-ms between passes (what a worker
does); and busy-waiting the same time instead (the core never idles). Printed: the median pass time of each
and the ratio to back to back. Nothing else is measured: no gRPC, no second process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_platform import MODEL
from modelgrid.model import load_stage, write_random_checkpoint


def passes(stage, gap_s: float, spin: bool, steps: int) -> float:  # noqa: ANN001 - a DecoderStage
    """Median seconds of a decode pass, with gap_s of sleep (or spin) before each."""
    cache = stage.new_cache(64 + steps)
    times = []
    with torch.inference_mode():
        stage(torch.arange(3, 35), cache)
        for _ in range(steps):
            if spin:
                end = time.perf_counter() + gap_s
                while time.perf_counter() < end:
                    pass
            elif gap_s:
                time.sleep(gap_s)
            start = time.perf_counter()
            stage(torch.tensor([5]), cache)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gap-ms", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gap = args.gap_ms / 1000
    with tempfile.TemporaryDirectory() as tmp:
        stage = load_stage(write_random_checkpoint(Path(tmp) / "ckpt", **MODEL), 0, 6)
        print(f"layers [0, 6) of the bench checkpoint, 1 thread, decode passes, median of {args.steps} per run (ms)")
        print(f"{'run':>4} {'back to back':>13} {f'sleep {args.gap_ms:g} ms':>14} {f'spin {args.gap_ms:g} ms':>13}")
        for rep in range(args.reps):
            base, slept, spun = (passes(stage, g, s, args.steps) for g, s in ((0.0, False), (gap, False), (gap, True)))
            print(f"{rep + 1:>4} {base * 1e3:13.2f} {slept * 1e3:9.2f} ({slept / base:.2f}x) "
                  f"{spun * 1e3:8.2f} ({spun / base:.2f}x)")


if __name__ == "__main__":
    main()
