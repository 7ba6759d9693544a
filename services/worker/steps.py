"""One Forward step through one loaded stage: input checks, the session's KV cache, sampling.

Everything here runs in the worker's single torch thread (see runtime.py), so steps of one stage
never overlap and a session's position check and its cache append happen atomically.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from modelgrid.errors import FailedPrecondition, InvalidArgument, ModelGridError, ResourceExhausted, Unavailable
from modelgrid.model.errors import CacheCapacityError
from modelgrid.model.sampling import Sampler, SamplingParams
from services.worker.sessions import SessionStore, StageKey
from services.worker.tensors import WireTensor, encode

log = logging.getLogger(__name__)

_HIDDEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def derive_seed(seed: int, step: int) -> int:
    """The generator seed of step `step` of a request seeded `seed`: the same on every worker.

    A hash rather than seed + step, so neighbouring requests' steps never share a generator.
    """
    digest = hashlib.sha256(f"modelgrid:{int(seed)}:{int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class DecoderStep:
    session_id: str
    tokens: list[int] | None  # first stage
    hidden: torch.Tensor | None  # later stages: (T, hidden)
    position: int
    reset: bool
    sampling: SamplingParams  # used by the last stage; its seed is the request's seed
    step: int
    max_session_tokens: int  # 0 = the model's context


@dataclass
class EncoderStep:
    tokens: list[int] | None  # first stage: (B, T) row-major
    tokens_shape: tuple[int, ...]
    hidden: torch.Tensor | None  # later stages: (B, T, hidden)
    attention_mask: torch.Tensor | None  # (B, T) of 1/0


@dataclass
class StepResult:
    """A step's output, already encoded for the wire (in the torch thread, not on the event loop)."""

    hidden: WireTensor | None = None  # not the last stage: (T, hidden) or (B, T, hidden)
    token: tuple[int, float] | None = None  # last decoder stage: (token id, logprob)
    embeddings: WireTensor | None = None  # last encoder stage: (B, hidden) float32
    cache_length: int = 0


@dataclass
class StepContext:
    """What a step needs from the worker besides the stage."""

    sessions: SessionStore
    free_memory: Callable[[], int]
    draining: Callable[[], bool]
    worker_id: str


@dataclass
class _Prepared:
    index: int  # position of the request in its batch
    req: DecoderStep
    x: torch.Tensor  # the stage's input for this session
    cache: Any  # the session's KVCache on this stage


def run_decoder_batch(stage, key: StageKey, reqs: list[DecoderStep], ctx: StepContext) -> list[StepResult | Exception]:
    """Steps of several sessions through one stage in as few forward passes as possible.

    stage: a modelgrid.model.DecoderStage. Each request is checked on its own (a bad one fails
    alone, as a domain error in its slot of the result); the good ones run together through
    forward_batch: the dense work of all their tokens at once, attention per session. Two steps of
    the same session run in consecutive passes, in arrival order.
    """
    results: list[StepResult | Exception | None] = [None] * len(reqs)
    waiting = list(range(len(reqs)))
    while waiting:
        batch: list[_Prepared] = []
        later: list[int] = []
        sessions: set[str] = set()
        for i in waiting:
            if reqs[i].session_id in sessions:
                later.append(i)
                continue
            sessions.add(reqs[i].session_id)
            try:
                batch.append(_prepare(stage, key, i, reqs[i], ctx))
            except ModelGridError as err:
                results[i] = err
        waiting = later
        if not batch:
            continue
        try:
            outs = stage.forward_batch([(p.x, p.cache) for p in batch], last_only=True)
        except CacheCapacityError as err:
            for p in batch:
                results[p.index] = InvalidArgument(str(err))
            continue
        except torch.OutOfMemoryError:
            for p in batch:
                ctx.sessions.drop(p.req.session_id, key)
                results[p.index] = ResourceExhausted(
                    f"worker {ctx.worker_id} ran out of device memory on {key}; session {p.req.session_id} dropped"
                )
            continue
        for p, out in zip(batch, outs):
            results[p.index] = _finish(stage, p, out)
    return results  # type: ignore[return-value]


def run_decoder_step(stage, key: StageKey, req: DecoderStep, ctx: StepContext) -> StepResult:
    """One session's step (a batch of one); raises its domain error."""
    result = run_decoder_batch(stage, key, [req], ctx)[0]
    if isinstance(result, Exception):
        raise result
    return result


