"""`modelgrid jobs submit|status|list|cancel|results`: batch jobs from the command line.

    modelgrid jobs submit --model minilm --kind embed --input corpus.jsonl --output vectors.jsonl --wait

`submit --wait` (or `--output`) follows the job with a live progress bar on stderr and exits 0 only when the
job succeeded; a malformed input line fails the submission at once (exit 1, the line named on stderr).
Results are JSONL, one line per item in input order: {"id", "embedding"} or {"id", "text", "token_ids",
"finish_reason"}, or {"id", "error"} for an item that failed on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from modelgrid.jobs import JobInfo, write_results

MakeClient = Callable[[argparse.Namespace], Any]
STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def add_job_commands(
    sub: Any, client: argparse.ArgumentParser, as_json: argparse.ArgumentParser, make_client: MakeClient
) -> None:
    jobs = sub.add_parser("jobs", help="batch jobs: embed or generate over a JSONL file").add_subparsers(
        dest="jobs_command", metavar="ACTION", required=True
    )
    submit = jobs.add_parser("submit", parents=[client, as_json], help="submit a JSONL file as a batch job")
    submit.add_argument("--model", required=True)
    submit.add_argument("--kind", required=True, choices=("embed", "generate"))
    submit.add_argument("--input", required=True, metavar="FILE.jsonl",
                        help='one item per line: {"id": ..., "text": ...} or {"id": ..., "prompt": ..., "max_tokens": ...}')
    submit.add_argument("--output", metavar="FILE.jsonl", help="write the results here when the job ends (implies --wait)")
    submit.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    submit.add_argument("--version", default=None, help="version or alias (default latest)")
    submit.add_argument("--max-tokens", type=int, default=None, help="generate: new tokens per item by default")
    submit.add_argument("--temperature", type=float, default=None, help="generate: default 0 (greedy)")
    submit.add_argument("--seed", type=int, default=None, help="generate: item i samples with seed + i")
    submit.add_argument("--task-items", type=int, default=0, help="items per task (default: the scheduler's)")
    submit.set_defaults(func=lambda args: _submit(args, make_client))

    status = jobs.add_parser("status", parents=[client, as_json], help="a job's state, progress and ETA")
    status.add_argument("job_id", metavar="JOB_ID")
    status.set_defaults(func=lambda args: _status(args, make_client))
    lst = jobs.add_parser("list", parents=[client, as_json], help="recent jobs, newest first")
    lst.add_argument("--state", action="append", default=[], choices=STATES, help="only jobs in this state")
    lst.add_argument("--limit", type=int, default=50)
    lst.set_defaults(func=lambda args: _list(args, make_client))
    cancel = jobs.add_parser("cancel", parents=[client, as_json], help="stop a job; finished items stay")
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.set_defaults(func=lambda args: _cancel(args, make_client))
    results = jobs.add_parser("results", parents=[client], help="a job's results as JSONL, in input order")
    results.add_argument("job_id", metavar="JOB_ID")
    results.add_argument("--output", metavar="FILE.jsonl", help="write here instead of stdout")
    results.set_defaults(func=lambda args: _results(args, make_client))


def job_json(job: JobInfo) -> dict[str, Any]:
    return dataclasses.asdict(job)


def _summary(job: JobInfo) -> str:
    line = f"{job.job_id} {job.state}: {job.done}/{job.total} done"
    if job.failed:
        line += f", {job.failed} failed"
    if job.items_per_s:
        line += f", {job.items_per_s:.1f} items/s"
    if job.state == "running" and job.eta_s >= 0:
        line += f", ETA {job.eta_s:.0f} s"
    return line + (f" ({job.error})" if job.error else "")


def _submit(args: argparse.Namespace, make_client: MakeClient) -> int:
    try:
        data = Path(args.input).read_bytes()
    except OSError as err:
        print(f"error: cannot read --input {args.input}: {err.strerror}", file=sys.stderr)
        return 2
    with make_client(args) as client:
        job = client.submit_job(args.model, args.kind, jsonl=data, version=args.version, max_tokens=args.max_tokens,
                                temperature=args.temperature, seed=args.seed, task_items=args.task_items)
        print(f"submitted {job.job_id}: {job.total} {job.kind} items on {job.model} {job.version}", file=sys.stderr)
        if not (args.wait or args.output):
            print(json.dumps(job_json(job)) if args.json else job.job_id)
            return 0
        job = _follow(client, job)
        if job.state == "succeeded" and args.output:
            _write_file(client, job.job_id, args.output)
    print(json.dumps(job_json(job)) if args.json else _summary(job))
    return 0 if job.state == "succeeded" else 1


def _follow(client: Any, job: JobInfo) -> JobInfo:
    """Watch the job to its end with a progress bar on stderr; the last state seen."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from modelgrid.output import err_console

    progress = Progress(
        TextColumn(f"[bold]{job.job_id}[/] {{task.fields[state]}}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[eta]}"), console=err_console,
    )
    with progress:
        bar = progress.add_task(job.job_id, total=job.total, state=job.state, rate="", eta="")
        for job in _watch(client, job):
            progress.update(bar, completed=job.done + job.failed, state=job.state,
                            rate=f"{job.items_per_s:.1f} items/s" if job.items_per_s else "",
                            eta=f"ETA {job.eta_s:.0f} s" if job.state == "running" and job.eta_s >= 0 else "")
    return job


def _watch(client: Any, job: JobInfo) -> Iterator[JobInfo]:
    """WatchJob until the job ends; a broken stream (a gateway restart) is resumed after a second."""
    from modelgrid.errors import Unavailable

    while True:
        try:
            for job in client.watch_job(job.job_id):
                yield job
        except Unavailable as err:
            print(f"lost the progress stream ({err.message}); retrying", file=sys.stderr)
            time.sleep(1.0)
        if job.ended:
            return


def _status(args: argparse.Namespace, make_client: MakeClient) -> int:
    with make_client(args) as client:
        job = client.get_job(args.job_id)
    print(json.dumps(job_json(job)) if args.json else _summary(job))
    return 0


def _list(args: argparse.Namespace, make_client: MakeClient) -> int:
    with make_client(args) as client:
        found = client.list_jobs(args.state, args.limit)
    if args.json:
        print(json.dumps([job_json(j) for j in found]))
        return 0
    if not found:
        print("no jobs")
    for job in found:
        print(f"{_summary(job)}  [{job.kind} {job.model} {job.version}]")
    return 0


def _cancel(args: argparse.Namespace, make_client: MakeClient) -> int:
    with make_client(args) as client:
        job = client.cancel_job(args.job_id)
    print(json.dumps(job_json(job)) if args.json else f"cancelled {job.job_id}: {job.done} of {job.total} items done")
    return 0


def _write_file(client: Any, job_id: str, path: str) -> None:
    with open(path, "w", encoding="utf-8") as out:
        n = write_results(client.job_results(job_id), out)
    print(f"wrote {n} results to {path}", file=sys.stderr)


def _results(args: argparse.Namespace, make_client: MakeClient) -> int:
    with make_client(args) as client:
        if args.output:
            _write_file(client, args.job_id, args.output)
        else:
            write_results(client.job_results(args.job_id), sys.stdout)
    return 0
