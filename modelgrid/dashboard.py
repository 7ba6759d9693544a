"""`modelgrid status` (the cluster on one screen) and `modelgrid keys` output, rendered with rich."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

from modelgrid import types
from modelgrid.admin import ApiKeyInfo, CreatedKey, GatewayStats
from modelgrid.output import _stdout, human_bytes, layers

if TYPE_CHECKING:
    from modelgrid.client import Client


@dataclass(frozen=True)
class ClusterStatus:
    """What `modelgrid status` shows, fetched from one gateway (admin calls)."""

    gateway: str
    workers: list[types.WorkerInfo]
    placements: list[types.Placement]
    stats: GatewayStats


def fetch_status(client: Client) -> ClusterStatus:
    return ClusterStatus(client.address, client.workers(), client.placements(), client.stats())


def _workers_table(workers: list[types.WorkerInfo]) -> Table:
    table = Table("WORKER", "DEVICE", "STATE", "MEMORY USED", "KV CACHE", "SESSIONS", "STAGES", "HEARTBEAT",
                  box=None, title="workers", title_justify="left")
    for w in sorted(workers, key=lambda w: w.worker_id):
        stages = ", ".join(f"{s.model}:{s.version}[{layers(s.start_layer, s.end_layer)}]" for s in w.stages)
        table.add_row(
            w.worker_id, w.device, w.state,
            f"{human_bytes(w.total_memory - w.free_memory)} / {human_bytes(w.total_memory)}",
            human_bytes(w.kv_cache_bytes), str(w.active_sessions), stages or "-", f"{w.heartbeat_age_s:.1f} s ago",
        )
    if not workers:
        table.add_row("(no workers registered)", "", "", "", "", "", "", "")
    return table


def _placements_table(placements: list[types.Placement]) -> Table:
    table = Table("MODEL", "VERSION", "STATE", "EPOCH", "STAGES (layers: workers)", box=None, title="placements",
                  title_justify="left")
    for p in sorted(placements, key=lambda p: (p.model, p.version)):
        stages = "  ".join(
            f"{layers(s.start_layer, s.end_layer)}: "
            + ",".join(r.worker_id + ("" if r.ready else "(loading)") for r in s.replicas)
            for s in p.stages
        )
        state = p.state + (f" ({p.message})" if p.message else "")
        table.add_row(p.model, p.version, state, str(p.epoch), stages or "-")
    if not placements:
        table.add_row("(nothing placed)", "", "", "", "")
    return table


def _traffic_table(stats: GatewayStats) -> Table:
    window = max(min(stats.window_s, stats.uptime_s), 1.0)  # a gateway up for 10 s has 10 s of traffic
    table = Table("MODEL", "REQ/S", "ERRORS", "TOKENS IN/S", "TOKENS OUT/S", box=None,
                  title=f"traffic through this gateway, last {window:.0f} s", title_justify="left")
    for m in stats.models:
        table.add_row(m.model, f"{m.requests / window:.2f}", str(m.errors), f"{m.prompt_tokens / window:.1f}",
                      f"{m.completion_tokens / window:.1f}")
    if not stats.models:
        table.add_row("(no requests)", "", "", "", "")
    return table


def render_status(status: ClusterStatus) -> Panel:
    s = status.stats
    head = (f"gateway {status.gateway}: up {s.uptime_s:.0f} s, {s.active_streams} open stream(s), "
            f"{s.requests_total} request(s) served; {time.strftime('%H:%M:%S')}")
    body = Group(head, "", _workers_table(status.workers), "", _placements_table(status.placements), "",
                 _traffic_table(s))
    return Panel(body, title="ModelGrid", title_align="left", expand=False)


def print_status(status: ClusterStatus, console: Console | None = None) -> None:
    (console or _stdout()).print(render_status(status))


def _ms(unix_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(unix_ms / 1000)) if unix_ms else "-"


def _limit(value: int) -> str:
    return str(value) if value else "-"


def print_keys(keys: list[ApiKeyInfo]) -> None:
    if not keys:
        _stdout().print("no API keys; create one with `modelgrid keys create --name NAME`")
        return
    table = Table("NAME", "ID", "PREFIX", "ROLE", "RPM", "TPM", "STREAMS", "CREATED", "REVOKED", box=None)
    for k in keys:
        table.add_row(k.name, k.key_id, k.prefix + "...", "admin" if k.admin else "user",
                      _limit(k.limits.requests_per_minute), _limit(k.limits.tokens_per_minute),
                      _limit(k.limits.max_streams), _ms(k.created_unix_ms), _ms(k.revoked_unix_ms))
    _stdout().print(table)


def print_created(created: CreatedKey) -> None:
    k = created.key
    console = _stdout()
    console.print(f"created {'admin' if k.admin else 'user'} key [bold]{k.name}[/] ({k.key_id}). "
                  "Store it now: it is not shown again.", highlight=False)
    print(created.secret, flush=True)  # plain, alone on its line: easy to copy or capture
