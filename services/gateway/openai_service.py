"""What each OpenAI-compatible call does, on the gateway's own domain objects.

Requests go through the same validation (validation.parse_generate / parse_embed), planning
(GatewayApp.plan_generation), pipeline (GatewayApp.generate / embed) and tokenizers as the gRPC API;
this module only translates. Each of the n choices of each prompt is its own session; with a seed,
choice i samples with seed + i. A streamed request is planned and its first token awaited before the
response starts, so a bad request or an unplaced model still gets its HTTP status; an error after that
arrives as a last `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence

import numpy as np

from modelgrid.errors import InvalidArgument, ModelGridError
from modelgrid.v1 import common_pb2
from services.gateway import openai_schema as schema
from services.gateway.app import GatewayApp
from services.gateway.domain import Chunk
from services.gateway.openai_chat import ChatTemplates, default_prompt
from services.gateway.openai_errors import error_body, from_domain
from services.gateway.pipeline import Plan
from services.gateway.tokenizers import ModelTokenizer
from services.gateway.upstream import DEFAULT_TIMEOUT_S
from services.gateway.validation import check_model_ref, parse_embed, parse_generate

log = logging.getLogger(__name__)

MAX_SESSIONS = 64  # prompts x n of one request
SEED_SPACE = 2**64
SSE_DONE = "data: [DONE]\n\n"


def split_model(model: str) -> tuple[str, str]:
    """'name' -> (name, "") (latest); 'name:version' or 'name:alias' -> (name, version)."""
    name, _, version = model.partition(":")
    return name, version


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class PromptIn:
    """One prompt: text (tokenized like a gRPC text prompt) or token ids. Exactly one is set."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Run:
    """One choice: a planned session."""

    index: int
    plan: Plan
    tokenizer: ModelTokenizer


@dataclass(frozen=True)
class Planned:
    runs: list[Run]
    prompt_tokens: int  # each prompt counted once, however many choices it has
    fingerprint: str  # "model:version" that serves the request


