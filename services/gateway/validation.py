"""Request validation: the fields of a request -> plain dataclasses, or InvalidArgument saying what is allowed.

Pure functions (no I/O, no protobuf). Checks run in two steps: `parse_generate` / `parse_embed` check what
the request alone decides (run before any downstream call, so a bad request costs nothing);
`check_token_ids` and `plan_max_tokens` check what depends on the model (vocabulary, context) and the
tokenized prompt.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from modelgrid.errors import InvalidArgument

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# a version ("v2") or an alias ("prod", "latest"); empty means "latest"
VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_STOPS = 4
MAX_STOP_CHARS = 64
MAX_EMBED_TEXTS = 256
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class Limits:
    """Server-side limits (from GatewayConfig)."""

    default_max_tokens: int = 16
    max_tokens_cap: int = 4096
    max_prompt_tokens: int = 8192


@dataclass(frozen=True)
class GenerateParams:
    """A checked Generate request. Exactly one of text / token_ids is set."""

    model: str
    version: str  # version or alias; "" = latest
    text: str | None
    token_ids: tuple[int, ...] | None
    max_tokens: int | None  # None: the default, clamped to the room the model's context leaves
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # 0 = off
    seed: int | None  # None: the gateway picks a random one
    stop: tuple[str, ...]


@dataclass(frozen=True)
class EmbedParams:
    model: str
    version: str
    texts: tuple[str, ...]


def check_model_ref(model: str, version: str) -> None:
    """Model names follow the registry's rule; versions/aliases are plain names (never paths)."""
    if not MODEL_NAME.match(model) or ".." in model:
        raise InvalidArgument(
            f"model name {model!r} is invalid: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit (no '..' or '/')"
        )
    if version and (not VERSION_NAME.match(version) or ".." in version):
        raise InvalidArgument(
            f"version {version!r} is invalid: give a version such as 'v2' or an alias such as 'latest' "
            "(1-64 characters of letters, digits, '.', '_' or '-'), or leave it empty for 'latest'"
        )


def parse_generate(
    *,
    model: str,
    version: str,
    text: str | None,
    token_ids: Sequence[int] | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: Sequence[str],
    limits: Limits,
) -> GenerateParams:
    """Check everything a Generate request decides on its own; None means "not set" (use the default)."""
    check_model_ref(model, version)
    if text is None and token_ids is None:
        raise InvalidArgument("the prompt is empty: set either text or token_ids")
    if text is not None and token_ids is not None:
        raise InvalidArgument("set either text or token_ids as the prompt, not both")
    if text is not None and text == "":
        raise InvalidArgument("the prompt is empty: text must be a non-empty string")
    ids: tuple[int, ...] | None = None
    if token_ids is not None:
        ids = tuple(int(i) for i in token_ids)
        if not ids:
            raise InvalidArgument("the prompt is empty: token_ids must hold at least one token id")
        if len(ids) > limits.max_prompt_tokens:
            raise InvalidArgument(
                f"the prompt is {len(ids)} tokens; at most {limits.max_prompt_tokens} are allowed"
            )
        for i, tok in enumerate(ids):
            if tok < 0:
                raise InvalidArgument(f"token_ids[{i}] = {tok} is negative; token ids are >= 0")
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens_cap:
        raise InvalidArgument(f"max_tokens must be in [1, {limits.max_tokens_cap}], got {max_tokens}")
    temperature = 1.0 if temperature is None else float(temperature)
    if not math.isfinite(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidArgument(
            f"temperature must be a finite number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {temperature}"
        )
    top_p = 1.0 if top_p is None else float(top_p)
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    top_k = 0 if top_k is None else int(top_k)
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {top_k}")
    stops = tuple(stop)
    if len(stops) > MAX_STOPS:
        raise InvalidArgument(f"at most {MAX_STOPS} stop sequences are allowed, got {len(stops)}")
    for i, s in enumerate(stops):
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise InvalidArgument(
                f"stop[{i}] must be 1 to {MAX_STOP_CHARS} characters long, got {len(s)} characters"
            )
    return GenerateParams(
        model=model,
        version=version,
        text=text,
        token_ids=ids,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stops,
    )


def check_token_ids(ids: Sequence[int], vocab_size: int, model: str) -> None:
    """Every prompt id must name a row of the model's embedding."""
    for i, tok in enumerate(ids):
        if not 0 <= tok < vocab_size:
            raise InvalidArgument(
                f"token_ids[{i}] = {tok} is outside the vocabulary of {model}: ids must be in [0, {vocab_size})"
            )


def plan_max_tokens(prompt_len: int, max_tokens: int | None, max_context: int, limits: Limits) -> int:
    """The number of new tokens to generate, given the tokenized prompt and the model's context."""
    if prompt_len == 0:
        raise InvalidArgument("the prompt is empty: it tokenized to no tokens")
    if prompt_len > limits.max_prompt_tokens:
        raise InvalidArgument(f"the prompt is {prompt_len} tokens; at most {limits.max_prompt_tokens} are allowed")
    room = max_context - prompt_len
    if max_tokens is None:
        if room < 1:
            raise InvalidArgument(
                f"the prompt is {prompt_len} tokens and leaves no room in the model's context of "
                f"{max_context} tokens; shorten it"
            )
        return min(limits.default_max_tokens, room)
    if max_tokens > room:
        allowed = f"lower max_tokens to at most {room}" if room >= 1 else "shorten the prompt"
        raise InvalidArgument(
            f"the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} "
            f"exceeds the model's context of {max_context} tokens; {allowed}"
        )
    return max_tokens


def parse_embed(*, model: str, version: str, texts: Sequence[str]) -> EmbedParams:
    check_model_ref(model, version)
    if not 1 <= len(texts) <= MAX_EMBED_TEXTS:
        raise InvalidArgument(f"texts must hold 1 to {MAX_EMBED_TEXTS} strings, got {len(texts)}")
    for i, t in enumerate(texts):
        if not t:
            raise InvalidArgument(f"texts[{i}] is empty: every text must be a non-empty string")
    return EmbedParams(model=model, version=version, texts=tuple(texts))
