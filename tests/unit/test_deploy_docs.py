"""docs/deploy.md names only settings that exist and documents every compose-level variable."""

from __future__ import annotations

import re

from tests.unit.test_deploy_contract import ROOT, SERVICES, service_settings

DOC = ROOT / "docs" / "deploy.md"


def test_doc_names_only_settings_the_services_read() -> None:
    known: set[str] = set()
    for service in SERVICES:
        known |= set(service_settings(service))
    named = set(re.findall(r"\bMODELGRID_[A-Z0-9_]*[A-Z0-9]\b", DOC.read_text()))
    unknown = sorted(named - known)
    assert not unknown, f"docs/deploy.md names settings no service reads: {unknown}"


def test_doc_lists_every_compose_variable() -> None:
    compose_vars = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", (ROOT / "docker-compose.yml").read_text()))
    assert compose_vars, "docker-compose.yml uses no variables?"
    doc = DOC.read_text()
    missing = sorted(v for v in compose_vars if f"`{v}`" not in doc)
    assert not missing, f"docs/deploy.md does not document compose variables {missing}"
