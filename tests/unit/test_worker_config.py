"""WorkerConfig: the brief's flag/env names, defaults, and refusals that say what to pass."""

from __future__ import annotations

import pytest

from services.common.settings import parse_settings
from services.worker.config import WorkerConfig


def test_flags_env_and_defaults() -> None:
    c = parse_settings(WorkerConfig, ["--listen", "127.0.0.1:0", "--memory-bytes", "123"],
                       {"MODELGRID_SCHEDULER_ADDR": "sched:1", "MODELGRID_SESSION_IDLE_TIMEOUT_S": "2.5",
                        "MODELGRID_WORKER_LISTEN": "0.0.0.0:9"})
    assert c.listen == "127.0.0.1:0" and c.memory_bytes == 123 and c.scheduler == "sched:1"
    assert c.session_idle_timeout_s == 2.5
    d = parse_settings(WorkerConfig, [], {})
    assert (d.listen, d.metrics_port, d.registry, d.device, d.grace_s) == (
        "0.0.0.0:50061", 9094, "127.0.0.1:50052", "auto", 30.0)
    assert str(d.cache_path()).endswith(".cache/modelgrid")
    worker_id, address = d.identity(50061)
    assert address == "127.0.0.1:50061" and worker_id.endswith("-50061")


@pytest.mark.parametrize("argv,message", [
    (["--listen", "nohost"], "--listen must be host:port"),
    (["--device", "tpu"], "--device must be"),
    (["--memory-bytes", "-1"], "--memory-bytes"),
    (["--session-idle-timeout-s", "0"], "--session-idle-timeout-s"),
])
def test_bad_values_are_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_settings(WorkerConfig, argv, {})
    assert message in capsys.readouterr().err
