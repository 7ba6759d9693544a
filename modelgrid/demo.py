"""`modelgrid up --demo`: a small random llama checkpoint, registered as "demo" and placed.

The checkpoint is written once into the data dir by a child process (so the launcher never imports
torch) and reused by later runs; the registry (SQLite in the data dir) remembers the model, so a
restart only waits for the scheduler to place it on the new workers.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TYPE_CHECKING

from modelgrid.client import Client
from modelgrid.errors import ModelGridError, NotFound
from modelgrid.types import Placement

if TYPE_CHECKING:
    from modelgrid.launcher import Launcher

DEMO_MODEL = "demo"
# Small enough to write, upload and load in seconds on a CPU; 4 layers so 2 stages split evenly.
DEMO_SHAPE = dict(architecture="llama", num_layers=4, hidden_size=128, num_heads=4, vocab_size=2048, seed=0)

_WRITE_SCRIPT = """
import sys
try:
    from modelgrid.model.synthetic import write_random_checkpoint
except ImportError:
    from modelgrid.model import write_random_checkpoint
out = write_random_checkpoint(sys.argv[1], **{shape!r})
print(out)
"""


def ensure_demo(launcher: "Launcher") -> Placement:
    """Create (once), register (once) and wait until the demo model answers a generate call."""
    stages = min(launcher.opts.workers, 2)
    checkpoint = launcher.data_dir / "demo-checkpoint"
    if not (checkpoint / "config.json").exists() or not any(checkpoint.glob("*.safetensors")):
        tmp = launcher.data_dir / "demo-checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with launcher.console.status("writing the demo checkpoint ..."):
            launcher.run_helper("demo-checkpoint", [sys.executable, "-c", _WRITE_SCRIPT.format(shape=DEMO_SHAPE),
                                                    str(tmp)], launcher.opts.start_timeout_s)
        shutil.rmtree(checkpoint, ignore_errors=True)
        tmp.rename(checkpoint)
        launcher.console.print(f"[green]✓[/] demo checkpoint written to {checkpoint}")

    with Client(launcher.gateway_address, timeout=120.0, api_key=launcher.api_key) as client:
        try:
            model = client.get_model(DEMO_MODEL)
            launcher.console.print(f"[green]✓[/] demo model already registered ({len(model.versions)} version(s))")
        except NotFound:
            with launcher.console.status("registering the demo model ..."):
                version = client.register(checkpoint, DEMO_MODEL, replicas=1, stages=stages)
            launcher.console.print(f"[green]✓[/] registered demo {version.version} "
                                   f"({version.num_layers} layers, {stages} stage(s))")
        except ModelGridError as err:
            from modelgrid.launcher import StartupError

            raise StartupError(f"cannot register the demo model: {err.code}: {err.message}") from err
        with launcher.console.status("placing the demo model on the workers ..."):
            placement = _wait_placed(launcher, client)
    spans = ", ".join(
        f"layers {s.first_layer}-{s.last_layer} on {s.replicas[0].worker_id if s.replicas else '?'}"
        for s in placement.stages
    )
    launcher.console.print(f"[green]✓[/] demo {placement.version} placed: {spans}")
    return placement


def _wait_placed(launcher: "Launcher", client: Client) -> Placement:
    from modelgrid.launcher import StartupError

    deadline = time.monotonic() + launcher.opts.start_timeout_s
    last = "not placed yet"
    while True:
        launcher.check_stop()
        try:
            placement = client.placement(DEMO_MODEL)
            if placement.ready:
                client.generate_text(DEMO_MODEL, prompt="hello", max_tokens=1, temperature=0.0)
                return placement
            last = f"placement {placement.state}" + (f": {placement.message}" if placement.message else "")
        except ModelGridError as err:  # UNAVAILABLE / NOT_FOUND until the scheduler has placed it
            last = f"{err.code}: {err.message}"
        if time.monotonic() > deadline:
            raise StartupError(
                f"the demo model is not serving after {launcher.opts.start_timeout_s:.0f} s (last: {last}); "
                f"see the logs in {launcher.logs}"
            )
        launcher.sleep(0.25)
