"""The SDK and the CLI import (and print help) without torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import ROOT

HEAVY = ("torch", "transformers", "modelgrid.model")

SCRIPT = """
import json, sys
import modelgrid
modelgrid.Client, modelgrid.AsyncClient, modelgrid.errors.NotFound
import modelgrid.cli, modelgrid.launcher, modelgrid.upload, modelgrid.output, modelgrid.demo
try:
    modelgrid.cli.main(["--help"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
try:
    modelgrid.cli.main(["generate", "--help"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") or m.startswith("modelgrid.model"))))
"""


def test_sdk_and_cli_do_not_import_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert heavy == [], f"importing the SDK/CLI pulled in {heavy}"
    assert "make-checkpoint" in proc.stdout and "generate" in proc.stdout


def test_public_names() -> None:
    import modelgrid

    assert modelgrid.Client.__name__ == "Client"
    assert modelgrid.AsyncClient.__name__ == "AsyncClient"
    assert issubclass(modelgrid.NotFound, modelgrid.ModelGridError)
    assert modelgrid.errors.from_code("NOT_FOUND", "x").__class__ is modelgrid.NotFound
    for name in modelgrid.__all__:
        assert hasattr(modelgrid, name), name