def _prepare(stage, key: StageKey, index: int, req: DecoderStep, ctx: StepContext) -> _Prepared:
    """Check one request and find (or create) its session's cache; nothing is computed yet."""
    spec = stage.spec
    context = spec.max_position_embeddings
    if req.max_session_tokens < 0 or req.max_session_tokens > context:
        raise InvalidArgument(
            f"max_session_tokens {req.max_session_tokens} is beyond the model's context of {context} tokens"
        )
    x = _decoder_input(stage, req)
    n = x.shape[0]
    known = ctx.sessions.known(req.session_id)  # a running session may still replay while draining
    if req.reset:
        ctx.sessions.drop(req.session_id, key)
    session = ctx.sessions.get(req.session_id, key)
    per_token = spec.kv_bytes_per_token(stage.dtype, num_layers=key.end - key.start)
    if session is None:
        if req.position != 0:
            raise FailedPrecondition(
                f"session {req.session_id} has 0 tokens cached on {key} of worker {ctx.worker_id}, "
                f"but the step is at position {req.position}; replay from position 0 with reset"
            )
        if ctx.draining() and not known:
            raise Unavailable(f"worker draining: {ctx.worker_id} accepts no new sessions")
        if req.max_session_tokens and req.max_session_tokens * per_token > ctx.free_memory():
            raise ResourceExhausted(
                f"worker {ctx.worker_id} cannot hold a {req.max_session_tokens}-token session on {key}: its KV "
                f"cache needs {req.max_session_tokens * per_token} bytes, {ctx.free_memory()} are free"
            )
        session = ctx.sessions.put(req.session_id, key, stage.new_cache(req.max_session_tokens or context))
    cache = session.cache
    if req.position != cache.length:
        raise FailedPrecondition(
            f"session {req.session_id} has {cache.length} tokens cached on {key}, but the step is at position "
            f"{req.position}; send position {cache.length}, or replay from 0 with reset"
        )
    if cache.length + n > cache.max_tokens:
        raise InvalidArgument(
            f"session {req.session_id} would hold {cache.length + n} tokens on {key}, beyond its limit of "
            f"{cache.max_tokens} (max_session_tokens or the model's context of {context})"
        )
    grow = (cache.length + n - cache.capacity) * per_token
    if grow > 0 and grow > ctx.free_memory():
        raise ResourceExhausted(
            f"worker {ctx.worker_id} has no memory left for session {req.session_id}'s KV cache on {key} "
            f"({grow} more bytes needed, {ctx.free_memory()} free)"
        )
    return _Prepared(index, req, x, cache)


def _finish(stage, p: _Prepared, out: torch.Tensor) -> StepResult:
    if not stage.is_last:
        return StepResult(hidden=encode(out), cache_length=p.cache.length)
    params = p.req.sampling
    seed = derive_seed(params.seed or 0, p.req.step)
    sampler = Sampler(SamplingParams(params.temperature, params.top_k, params.top_p, seed=seed))
    return StepResult(token=sampler.sample(out[-1]), cache_length=p.cache.length)


def run_encoder_step(stage, key: StageKey, req: EncoderStep, ctx: StepContext) -> StepResult:
    """stage: a modelgrid.model.EncoderStage. Stateless: no session, no cache."""
    if ctx.draining():
        raise Unavailable(f"worker draining: {ctx.worker_id} accepts no new requests")
    spec = stage.spec
    if stage.is_first:
        if req.tokens is None:
            raise InvalidArgument(f"{key} is a first stage: send tokens with tokens_shape [B, T], not hidden")
        if len(req.tokens_shape) != 2:
            raise InvalidArgument(f"tokens_shape must be [B, T], got {list(req.tokens_shape)}")
        b, t = req.tokens_shape
        if b <= 0 or t <= 0 or b * t != len(req.tokens):
            raise InvalidArgument(f"tokens_shape {[b, t]} does not match {len(req.tokens)} token ids")
        x = _token_tensor(req.tokens, spec.vocab_size).reshape(b, t)
    else:
        if req.hidden is None:
            raise InvalidArgument(f"{key} is not a first stage: send hidden (B, T, {spec.hidden_size}), not tokens")
        x = _hidden(req.hidden, 3, spec.hidden_size, stage.dtype)
        b, t = x.shape[:2]
    if t > spec.max_position_embeddings:
        raise InvalidArgument(f"sequences of {t} tokens exceed the model's {spec.max_position_embeddings}")
    mask = req.attention_mask
    if mask is None:
        mask = torch.ones(b, t, dtype=torch.int64)
    elif tuple(mask.shape) != (b, t):
        raise InvalidArgument(f"attention_mask has shape {list(mask.shape)}, expected {[b, t]}")
    out = stage.forward(x, mask.to(torch.int64))
    if stage.is_last:
        return StepResult(embeddings=encode(out.float()))
    return StepResult(hidden=encode(out))


def _decoder_input(stage, req: DecoderStep) -> torch.Tensor:
    spec = stage.spec
    if stage.is_first:
        if req.tokens is None:
            raise InvalidArgument(f"layer {stage.start} is the first stage: send tokens, not hidden")
        if not req.tokens:
            raise InvalidArgument("tokens is empty: a step needs at least one token")
        return _token_tensor(req.tokens, spec.vocab_size)
    if req.hidden is None:
        raise InvalidArgument(
            f"stage [{stage.start},{stage.end}) is not a first stage: send hidden (T, {spec.hidden_size}), not tokens"
        )
    x = _hidden(req.hidden, 2, spec.hidden_size, stage.dtype)
    if x.shape[0] == 0:
        raise InvalidArgument("hidden has 0 tokens: a step needs at least one")
    return x


def _token_tensor(ids: list[int], vocab: int) -> torch.Tensor:
    x = torch.tensor(ids, dtype=torch.int64)
    bad = (x < 0) | (x >= vocab)
    if bool(bad.any()):
        first = int(x[bad][0])
        raise InvalidArgument(f"token id {first} is out of range: ids must be in [0, {vocab})")
    return x


def _hidden(h: torch.Tensor, ndim: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    if h.dtype not in _HIDDEN_DTYPES:
        raise InvalidArgument(f"hidden has dtype {h.dtype}; expected float32, float16 or bfloat16")
    if h.dim() != ndim or h.shape[-1] != hidden_size:
        want = "(T, hidden)" if ndim == 2 else "(B, T, hidden)"
        raise InvalidArgument(f"hidden has shape {list(h.shape)}, expected {want} with hidden = {hidden_size}")
    return h.to(dtype)
