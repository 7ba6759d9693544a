"""Chat messages -> the prompt a model was trained on: its chat template, or a simple default.

A version's template is `chat_template.jinja` when the checkpoint has one, else the `chat_template` of
tokenizer_config.json (a string, or a list of named templates of which "default" is used). It is
rendered as transformers' `apply_chat_template(messages, add_generation_prompt=True)` renders it: a
sandboxed Jinja environment with trim_blocks / lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a JSON `tojson`, and the special tokens (bos_token, eos_token, ...) as variables; the
rendered text is then tokenized WITHOUT adding special tokens (the template writes them itself).

A model without a template gets the documented default:

    system: <content>
    user: <content>
    assistant: <content>
    assistant:

(one "<role>: <content>" line per message, then "assistant:"), tokenized like a completion prompt.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Awaitable, Callable, Sequence

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from modelgrid.errors import FailedPrecondition, InvalidArgument, NotFound
from services.gateway.domain import VersionInfo

log = logging.getLogger(__name__)

TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


def default_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The prompt of a model without a chat template (see the module docstring)."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _special_token(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    template: jinja2.Template
    special_tokens: dict[str, str]

    @classmethod
    def compile(cls, source: str, tokenizer_config: dict[str, Any], label: str) -> "ChatTemplate":
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            template = env.from_string(source)
        except jinja2.exceptions.TemplateError as err:
            raise FailedPrecondition(f"the chat template of {label} does not compile: {err}") from None
        tokens = {name: tok for name in SPECIAL_TOKENS if (tok := _special_token(tokenizer_config.get(name)))}
        return cls(template, tokens)

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt for messages, ending where the assistant's answer starts."""
        try:
            return self.template.render(
                messages=list(messages), add_generation_prompt=True, tools=None, documents=None,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as err:  # raise_exception(...): the template refuses the messages
            raise InvalidArgument(f"the model's chat template refused the messages: {err}") from None


def template_source(tokenizer_config: dict[str, Any], template_file: str | None) -> str | None:
    """The template text of a checkpoint (chat_template.jinja wins), or None."""
    if template_file:
        return template_file
    value = tokenizer_config.get("chat_template")
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


FetchFile = Callable[[str, str, str], Awaitable[bytes]]


class ChatTemplates:
    """Per-version chat templates (None for a model without one), fetched from the registry once."""

    def __init__(self, fetch_file: FetchFile, max_entries: int = 16) -> None:
        self._fetch_file = fetch_file
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], ChatTemplate | None] = OrderedDict()

    async def get(self, version: VersionInfo) -> ChatTemplate | None:
        key = (version.model, version.version)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        template = await self._load(version)
        self._entries[key] = template
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return template

    async def _read(self, version: VersionInfo, path: str) -> str | None:
        if version.files and path not in version.files:
            return None
        try:
            return (await self._fetch_file(version.model, version.version, path)).decode("utf-8", "replace")
        except NotFound:
            return None

    async def _load(self, version: VersionInfo) -> ChatTemplate | None:
        template_file, raw_config = await asyncio.gather(
            self._read(version, TEMPLATE_FILE), self._read(version, "tokenizer_config.json")
        )
        try:
            config = json.loads(raw_config) if raw_config else {}
        except ValueError:
            log.warning("%s: tokenizer_config.json is not valid JSON; no chat template", version.label)
            config = {}
        config = config if isinstance(config, dict) else {}
        source = template_source(config, template_file)
        if source is None:
            log.info("%s has no chat template; chat uses the default prompt format", version.label)
            return None
        return ChatTemplate.compile(source, config, version.label)
