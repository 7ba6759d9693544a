"""Requests through a route of pipeline stages: a generation session, and a batch of embeddings.

The gateway drives every hop (as Petals does): it sends the tokens to the first stage, carries each
stage's hidden states on to the next, and gets the sampled token back from the last one (each step as a
message on the gateway's open stream to the worker: step_stream.py, through coalesce.py). Because the
gateway holds the session's tokens, it can rebuild a session anywhere: when a hop fails (UNAVAILABLE,
a broken call), has a stale epoch (ABORTED) or lost the stage or the session (FAILED_PRECONDITION), it
drops the route, gets one without the failed worker (failover.py: a ready replica at once when there is
one) and replays the session's tokens from position 0 with reset = true. The last stage derives step
i's generator from (seed, i), so the replayed step samples the same token. Retries are bounded in number
and by the request's deadline. The route is held for the whole session: no scheduler call per token.
The session is closed on every worker it touched, whatever ends it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

import numpy as np

from modelgrid.errors import Aborted, FailedPrecondition, InvalidArgument, Unavailable
from services.gateway.domain import Chunk, Embeddings, Route, Sampling, VersionInfo
from services.gateway.failover import FAILOVER_SECONDS, Failover, HopFailed, RetryPolicy, Router, remaining
from services.gateway.stops import StopMatcher
from services.gateway.tokenizers import ModelTokenizer

__all__ = ["Plan", "RetryPolicy", "Router", "Session", "embed", "generate", "micro_batches", "remaining"]

log = logging.getLogger(__name__)

# hop errors that a new route (and a replay) can cure
RETRYABLE = (Unavailable, Aborted, FailedPrecondition)
# activations carried per Forward in an Embed micro-batch, well under the gRPC message limit
EMBED_BATCH_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Plan:
    """A checked generation request, ready to run."""

    version: VersionInfo
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    deadline: float  # time.monotonic() by which the whole request must end

    @property
    def max_session_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_tokens


class Session:
    """One generation session: the tokens its stages have cached, and the workers it touched."""

    def __init__(self, router: Router, plan: Plan, session_id: str | None = None) -> None:
        self.session_id = session_id or uuid.uuid4().hex
        self._router = router
        self._plan = plan
        self._failover = Failover(router, plan.version, plan.deadline)
        self._tokens: list[int] = []  # ids every stage of the current route has cached
        self._replay = False  # the next step rebuilds the caches from position 0
        self.touched: set[str] = set()  # worker addresses that may hold state of the session

    @property
    def failures(self) -> int:
        return self._failover.failures

    async def step(self, new_ids: Sequence[int], step: int) -> tuple[int, float]:
        """Run new_ids through every stage; return the sampled (token id, logprob) of step `step`."""
        failed_at = None
        while True:
            route = await self._failover.route()
            replay = self._replay
            ids = [*self._tokens, *new_ids] if replay else list(new_ids)
            position = 0 if replay else len(self._tokens)
            try:
                token = await self._through(route, ids, position, replay, step)
            except HopFailed as failure:
                failed_at = failed_at or time.monotonic()
                self._replay = True  # stages before the failed one may have cached part of the step
                await self._failover.hop_failed(failure)
                continue
            if failed_at is not None:
                FAILOVER_SECONDS.observe(time.monotonic() - failed_at)
                log.info("session %s: replayed %d tokens on %s after %.3f s", self.session_id, len(ids),
                         ",".join(h.worker_id for h in route.hops), time.monotonic() - failed_at)
            self._tokens.extend(new_ids)
            self._replay = False
            return token

    async def _through(
        self, route: Route, ids: list[int], position: int, reset: bool, step: int
    ) -> tuple[int, float]:
        hidden = None
        last = len(route.hops) - 1
        for i, hop in enumerate(route.hops):
            self.touched.add(hop.address)
            timeout = remaining(self._plan.deadline, f"at step {step} on worker {hop.worker_id}")
            try:
                out = await self._router.workers.forward_decoder(
                    route, hop, self.session_id,
                    tokens=ids if i == 0 else None, hidden=hidden, position=position, reset=reset,
                    sampling=self._plan.sampling, step=step, max_session_tokens=self._plan.max_session_tokens,
                    timeout=timeout,
                )
            except RETRYABLE as err:
                raise HopFailed(hop, err, reset) from None
            if i == last and out.token is not None:
                return out.token
            if i == last or out.hidden is None:
                raise _stale(route, i)
            hidden = out.hidden
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Free the session on every worker it touched (best effort, concurrently)."""
        addresses, self.touched = sorted(self.touched), set()
        await asyncio.gather(*(self._router.workers.close_session(a, self.session_id) for a in addresses))


def _stale(route: Route, i: int) -> HopFailed:
    """Hop i answered with an output its place in the route does not expect (hidden states from the last
    stage, or none from another): the stage was re-placed under a route we still hold."""
    hop = route.hops[i]
    return HopFailed(hop, Aborted(
        f"stage [{hop.start_layer},{hop.end_layer}) answered with the wrong output for hop {i} of "
        f"{len(route.hops)}; the route is stale"
    ))


async def close_shielded(session: Session) -> None:
    """Close even while the request is being cancelled: the close runs to the end in its own task."""
    task = asyncio.ensure_future(session.close())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        log.info("session %s: cancelled again while closing; the close continues in the background", session.session_id)
        raise


