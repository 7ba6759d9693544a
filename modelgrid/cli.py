"""The `modelgrid` command line: `modelgrid up` and the client verbs (generate, embed, models, ...).

Nothing here imports torch: `make-checkpoint` imports the model library only when it runs.
Exit codes: 0 ok, 1 a failed call (the server's code and message on stderr), 2 a usage error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Sequence

from modelgrid import types
from modelgrid.cli_admin import add_admin_commands, add_key_argument, find_api_key
from modelgrid.cli_jobs import add_job_commands
from modelgrid.client import ADDRESS_ENV, DEFAULT_ADDRESS, Client
from modelgrid.convert import CompletionBuilder
from modelgrid.errors import ModelGridError

DATA_DIR_ENV = "MODELGRID_DATA_DIR"
DEFAULT_DATA_DIR = "./modelgrid-data"


# -- argument types: a ValueError/ArgumentTypeError here is a usage error (exit 2) ------------
def token_ids(text: str) -> list[int]:
    """"1,2,3" -> [1, 2, 3]."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}")
    ids = []
    for p in parts:
        try:
            value = int(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{p!r} is not a token id (an integer); expected e.g. 1,2,3") from None
        if value < 0 or value >= 2**31:
            raise argparse.ArgumentTypeError(f"token id {value} out of range [0, 2**31)")
        ids.append(value)
    return ids


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def port_number(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {value}")
    return value


def http_port_number(text: str) -> int:
    """A port, or -1 (off)."""
    return -1 if text.strip() == "-1" else port_number(text)


# -- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelgrid",
        description="Serve large models split into pipeline stages across workers.",
        epilog="Start here: `modelgrid up --demo`, then `modelgrid generate --model demo --prompt hello`.",
    )
    parser.add_argument("--version", action="version", version=f"modelgrid {_package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--gateway", metavar="HOST:PORT", default=None,
        help=f"gateway address (env {ADDRESS_ENV}, default {DEFAULT_ADDRESS})",
    )
    client.add_argument("--timeout", type=float, default=None, metavar="S", help="deadline of the call in seconds")
    add_key_argument(client)
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of a table")

    up = sub.add_parser("up", help="start the whole platform locally (Redis, registry, scheduler, gateway, workers)")
    up.add_argument("--workers", type=_int_at_least(1), default=2, help="number of workers (default 2)")
    up.add_argument("--port", type=port_number, default=50051, help="gateway port (default 50051)")
    up.add_argument("--http-port", type=http_port_number, default=8000,
                    help="port of the gateway's OpenAI-compatible HTTP API (default 8000; -1 disables it)")
    up.add_argument("--host", default="127.0.0.1", help="interface the gateway listens on (default 127.0.0.1)")
    up.add_argument(
        "--data-dir", default=None,
        help=f"registry database, artifacts, caches and logs (env {DATA_DIR_ENV}, default {DEFAULT_DATA_DIR})",
    )
    up.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    up.add_argument("--db-url", default=None, help="registry database URL (default: SQLite in the data dir)")
    up.add_argument("--demo", action="store_true", help="register a small random llama model as 'demo'")
    up.add_argument("--api-key", default=None, metavar="KEY",
                    help="the first admin API key (default: the data dir's api-key file, else a new key, printed "
                         "once and saved there with mode 0600)")
    up.add_argument("--log-level", default="INFO", help="log level of the services (default INFO)")
    up.add_argument("--start-timeout", type=float, default=180.0, metavar="S",
                    help="seconds to wait for each step of start-up (default 180)")
    up.set_defaults(func=cmd_up)

    models = sub.add_parser("models", help="register and manage models").add_subparsers(
        dest="models_command", metavar="ACTION", required=True
    )
    reg = models.add_parser("register", parents=[client, as_json], help="upload a Hugging Face checkpoint directory")
    reg.add_argument("directory", metavar="DIR")
    reg.add_argument("--name", required=True, help="model name ([a-z0-9][a-z0-9._-]*)")
    reg.add_argument("--alias", action="append", default=[], metavar="A", help="extra alias (repeatable)")
    reg.add_argument("--replicas", type=_int_at_least(0), default=0, help="copies of every stage (0 = keep)")
    reg.add_argument("--stages", type=_int_at_least(0), default=0, help="pipeline stages (0 = scheduler chooses)")
    reg.set_defaults(func=cmd_models_register)
    lst = models.add_parser("list", parents=[client, as_json], help="list models, versions and aliases")
    lst.set_defaults(func=cmd_models_list)
    alias = models.add_parser("alias", parents=[client, as_json], help="point an alias at a version")
    alias.add_argument("name", metavar="NAME")
    alias.add_argument("alias", metavar="ALIAS")
    alias.add_argument("version", metavar="VERSION")
    alias.set_defaults(func=cmd_models_alias)
    rep = models.add_parser("replicas", parents=[client, as_json], help="set how many copies of each stage run")
    rep.add_argument("name", metavar="NAME")
    rep.add_argument("replicas", metavar="R", type=_int_at_least(0))
    rep.set_defaults(func=cmd_models_replicas)

    gen = sub.add_parser("generate", parents=[client], help="generate text, streamed as it comes")
    gen.add_argument("--model", required=True)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (tokenized by the model's tokenizer)")
    prompt.add_argument("--prompt-ids", type=token_ids, metavar="1,2,3", help="prompt as token ids")
    gen.add_argument("--max-tokens", type=_int_at_least(1), default=None, help="new tokens at most (server default 16)")
    gen.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=_int_at_least(0), default=None)
    gen.add_argument("--seed", type=_int_at_least(0), default=None)
    gen.add_argument("--stop", action="append", default=[], metavar="S", help="stop sequence (repeatable)")
    gen.add_argument("--version", default=None, help="version or alias (default latest)")
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")
    gen.set_defaults(func=cmd_generate)

    emb = sub.add_parser("embed", parents=[client, as_json], help="embed texts with an encoder model")
    emb.add_argument("--model", required=True)
    emb.add_argument("--version", default=None, help="version or alias (default latest)")
    emb.add_argument("texts", nargs="+", metavar="TEXT")
    emb.set_defaults(func=cmd_embed)

    wrk = sub.add_parser("workers", parents=[client, as_json], help="list workers, their memory and stages")
    wrk.set_defaults(func=cmd_workers)

    plc = sub.add_parser("placement", parents=[client, as_json], help="show where a model's stages run")
    plc.add_argument("name", metavar="NAME")
    plc.add_argument("--version", default=None, help="version or alias (default latest)")
    plc.set_defaults(func=cmd_placement)

    add_admin_commands(sub, client, as_json, _client)
    add_job_commands(sub, client, as_json, _client)

    # Listed for --help only: main() hands `make-checkpoint ...` to modelgrid.model.cli before parsing.
    sub.add_parser("make-checkpoint", help="write a random Hugging Face checkpoint (see make-checkpoint --help)",
                   add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "make-checkpoint":
        return run_make_checkpoint(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ModelGridError as err:
        print(f"error: {err.code}: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `modelgrid ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run_make_checkpoint(rest: list[str]) -> int:
    """Delegate to the model library's CLI (imports torch, so only when asked)."""
    from modelgrid.model import cli as model_cli

    parser = argparse.ArgumentParser(prog="modelgrid")
    sub = parser.add_subparsers(dest="command")
    model_cli.add_parser(sub)
    names = list(sub.choices)
    if not names:
        print("error: modelgrid.model.cli.add_parser registered no command", file=sys.stderr)
        return 1
    args = parser.parse_args([names[0], *rest])
    try:
        return int(model_cli.run(args) or 0)
    except (ModelGridError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


# -- commands ------------------------------------------------------------------------------------
def _client(args: argparse.Namespace) -> Client:
    return Client(args.gateway, timeout=args.timeout, api_key=find_api_key(args.api_key))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=None, sort_keys=False))


def cmd_up(args: argparse.Namespace) -> int:
    from modelgrid.launcher import LaunchOptions, run_up

    data_dir = args.data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return run_up(LaunchOptions(
        workers=args.workers, port=args.port, http_port=args.http_port, host=args.host, data_dir=data_dir,
        redis_url=args.redis_url,
        db_url=args.db_url, demo=args.demo, log_level=args.log_level, start_timeout_s=args.start_timeout,
        api_key=args.api_key,
    ))


def cmd_generate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        chunks = client.generate(
            args.model, prompt=args.prompt, prompt_ids=args.prompt_ids, max_tokens=args.max_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
            stop=args.stop or None, version=args.version,
        )
        builder = CompletionBuilder()
        for chunk in chunks:
            builder.add(chunk)
            if not args.json and chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        done = builder.build()
    if args.json:
        _print_json({
            "model": args.model, "version": done.version, "text": done.text, "token_ids": done.token_ids,
            "logprobs": done.logprobs, "finish_reason": done.finish_reason, "usage": dataclasses.asdict(done.usage),
        })
    else:
        sys.stdout.write("\n")
        if sys.stderr.isatty():
            print(f"[{done.finish_reason}; {done.usage.completion_tokens} tokens; {args.model} {done.version}]",
                  file=sys.stderr)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    with _client(args) as client:
        vectors = client.embed(args.model, args.texts, version=args.version)
    if args.json:
        _print_json({"model": args.model, "dimensions": len(vectors[0]) if vectors else 0, "embeddings": vectors})
        return 0
    for text, vector in zip(args.texts, vectors):
        head = ", ".join(f"{v:.4f}" for v in vector[:4])
        print(f"{text!r}: [{head}, ...] ({len(vector)} dims)")
    return 0


def cmd_models_register(args: argparse.Namespace) -> int:
    from modelgrid import output

    with _client(args) as client, output.upload_progress(args.name) as progress:
        version = client.register(
            args.directory, args.name, aliases=args.alias, replicas=args.replicas, stages=args.stages,
            progress=progress,
        )
    if args.json:
        _print_json(dataclasses.asdict(version))
    else:
        output.print_registered(version)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from modelgrid import output

    with _client(args) as client:
        models = client.list_models()
    if args.json:
        _print_json([dataclasses.asdict(m) for m in models])
    else:
        output.print_models(models)
    return 0


def cmd_models_alias(args: argparse.Namespace) -> int:
    with _client(args) as client:
        version = client.set_alias(args.name, args.alias, args.version)
    if args.json:
        _print_json(dataclasses.asdict(version))
    else:
        print(f"{args.name}: {args.alias} -> {version.version}")
    return 0


def cmd_models_replicas(args: argparse.Namespace) -> int:
    with _client(args) as client:
        model = client.set_replicas(args.name, args.replicas)
    if args.json:
        _print_json(dataclasses.asdict(model))
    else:
        print(f"{model.name}: {model.replicas} replica(s) of every stage")
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    from modelgrid import output

    with _client(args) as client:
        workers = client.workers()
    if args.json:
        _print_json([dataclasses.asdict(w) for w in workers])
    else:
        output.print_workers(workers)
    return 0


def placement_json(placement: types.Placement) -> dict[str, Any]:
    """Placement as JSON, each stage with inclusive first/last layer and its (first) worker."""
    stages = []
    for index, stage in enumerate(placement.stages):
        first = stage.replicas[0] if stage.replicas else None
        stages.append({
            "index": index,
            "first_layer": stage.first_layer,
            "last_layer": stage.last_layer,
            "start_layer": stage.start_layer,
            "end_layer": stage.end_layer,
            "worker_id": first.worker_id if first else "",
            "address": first.address if first else "",
            "epoch": placement.epoch,
            "replicas": [dataclasses.asdict(r) for r in stage.replicas],
        })
    return {
        "model": placement.model, "version": placement.version, "epoch": placement.epoch,
        "state": placement.state, "message": placement.message, "stages": stages,
    }


def cmd_placement(args: argparse.Namespace) -> int:
    from modelgrid import output

    with _client(args) as client:
        placement = client.placement(args.name, args.version)
    if args.json:
        _print_json(placement_json(placement))
    else:
        output.print_placement(placement)
    return 0


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelgrid")
    except PackageNotFoundError:
        return "dev"


if __name__ == "__main__":
    sys.exit(main())
