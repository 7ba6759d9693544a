"""Forward steps through one loaded stage: input checks, the session's KV cache, sampling.

Everything here runs in the worker's single torch thread (see runtime.py), so passes of one stage
never overlap and a session's position check and its cache append happen atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from modelgrid.errors import FailedPrecondition, InvalidArgument, ModelGridError, ResourceExhausted, Unavailable
from modelgrid.model.errors import CacheCapacityError
from modelgrid.model.sampling import Sampler, SamplingParams
from services.worker.admission import no_room
from services.worker.batching import BatchLimits, BatchStats, Pending, heads, plan_pass
from services.worker.sessions import Session, SessionStore, StageKey
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
    num_stages: int = 0  # stages in the gateway's route; 0 = unknown


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
    kv_limit: Callable[[], int]  # the KV budget in bytes right now
    draining: Callable[[], bool]
    worker_id: str


def session_tokens(req: DecoderStep, spec: Any) -> int:
    """Tokens the session's cache must hold: max_session_tokens, or the model's context when 0."""
    context = spec.max_position_embeddings
    if req.max_session_tokens < 0 or req.max_session_tokens > context:
        raise InvalidArgument(
            f"max_session_tokens {req.max_session_tokens} is beyond the model's context of {context} tokens"
        )
    return req.max_session_tokens or context


def session_kv_bytes(stage, key: StageKey, tokens: int) -> int:
    """Bytes of a session's cache of `tokens` tokens on the stage (exactly what KVCache allocates)."""
    return stage.spec.kv_bytes_per_token(stage.dtype, num_layers=key.end - key.start) * tokens


def run_pass(
    stage, key: StageKey, queue: Sequence[Pending], ctx: StepContext, limits: BatchLimits, stats: BatchStats
) -> list[tuple[Pending, StepResult | Exception | None]]:
    """One forward pass of the stage over its queued steps; returns the steps that ended, with their result.

    stage: a modelgrid.model.DecoderStage. A step is checked the first time it is picked (a bad one
    fails alone, with a domain error as its result); the chunks plan_pass picks run together through
    forward_batch: the dense work of all their tokens at once, attention per session. A step ends
    when its last token has run (or it failed, or its caller went away: result None).
    """
    ended: list[tuple[Pending, StepResult | Exception | None]] = []
    ready = []
    for item in heads(queue):
        if item.abandoned:
            ended.append((item, None))
            continue
        if not item.prepared:
            try:
                prepare(stage, key, item, ctx)
            except ModelGridError as err:
                ended.append((item, err))
                continue
        ready.append(item)
    plan = plan_pass(ready, limits)
    if not plan:
        return ended
    try:
        outs = stage.forward_batch([(item.x[item.done : item.done + n], item.cache) for item, n in plan])
    except CacheCapacityError as err:  # prepare checked the limit; kept as a guard
        return ended + [(item, InvalidArgument(str(err))) for item, _ in plan]
    except torch.OutOfMemoryError:
        for item, _ in plan:
            ctx.sessions.drop(item.session_id, key)
        return ended + [(item, ResourceExhausted(
            f"worker {ctx.worker_id} ran out of device memory on {key}; session {item.session_id} dropped"
        )) for item, _ in plan]
    stats.record([n for _, n in plan], chunked=sum(1 for item, n in plan if n < item.remaining))
    for (item, n), out in zip(plan, outs):
        item.done += n
        if not stage.is_last:
            item.outputs.append(out)
        if item.remaining == 0:
            ended.append((item, _finish(stage, item, out)))
    return ended


def prepare(stage, key: StageKey, item: Pending, ctx: StepContext) -> None:
    """Check a step and find (or open) its session's cache; nothing is computed yet."""
    req = item.req
    session = ctx.sessions.get(req.session_id, key)
    try:
        tokens = session_tokens(req, stage.spec)
        x = _decoder_input(stage, req)
        if req.reset or session is None or session.cache is None:
            session = _open(stage, key, req, session, tokens, ctx)
        cache = session.cache
        if req.position != cache.length:
            raise FailedPrecondition(
                f"session {req.session_id} has {cache.length} tokens cached on {key}, but the step is at position "
                f"{req.position}; send position {cache.length}, or replay from 0 with reset"
            )
        if cache.length + x.shape[0] > cache.max_tokens:
            raise InvalidArgument(
                f"session {req.session_id} would hold {cache.length + x.shape[0]} tokens on {key}, beyond its "
                f"limit of {cache.max_tokens} (max_session_tokens or the model's context of "
                f"{stage.spec.max_position_embeddings})"
            )
    except ModelGridError:
        current = ctx.sessions.peek(req.session_id, key)
        if current is not None and current.cache is None:  # admitted for this step only: free its bytes
            ctx.sessions.drop(req.session_id, key)
        raise
    item.x, item.cache = x, cache


def _open(stage, key: StageKey, req: DecoderStep, session: Session | None, tokens: int, ctx: StepContext) -> Session:
    """A fresh cache for a session starting (or replaying from 0) on the stage, inside its KV reservation.

    The cache is allocated whole, so it never grows past the bytes admitted for it. A session the
    runtime did not admit (closed while its step waited) is admitted here if it fits at once.
    """
    if req.position != 0:
        raise FailedPrecondition(
            f"session {req.session_id} has 0 tokens cached on {key} of worker {ctx.worker_id}, "
            f"but the step is at position {req.position}; replay from position 0 with reset"
        )
    need = session_kv_bytes(stage, key, tokens)
    if session is None or session.reserved < need:
        if ctx.draining() and not ctx.sessions.known(req.session_id):
            raise Unavailable(f"worker draining: {ctx.worker_id} accepts no new sessions")
        limit = ctx.kv_limit()
        if not ctx.sessions.try_reserve(req.session_id, key, need, limit):
            raise ResourceExhausted(no_room(ctx.worker_id, req.session_id, key, need, tokens, limit,
                                            ctx.sessions.kv_bytes()))
        session = ctx.sessions.get(req.session_id, key)
    cache = session.cache
    if cache is not None and cache.max_tokens == tokens:
        cache.truncate(0)  # a replay reuses the session's memory
        return session
    session.cache = None  # free the old cache before allocating the new one
    try:
        cache = stage.new_cache(tokens)
        cache.reserve(tokens)
    except torch.OutOfMemoryError:
        ctx.sessions.drop(req.session_id, key)
        raise ResourceExhausted(
            f"worker {ctx.worker_id} ran out of device memory opening session {req.session_id} on {key}"
        ) from None
    return ctx.sessions.put(req.session_id, key, cache, reserved=session.reserved)


def _finish(stage, item: Pending, out: torch.Tensor) -> StepResult:
    if not stage.is_last:
        hidden = item.outputs[0] if len(item.outputs) == 1 else torch.cat(item.outputs)
        return StepResult(hidden=encode(hidden), cache_length=item.cache.length)
    params = item.req.sampling
    seed = derive_seed(params.seed or 0, item.req.step)
    sampler = Sampler(dataclasses.replace(params, seed=seed))
    return StepResult(token=sampler.sample(out[-1]), cache_length=item.cache.length)


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