async def generate(
    router: Router, plan: Plan, tokenizer: ModelTokenizer, session: Session | None = None
) -> AsyncIterator[Chunk]:
    """Stream one chunk per generated token; the last chunk has finish_reason and usage.

    Ends on an EOS id, a stop sequence, or max_tokens; CloseSession reaches every hop whatever ends it
    (the client cancelling, the deadline, an error). Step i + 1 starts before chunk i is handed to the
    client, so writing to the client is not on the pipeline's critical path (and the steps of sessions
    woken by the same reply reach the next hop together, to be coalesced).
    """
    session = session or Session(router, plan)
    detok = tokenizer.detokenizer(plan.prompt_ids)
    stops = StopMatcher(plan.stop)
    eos = plan.version.eos_ids
    ahead: asyncio.Future | None = None  # the next step, running while the consumer takes the chunk
    try:
        token_id, logprob = await session.step(plan.prompt_ids, 0)
        for index in range(plan.max_tokens):
            if ahead is not None:
                running, ahead = ahead, None
                token_id, logprob = await running  # cancelling this request cancels the step too
            finish = None
            if token_id in eos:
                text, stopped = stops.feed(detok.flush())  # the EOS token itself adds no text
                text += stops.flush()
                finish = "stop"
            else:
                text, stopped = stops.feed(detok.add(token_id))
                if stopped:
                    finish = "stop"
                elif index == plan.max_tokens - 1:
                    tail, stopped = stops.feed(detok.flush())
                    text += tail + stops.flush()
                    finish = "stop" if stopped else "length"
            if finish is None:
                ahead = asyncio.ensure_future(session.step((token_id,), index + 1))
                yield Chunk(text, token_id, logprob, index)
                continue
            yield Chunk(text, token_id, logprob, index, finish, len(plan.prompt_ids), index + 1)
            return
    finally:
        try:
            if ahead is not None:  # the consumer went away while a step ran ahead: end it before the close
                ahead.cancel()
                await asyncio.wait({ahead})
                if not ahead.cancelled() and ahead.exception() is not None:
                    log.debug("session %s: the step ahead failed after the stream ended: %s", session.session_id,
                              ahead.exception())
        finally:
            await close_shielded(session)


# ---- embeddings ------------------------------------------------------------------------------

def micro_batches(lengths: Sequence[int], hidden_size: int, budget_bytes: int = EMBED_BATCH_BYTES) -> list[range]:
    """Consecutive groups of texts whose padded (B, T, hidden) float32 activations fit the budget."""
    per_token = 4 * max(hidden_size, 1)
    groups: list[range] = []
    start, longest = 0, 0
    for i, n in enumerate(lengths):
        grown = max(longest, n)
        if i > start and (i - start + 1) * grown * per_token > budget_bytes:
            groups.append(range(start, i))
            start, grown = i, n
        longest = grown
    if lengths:
        groups.append(range(start, len(lengths)))
    return groups


async def embed(
    router: Router, version: VersionInfo, tokenizer: ModelTokenizer, texts: Sequence[str], deadline: float
) -> Embeddings:
    """Tokenize (truncated to the model's context), pad to the longest of each micro-batch, run the route."""
    encodings = tokenizer.encode_batch(texts)
    for i, ids in enumerate(encodings):
        if not ids:
            raise InvalidArgument(f"texts[{i}] tokenized to no tokens; send text the model's tokenizer can encode")
    vectors = []
    for group in micro_batches([len(e) for e in encodings], version.hidden_size):
        rows = [encodings[i] for i in group]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), tokenizer.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        vectors.append(await _encode_batch(router, version, ids, mask, deadline))
    return Embeddings(vectors=np.concatenate(vectors), prompt_tokens=sum(len(e) for e in encodings))


async def _encode_batch(
    router: Router, version: VersionInfo, ids: np.ndarray, mask: np.ndarray, deadline: float
) -> np.ndarray:
    """One (B, T) batch through the encoder's stages; encoders keep no state, so a retry just re-runs it."""
    failover = Failover(router, version, deadline)
    while True:
        route = await failover.route()
        try:
            return await _encoder_hops(router, route, ids, mask, deadline)
        except HopFailed as failure:
            await failover.hop_failed(failure)


async def _encoder_hops(
    router: Router, route: Route, ids: np.ndarray, mask: np.ndarray, deadline: float
) -> np.ndarray:
    hidden = None
    last = len(route.hops) - 1
    for i, hop in enumerate(route.hops):
        timeout = remaining(deadline, f"embedding on worker {hop.worker_id}")
        try:
            out = await router.workers.forward_encoder(
                route, hop, tokens=ids if i == 0 else None, hidden=hidden, attention_mask=mask, timeout=timeout
            )
        except RETRYABLE as err:
            raise HopFailed(hop, err) from None
        if i == last and out.embeddings is not None:
            if out.embeddings.shape[0] != ids.shape[0]:
                raise Unavailable(
                    f"worker {hop.worker_id} returned {out.embeddings.shape[0]} embeddings for {ids.shape[0]} texts"
                )
            return out.embeddings
        if i == last or out.hidden is None:
            raise _stale(route, i)
        hidden = out.hidden
    raise AssertionError("unreachable")
