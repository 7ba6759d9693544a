"""Build a service's config dataclass from command-line flags and environment variables.

Each field of a config dataclass declares its flag, its environment variable and its help through
`setting(...)`; `parse_settings` builds the argparse parser from them. Precedence: flag > env > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Mapping, Sequence, TypeVar

T = TypeVar("T")


def setting(default: Any, env: str, help: str) -> Any:
    """A config field with an environment variable and a help text."""
    return dataclasses.field(default=default, metadata={"env": env, "help": help})


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def parse_settings(
    cls: type[T],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    description: str | None = None,
) -> T:
    """Parse argv and environ into cls; exit with a clear message on a bad value."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    fields = [f for f in dataclasses.fields(cls) if "env" in f.metadata]
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        parser.add_argument(
            flag,
            dest=f.name,
            default=None,
            help=f"{f.metadata['help']} (env {f.metadata['env']}, default {f.default!r})",
        )
    ns = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields:
        raw = getattr(ns, f.name)
        source = f"--{f.name.replace('_', '-')}"
        if raw is None and f.metadata["env"] in environ:
            raw = environ[f.metadata["env"]]
            source = f.metadata["env"]
        if raw is None:
            continue
        kind = type(f.default)
        try:
            if kind is bool:
                values[f.name] = _parse_bool(raw)
            elif kind in (int, float):
                values[f.name] = kind(raw)
            else:
                values[f.name] = raw
        except ValueError:
            parser.error(f"{source}: expected {kind.__name__}, got {raw!r}")
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as err:
            parser.error(str(err))
    return config