def completion_prompts(prompt: schema.Prompt) -> list[PromptIn]:
    if isinstance(prompt, str):
        return [PromptIn(text=prompt)]
    if not prompt:
        raise InvalidArgument("prompt is empty: send a string, an array of strings or an array of token ids")
    if all(isinstance(p, str) for p in prompt):
        return [PromptIn(text=p) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        return [PromptIn(token_ids=tuple(prompt))]
    return [PromptIn(token_ids=tuple(p)) for p in prompt]


def embedding_texts(value: schema.Prompt) -> list[str]:
    if isinstance(value, str):
        return [value]
    if value and not all(isinstance(v, str) for v in value):
        raise InvalidArgument("input must be a string or an array of strings; token-id input is not supported")
    return list(value)


def stop_sequences(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


async def _all_or_none(coros: Sequence[Awaitable[Any]]) -> list[Any]:
    """Run concurrently; on the first failure cancel the rest (their sessions close) and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _merge(streams: dict[int, AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
    """Interleave the chunks of several sessions as they come; closing this closes them all."""
    queue: asyncio.Queue[tuple[int, Chunk | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            async with aclosing(stream) as chunks:
                async for chunk in chunks:
                    await queue.put((index, chunk, None))
        except Exception as err:  # handed to the consumer, which raises it
            await queue.put((index, None, err))
            return
        await queue.put((index, None, None))

    tasks = [asyncio.create_task(pump(i, s), name=f"choice-{i}") for i, s in streams.items()]
    try:
        running = len(tasks)
        while running:
            index, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                running -= 1
                continue
            yield index, chunk
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIService:
    def __init__(self, app: GatewayApp) -> None:
        self._app = app
        self._templates = ChatTemplates(app.registry.fetch_file)

    # ---- models ---------------------------------------------------------------------------

    async def list_models(self) -> schema.ModelList:
        reply = await self._app.registry.list_models(common_pb2.ListModelsRequest(), DEFAULT_TIMEOUT_S)
        return schema.ModelList(data=[_card(m.name, m.versions) for m in reply.models])

    async def get_model(self, model_id: str) -> schema.ModelCard:
        name, version = split_model(model_id)
        check_model_ref(name, version)
        model = await self._app.registry.get_model(common_pb2.GetModelRequest(name=name), DEFAULT_TIMEOUT_S)
        if version:
            await self._app.versions.resolve(name, version, DEFAULT_TIMEOUT_S)  # NOT_FOUND for an unknown version
        return _card(model_id, model.versions)

    # ---- generation -----------------------------------------------------------------------

    async def completion(self, req: schema.CompletionRequest) -> schema.Completion | EventStream:
        planned = await self._plan(req, req.model, completion_prompts(req.prompt), req.max_tokens)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model,
                "system_fingerprint": planned.fingerprint}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(planned, _CompletionEvents(meta), include_usage)
        done = await _all_or_none([self._run_to_end(run) for run in planned.runs])
        choices = [schema.CompletionChoice(index=run.index, text=text, finish_reason=finish)
                   for run, (text, finish, _) in zip(planned.runs, done)]
        return schema.Completion(**meta, choices=choices, usage=_usage(planned, done))

    async def chat(self, req: schema.ChatCompletionRequest) -> schema.ChatCompletion | EventStream:
        prompt, model = await self._chat_prompt(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        planned = await self._plan(req, model, [prompt], max_tokens)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model,
                "system_fingerprint": planned.fingerprint}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(planned, _ChatEvents(meta), include_usage)
        done = await _all_or_none([self._run_to_end(run) for run in planned.runs])
        choices = [schema.ChatChoice(index=run.index, message=schema.AssistantMessage(content=text),
                                     finish_reason=finish)
                   for run, (text, finish, _) in zip(planned.runs, done)]
        return schema.ChatCompletion(**meta, choices=choices, usage=_usage(planned, done))

    async def _chat_prompt(self, req: schema.ChatCompletionRequest) -> tuple[PromptIn, str]:
        """The prompt of the messages, and the model reference pinned to the version that rendered it."""
        name, version = split_model(req.model)
        check_model_ref(name, version)
        info = await self._app.versions.resolve(name, version, DEFAULT_TIMEOUT_S)
        pinned = f"{name}:{info.version}"
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        template = await self._templates.get(info) if info.kind == "decoder" else None
        if template is None:
            return PromptIn(text=default_prompt(messages)), pinned
        tokenizer = await self._app.tokenizers.get(info)
        text = template.render(messages)
        ids = await asyncio.to_thread(lambda: tokenizer.tokenizer.encode(text, add_special_tokens=False).ids)
        if not ids:
            raise InvalidArgument("the chat template rendered the messages to an empty prompt")
        return PromptIn(token_ids=tuple(ids)), pinned

    async def _plan(
        self, req: schema.GenerationRequest, model: str, prompts: list[PromptIn], max_tokens: int | None
    ) -> Planned:
        if len(prompts) * req.n > MAX_SESSIONS:
            raise InvalidArgument(
                f"{len(prompts)} prompts x n={req.n} is {len(prompts) * req.n} choices; at most {MAX_SESSIONS} "
                "are allowed per request"
            )
        name, version = split_model(model)
        deadline = self._app.deadline(None)
        runs: list[Run] = []
        prompt_tokens = 0
        fingerprint = ""
        for p, prompt in enumerate(prompts):
            params = parse_generate(
                model=name, version=version, text=prompt.text, token_ids=prompt.token_ids, max_tokens=max_tokens,
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=None,
                stop=stop_sequences(req.stop), limits=self._app.limits,
            )
            plan, tokenizer = await self._app.plan_generation(params, deadline)
            prompt_tokens += len(plan.prompt_ids)
            fingerprint = f"{plan.version.model}:{plan.version.version}"
            for j in range(req.n):
                index = p * req.n + j
                seed = (req.seed + index) % SEED_SPACE if req.seed is not None else secrets.randbits(63)
                runs.append(Run(index, replace(plan, sampling=replace(plan.sampling, seed=seed)), tokenizer))
        return Planned(runs, prompt_tokens, fingerprint)

    async def _run_to_end(self, run: Run) -> tuple[str, str, int]:
        """(text, finish_reason, completion tokens) of one session."""
        pieces: list[str] = []
        last: Chunk | None = None
        async with aclosing(self._app.generate(run.plan, run.tokenizer)) as chunks:
            async for last in chunks:
                pieces.append(last.text)
        assert last is not None and last.finish_reason is not None  # max_tokens >= 1: at least one chunk
        return "".join(pieces), last.finish_reason, last.completion_tokens

    async def _stream(self, planned: Planned, events: "_Events", include_usage: bool) -> EventStream:
        merged = _merge({run.index: self._app.generate(run.plan, run.tokenizer) for run in planned.runs})
        try:
            first = await anext(merged)
        except BaseException:
            await merged.aclose()
            raise
        return EventStream(_sse(planned, events, include_usage, first, merged), merged)

    # ---- embeddings -----------------------------------------------------------------------

    async def embeddings(self, req: schema.EmbeddingRequest) -> schema.EmbeddingList:
        name, version = split_model(req.model)
        params = parse_embed(model=name, version=version, texts=embedding_texts(req.input))
        _, result = await self._app.embed(params, self._app.deadline(None))
        vectors = np.asarray(result.vectors, dtype="<f4")
        if req.dimensions is not None and req.dimensions != vectors.shape[1]:
            raise InvalidArgument(
                f"dimensions={req.dimensions} is not supported: {req.model} returns {vectors.shape[1]} dimensions"
            )
        encode: Callable[[np.ndarray], list[float] | str] = (
            (lambda v: base64.b64encode(v.tobytes()).decode("ascii"))
            if req.encoding_format == "base64" else (lambda v: v.tolist())
        )
        data = [schema.EmbeddingData(index=i, embedding=encode(v)) for i, v in enumerate(vectors)]
        usage = schema.Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
        return schema.EmbeddingList(data=data, model=req.model, usage=usage)


# ---- responses --------------------------------------------------------------------------------

class EventStream:
    """The body of a streamed response (server-sent event lines). `aclose()` ends its sessions whether or
    not the body was ever iterated: a client can go away before the first byte is sent."""

    def __init__(self, lines: AsyncGenerator[str, None], sessions: AsyncGenerator[Any, None]) -> None:
        self._lines = lines
        self._sessions = sessions

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines

    async def aclose(self) -> None:
        await self._lines.aclose()
        await self._sessions.aclose()


def _card(model_id: str, versions: Sequence[common_pb2.ModelVersion]) -> schema.ModelCard:
    created = max((v.created_unix_ms for v in versions), default=0) // 1000
    return schema.ModelCard(id=model_id, created=created)


def _usage(planned: Planned, done: Sequence[tuple[str, str, int]]) -> schema.Usage:
    completion = sum(tokens for _, _, tokens in done)
    return schema.Usage(prompt_tokens=planned.prompt_tokens, completion_tokens=completion,
                        total_tokens=planned.prompt_tokens + completion)


class _Events:
    """The chunks of one streamed request in one API's format."""

    object = ""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        return sse({**self.meta, "object": self.object, "choices": choices, "usage": usage})

    def start(self, index: int) -> list[str]:
        return []

    def piece(self, index: int, text: str, finish_reason: str | None) -> list[str]:
        raise NotImplementedError


class _CompletionEvents(_Events):
    object = "text_completion"

    def piece(self, index: int, text: str, finish_reason: str | None) -> list[str]:
        return [self.chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}])]


