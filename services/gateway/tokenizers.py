"""Tokenizers of registered versions (cached per version) and incremental detokenization.

A version's tokenizer is its tokenizer.json (loaded with the `tokenizers` library, as transformers' fast
tokenizers are) plus tokenizer_config.json. Special tokens follow transformers: the tokenizer.json
post-processor adds them (a Llama checkpoint's template adds <s>, Qwen2's adds nothing, BERT's adds
[CLS] ... [SEP]); when tokenizer_config.json says add_bos_token: true and the template did not add the
BOS token, it is prepended, as transformers' Llama tokenizers do.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from tokenizers import Tokenizer

from modelgrid.errors import FailedPrecondition, NotFound
from services.gateway.domain import VersionInfo

log = logging.getLogger(__name__)

# Prompt tokens the detokenizer decodes with the first new tokens, so that the first piece gets the
# spacing it has after the prompt (SentencePiece-style tokenizers drop a leading space otherwise).
PROMPT_CONTEXT_TOKENS = 6


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


@dataclass
class ModelTokenizer:
    """One version's tokenizer, set up the way transformers would load the checkpoint."""

    tokenizer: Tokenizer
    bos_id: int | None  # prepended when add_bos is set and the template did not add it
    add_bos: bool
    pad_id: int

    @classmethod
    def from_files(
        cls,
        tokenizer_json: str,
        tokenizer_config: dict[str, Any],
        model_config: dict[str, Any],
        truncate_to: int | None = None,
    ) -> "ModelTokenizer":
        """Build from the files' contents; truncate_to (encoders) caps every encoding, special tokens included."""
        tokenizer = Tokenizer.from_str(tokenizer_json)
        padding = tokenizer.padding
        tokenizer.no_padding()
        tokenizer.no_truncation()
        if truncate_to is not None:
            tokenizer.enable_truncation(max_length=truncate_to)

        def token_id(name: str) -> int | None:
            content = _token_content(tokenizer_config.get(name))
            found = tokenizer.token_to_id(content) if content is not None else None
            if found is None:
                config_id = model_config.get(f"{name}_id")
                found = config_id if isinstance(config_id, int) else None
            return found

        pad_id = padding["pad_id"] if padding else token_id("pad_token")
        return cls(
            tokenizer=tokenizer,
            bos_id=token_id("bos_token"),
            add_bos=tokenizer_config.get("add_bos_token") is True,
            pad_id=int(pad_id or 0),
        )

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        return self._with_bos(ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._with_bos(e.ids) for e in self.tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> "Detokenizer":
        return Detokenizer(self.tokenizer, prompt_ids[-PROMPT_CONTEXT_TOKENS:])

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            return [self.bos_id, *ids]
        return ids


class Detokenizer:
    """Turns generated token ids into text pieces as they come.

    Decoding a token alone is wrong in two ways: a multi-byte UTF-8 character may span several
    byte-level tokens (a lone piece decodes to U+FFFD), and some decoders change a token's text by
    what precedes it. So each step decodes a small window of recent ids and emits the text that the
    new tokens added; while the window's text ends in an incomplete character, nothing is emitted.
    Concatenated, the pieces (plus `flush()`) equal decoding all the new ids at once.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(context_ids)
        self._read = len(self._ids)  # ids before it have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """The text this token completes ("" while a character or a special token gives nothing yet)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end decodes to U+FFFD, as decode would)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[: self._read])
        new_text = self._decode(self._ids)
        if len(new_text) <= len(prefix_text) or (not final and new_text.endswith("\ufffd")):
            return ""
        piece = new_text[len(prefix_text) :]
        # keep only the ids the next window needs
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return piece


FetchFile = Callable[[str, str, str], Awaitable[bytes]]


class TokenizerCache:
    """Per-version tokenizers, fetched from the registry once (concurrent requests share the fetch)."""

    def __init__(self, fetch_file: FetchFile, max_entries: int = 16) -> None:
        self._fetch_file = fetch_file
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], asyncio.Task[ModelTokenizer]] = OrderedDict()

    async def get(self, version: VersionInfo) -> ModelTokenizer:
        key = (version.model, version.version)
        task = self._entries.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(version))
            self._entries[key] = task
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        try:
            return await asyncio.shield(task)
        except BaseException:
            if task.done() and self._entries.get(key) is task:
                del self._entries[key]  # a failed fetch is not cached
            raise

    async def _load(self, version: VersionInfo) -> ModelTokenizer:
        try:
            tokenizer_json = await self._fetch_file(version.model, version.version, "tokenizer.json")
        except NotFound:
            raise FailedPrecondition(
                f"{version.label} has no tokenizer.json; register the version with its tokenizer"
            ) from None
        try:
            raw_config = await self._fetch_file(version.model, version.version, "tokenizer_config.json")
            tokenizer_config = json.loads(raw_config) if raw_config else {}
        except NotFound:
            tokenizer_config = {}
        except ValueError:
            log.warning("%s: tokenizer_config.json is not valid JSON; ignoring it", version.label)
            tokenizer_config = {}
        truncate_to = version.max_context if version.kind == "encoder" else None

        def build() -> ModelTokenizer:
            return ModelTokenizer.from_files(
                tokenizer_json.decode("utf-8"), tokenizer_config if isinstance(tokenizer_config, dict) else {},
                version.config, truncate_to,
            )

        try:
            tokenizer = await asyncio.to_thread(build)
        except Exception as err:  # the registry validated it, so this is a corrupt artifact
            raise FailedPrecondition(f"{version.label}: tokenizer.json does not load: {err}") from err
        log.info("loaded the tokenizer of %s (%d tokens)", version.label, tokenizer.tokenizer.get_vocab_size())
        return tokenizer
