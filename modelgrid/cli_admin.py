"""The CLI's admin verbs (`keys create|list|revoke`, `status`) and where every verb finds its API key.

The key of a call: --api-key, else $MODELGRID_API_KEY, else the file `modelgrid up` writes, <data dir>/api-key
($MODELGRID_DATA_DIR, else ./modelgrid-data), so the CLI works on the machine that runs `modelgrid up`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

from modelgrid.admin import API_KEY_ENV

DATA_DIR_ENV = "MODELGRID_DATA_DIR"
DEFAULT_DATA_DIR = "./modelgrid-data"
KEY_FILE = "api-key"


def key_file(data_dir: str | os.PathLike[str] | None = None) -> Path:
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR) / KEY_FILE


def find_api_key(explicit: str | None) -> str | None:
    """--api-key, else $MODELGRID_API_KEY, else <data dir>/api-key when readable, else None."""
    if explicit:
        return explicit
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    try:
        return key_file().read_text().strip() or None
    except OSError:
        return None


def add_key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key", default=None, metavar="KEY",
        help=f"API key (default: env {API_KEY_ENV}, else the api-key file in ${DATA_DIR_ENV} or {DEFAULT_DATA_DIR})",
    )


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = unlimited), got {value}")
    return value


def add_admin_commands(
    sub: Any, client: argparse.ArgumentParser, as_json: argparse.ArgumentParser,
    make_client: Callable[[argparse.Namespace], Any],
) -> None:
    """Add `keys` and `status` to the CLI; make_client(args) opens a Client from the common flags."""
    keys = sub.add_parser("keys", help="create, list and revoke API keys (admin)").add_subparsers(
        dest="keys_command", metavar="ACTION", required=True
    )
    create = keys.add_parser("create", parents=[client, as_json], help="create a key and print it (once)")
    create.add_argument("--name", required=True, help="unique name of the key")
    create.add_argument("--admin", action="store_true", help="may call admin verbs (models, keys, workers)")
    create.add_argument("--rpm", type=_non_negative, default=0, help="requests per minute (0 = unlimited)")
    create.add_argument("--tpm", type=_non_negative, default=0,
                        help="prompt + generated tokens per minute (0 = unlimited)")
    create.add_argument("--max-streams", type=_non_negative, default=0, help="concurrent generations (0 = unlimited)")
    create.set_defaults(func=lambda args: _create(args, make_client))
    lst = keys.add_parser("list", parents=[client, as_json], help="list keys (never the keys themselves)")
    lst.add_argument("--all", action="store_true", help="include revoked keys")
    lst.set_defaults(func=lambda args: _list(args, make_client))
    revoke = keys.add_parser("revoke", parents=[client, as_json], help="revoke a key by name or id")
    revoke.add_argument("key", metavar="NAME_OR_ID")
    revoke.set_defaults(func=lambda args: _revoke(args, make_client))

    status = sub.add_parser("status", parents=[client, as_json],
                            help="workers, placements and request rates on one screen (admin)")
    status.set_defaults(func=lambda args: _status(args, make_client))


def _print_json(value: Any) -> None:
    print(json.dumps(value))


def _create(args: argparse.Namespace, make_client: Callable[[argparse.Namespace], Any]) -> int:
    from modelgrid import dashboard

    with make_client(args) as client:
        created = client.create_key(args.name, admin_key=args.admin, requests_per_minute=args.rpm,
                                    tokens_per_minute=args.tpm, max_streams=args.max_streams)
    if args.json:
        _print_json({**dataclasses.asdict(created.key), "secret": created.secret})
    else:
        dashboard.print_created(created)
    return 0


def _list(args: argparse.Namespace, make_client: Callable[[argparse.Namespace], Any]) -> int:
    from modelgrid import dashboard

    with make_client(args) as client:
        found = client.list_keys(include_revoked=args.all)
    if args.json:
        _print_json([dataclasses.asdict(k) for k in found])
    else:
        dashboard.print_keys(found)
    return 0


def _revoke(args: argparse.Namespace, make_client: Callable[[argparse.Namespace], Any]) -> int:
    with make_client(args) as client:
        key = client.revoke_key(args.key)
    if args.json:
        _print_json(dataclasses.asdict(key))
    else:
        print(f"revoked {key.name} ({key.key_id}, {key.prefix}...)")
    return 0


def _status(args: argparse.Namespace, make_client: Callable[[argparse.Namespace], Any]) -> int:
    from modelgrid import dashboard

    with make_client(args) as client:
        status = dashboard.fetch_status(client)
    if args.json:
        _print_json(dataclasses.asdict(status))
    else:
        dashboard.print_status(status)
    return 0


def new_api_key() -> str:
    import secrets

    return "mg_" + secrets.token_urlsafe(32)


def save_key_file(data_dir: str | os.PathLike[str], key: str) -> Path:
    """Write <data_dir>/api-key readable by its owner only (created 0600, never world-readable on the way)."""
    path = key_file(data_dir)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"{key}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path