class _ChatEvents(_Events):
    object = "chat.completion.chunk"

    def start(self, index: int) -> list[str]:
        delta = {"role": "assistant", "content": ""}
        return [self.chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])]

    def piece(self, index: int, text: str, finish_reason: str | None) -> list[str]:
        out = []
        if text:
            out.append(self.chunk([{"index": index, "delta": {"content": text}, "logprobs": None,
                                    "finish_reason": None}]))
        if finish_reason:
            out.append(self.chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}]))
        return out


async def _sse(
    planned: Planned,
    events: _Events,
    include_usage: bool,
    first: tuple[int, Chunk],
    rest: AsyncIterator[tuple[int, Chunk]],
) -> AsyncIterator[str]:
    """Server-sent events of the merged sessions, ending with usage (if asked) and [DONE]."""
    for run in planned.runs:
        for line in events.start(run.index):
            yield line
    completion_tokens = 0
    try:
        async with aclosing(rest):
            index, chunk = first
            while True:
                if chunk.text or chunk.finish_reason:
                    for line in events.piece(index, chunk.text, chunk.finish_reason):
                        yield line
                completion_tokens += chunk.completion_tokens
                try:
                    index, chunk = await anext(rest)
                except StopAsyncIteration:
                    break
    except ModelGridError as err:
        log.info("stream of %s ended with %s: %s", planned.fingerprint, err.code, err.message)
        yield sse(from_domain(err)[1])
        return
    except Exception:
        log.exception("stream of %s failed", planned.fingerprint)
        yield sse(error_body("internal error while streaming; see the gateway log", "server_error"))
        return
    if include_usage:
        usage = {"prompt_tokens": planned.prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": planned.prompt_tokens + completion_tokens}
        yield events.chunk([], usage)
    yield SSE_DONE
