"""Human-readable output of the CLI (rich tables and progress bars); JSON output lives in cli.py."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from modelgrid import types



def _stdout() -> Console:
    """A console on stdout; when piped, wide enough that tables are not squeezed into 80 columns."""
    return Console(width=None if sys.stdout.isatty() else 200)


err_console = Console(stderr=True)


def human_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def layers(start: int, end: int) -> str:
    """Inclusive layer range of [start, end)."""
    return f"{start}" if end - start == 1 else f"{start}-{end - 1}"


@contextlib.contextmanager
def upload_progress(name: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr for an upload; yields the SDK's progress(sent, total) callback."""
    progress = Progress(
        TextColumn(f"uploading [bold]{name}[/]"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err_console, transient=True,
    )
    task = progress.add_task("upload", total=None)

    def update(sent: int, total: int) -> None:
        progress.update(task, completed=sent, total=total)

    with progress:
        yield update


def print_registered(version: types.VersionInfo) -> None:
    aliases = ", ".join(version.aliases) or "none"
    _stdout().print(
        f"registered [bold]{version.model} {version.version}[/]: {version.architecture} {version.kind}, "
        f"{version.num_layers} layers, {human_bytes(version.total_bytes)}; aliases: {aliases}"
    )


def print_models(models: list[types.ModelInfo]) -> None:
    if not models:
        _stdout().print("no models registered; register one with `modelgrid models register DIR --name NAME`")
        return
    table = Table("MODEL", "VERSIONS", "ALIASES", "ARCH", "LAYERS", "REPLICAS", "STAGES", box=None)
    for m in models:
        latest = m.latest
        table.add_row(
            m.name,
            ", ".join(v.version for v in m.versions),
            ", ".join(f"{a}->{v}" for a, v in m.aliases.items()),
            latest.architecture if latest else "",
            str(latest.num_layers) if latest else "",
            str(m.replicas),
            str(m.num_stages) if m.num_stages else "auto",
        )
    _stdout().print(table)


def print_workers(workers: list[types.WorkerInfo]) -> None:
    if not workers:
        _stdout().print("no workers registered with the scheduler")
        return
    table = Table("WORKER", "ADDRESS", "DEVICE", "STATE", "MEMORY USED", "STAGES", "SESSIONS", "HEARTBEAT", box=None)
    for w in workers:
        used = w.total_memory - w.free_memory
        stages = ", ".join(f"{s.model}:{s.version}[{layers(s.start_layer, s.end_layer)}]" for s in w.stages)
        table.add_row(
            w.worker_id, w.address, w.device, w.state,
            f"{human_bytes(used)} / {human_bytes(w.total_memory)}",
            stages or "-", str(w.active_sessions), f"{w.heartbeat_age_s:.1f} s ago",
        )
    _stdout().print(table)


def print_placement(placement: types.Placement) -> None:
    _stdout().print(
        f"[bold]{placement.model} {placement.version}[/]: {placement.state}, epoch {placement.epoch}"
        + (f" ({placement.message})" if placement.message else "")
    )
    table = Table("STAGE", "LAYERS", "WORKER", "ADDRESS", "READY", box=None)
    for index, stage in enumerate(placement.stages):
        for i, replica in enumerate(stage.replicas or [types.Replica("-", "-", False)]):
            table.add_row(
                str(index) if i == 0 else "", layers(stage.start_layer, stage.end_layer) if i == 0 else "",
                replica.worker_id, replica.address, "yes" if replica.ready else "no",
            )
    _stdout().print(table)
