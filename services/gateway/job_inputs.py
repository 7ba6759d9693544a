"""The items of a batch job, checked before anything is recorded: inline items or a JSONL file.

A JSONL file has one JSON object per line: {"id": ..., "text": ...} for an embed job, {"id": ..., "prompt": ...,
"max_tokens": ...} for a generate job; blank lines are skipped. The first bad line fails the whole submission
with INVALID_ARGUMENT naming its line number (1-based, as editors count), so a job never starts half-valid.
An id is a string or an integer (kept as its decimal string), unique within the job; without one, an item's id
is its 0-based position among the items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from modelgrid.errors import InvalidArgument
from services.gateway.domain import JobSettings

KINDS = ("embed", "generate")
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 100_000
FIELDS = {"embed": ("id", "text"), "generate": ("id", "prompt", "max_tokens")}


@dataclass(frozen=True)
class JobInput:
    """One checked item: text for embed; prompt and max_tokens (0 = the job's) for generate."""

    item_id: str
    text: str = ""
    prompt: str = ""
    max_tokens: int = 0


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InvalidArgument(f"job kind must be 'embed' or 'generate', got {kind!r}")
    return kind


def parse_jsonl(data: bytes, kind: str, max_items: int, max_tokens_cap: int) -> list[JobInput]:
    """The items of a JSONL file; InvalidArgument names the first bad line."""
    check_kind(kind)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InvalidArgument(f"line {line}: the JSONL file is not valid UTF-8 (byte {err.start})") from None
    rows: list[tuple[str, dict[str, Any]]] = []
    for number, line in _lines(text):
        where = f"line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise InvalidArgument(f"{where}: not valid JSON ({err.msg} at column {err.colno}): {_clip(line)}") from None
        rows.append((where, value))
        if len(rows) > max_items:
            raise InvalidArgument(f"{where}: a job takes at most {max_items} items; split the file")
    return _check_items(rows, kind, max_items, max_tokens_cap, "the JSONL file has no items (every line is blank)")


def check_items(items: Sequence[dict[str, Any]], kind: str, max_items: int, max_tokens_cap: int) -> list[JobInput]:
    """Inline items (as dicts of the fields that are set); InvalidArgument names the first bad item."""
    check_kind(kind)
    rows = [(f"items[{i}]", item) for i, item in enumerate(items)]
    return _check_items(rows, kind, max_items, max_tokens_cap, "a job needs at least one item")


def _lines(text: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, line


def _clip(line: str, limit: int = 80) -> str:
    return line if len(line) <= limit else line[:limit] + "..."


def _check_items(
    rows: Sequence[tuple[str, Any]], kind: str, max_items: int, max_tokens_cap: int, empty: str
) -> list[JobInput]:
    if not rows:
        raise InvalidArgument(empty)
    if len(rows) > max_items:
        raise InvalidArgument(f"a job takes at most {max_items} items, got {len(rows)}; split it")
    build: Callable[[str, dict[str, Any], str], JobInput] = (
        _embed_item if kind == "embed" else lambda where, v, i: _generate_item(where, v, i, max_tokens_cap))
    seen: dict[str, str] = {}
    items = []
    for index, (where, value) in enumerate(rows):
        if not isinstance(value, dict):
            raise InvalidArgument(f"{where}: expected a JSON object like {_example(kind)}, got {type(value).__name__}")
        unknown = sorted(set(value) - set(FIELDS[kind]))
        if unknown:
            raise InvalidArgument(
                f"{where}: unknown field {unknown[0]!r} ({kind} items have: {', '.join(FIELDS[kind])})")
        item = build(where, value, _item_id(where, value.get("id"), index))
        if item.item_id in seen:
            raise InvalidArgument(f"{where}: id {item.item_id!r} is used twice (first at {seen[item.item_id]})")
        seen[item.item_id] = where
        items.append(item)
    return items


def _example(kind: str) -> str:
    return '{"id": "a", "text": "..."}' if kind == "embed" else '{"id": "a", "prompt": "...", "max_tokens": 32}'


def _item_id(where: str, value: Any, index: int) -> str:
    if value is None or value == "":
        return str(index)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidArgument(f"{where}: id must be a string or an integer, got {json.dumps(value)}")
    item_id = str(value)
    if len(item_id) > MAX_ID_CHARS:
        raise InvalidArgument(f"{where}: id is longer than {MAX_ID_CHARS} characters")
    return item_id


def _string(where: str, value: dict[str, Any], name: str) -> str:
    text = value.get(name)
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument(f"{where}: {name!r} must be a non-empty string, got {_clip(json.dumps(text))}")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidArgument(f"{where}: {name!r} is longer than {MAX_TEXT_CHARS} characters")
    return text


def _embed_item(where: str, value: dict[str, Any], item_id: str) -> JobInput:
    return JobInput(item_id, text=_string(where, value, "text"))


def _generate_item(where: str, value: dict[str, Any], item_id: str, max_tokens_cap: int) -> JobInput:
    prompt = _string(where, value, "prompt")
    max_tokens = value.get("max_tokens")
    if max_tokens is None:
        return JobInput(item_id, prompt=prompt)  # max_tokens 0: the job's
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_tokens_cap:
        raise InvalidArgument(
            f"{where}: max_tokens must be an integer in [1, {max_tokens_cap}] (or absent), got {json.dumps(max_tokens)}")
    return JobInput(item_id, prompt=prompt, max_tokens=max_tokens)


@dataclass(frozen=True)
class JobSubmission:
    """A checked SubmitJob request."""

    model: str
    version: str  # version or alias; "" = latest
    kind: str
    items: tuple[JobInput, ...]
    settings: JobSettings
