"""Continuous batching: which queued steps of a stage run together in its next forward pass.

Steps of many sessions wait in one queue per stage. Each pass takes the oldest step of every session
(a session's later steps wait for its earlier ones), decode steps first, then prompts in arrival
order, within a token budget: a prompt longer than what is left of the budget is cut, and the rest
of it runs in the next passes (chunked prefill), so a long prompt never stalls other sessions'
decoding for more than one pass. Sessions join and leave between passes.

A pass may wait a moment (BatchLimits.wait_s) for its fair share of the stage's open sessions: with
N sessions going round a pipeline of S stages, passes of N / S sessions keep every stage busy on a
different group at once, while passes that start on whatever arrived first split the sessions into
many small groups, each paying a whole pass of weight reads for a few tokens.
"""

from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from services.worker.steps import DecoderStep


@dataclass(frozen=True)
class BatchLimits:
    max_tokens: int = 512  # tokens of all sessions in one pass; longer prompts are prefilled in chunks
    max_sessions: int = 64  # sessions in one pass
    wait_s: float = 0.0  # how long a pass may wait for its fair share of the open sessions' steps


@dataclass(eq=False)
class Pending:
    """One Forward step waiting for, or part-way through, its stage's passes."""

    req: "DecoderStep"
    future: asyncio.Future = field(repr=False)  # completed on the event loop with a StepResult or an error
    x: torch.Tensor | None = None  # the step's whole input, once checked (the first time it is picked)
    cache: Any = None  # the session's KVCache on the stage, once checked
    done: int = 0  # input tokens already run
    outputs: list[torch.Tensor] = field(default_factory=list)  # hidden states of the chunks run so far
    closed: bool = False  # its session was closed while it waited (set under the runtime's queue lock)

    @property
    def session_id(self) -> str:
        return self.req.session_id

    @property
    def prepared(self) -> bool:
        return self.x is not None

    @property
    def remaining(self) -> int:
        return 0 if self.x is None else self.x.shape[0] - self.done

    @property
    def abandoned(self) -> bool:
        """The caller went away (its RPC was cancelled) or its session was closed: no point running the rest."""
        return self.closed or self.future.cancelled()


def heads(queue: Sequence[Pending]) -> list[Pending]:
    """The oldest step of each session, in arrival order: the steps a pass may run."""
    seen: set[str] = set()
    out = []
    for item in queue:
        if item.session_id not in seen:
            seen.add(item.session_id)
            out.append(item)
    return out


def plan_pass(ready: Sequence[Pending], limits: BatchLimits) -> list[tuple[Pending, int]]:
    """(step, tokens to run) for the next pass over checked steps, at most one per session.

    Decode steps (one token left) first, in arrival order; then prompts in arrival order, each cut
    to what is left of the token budget. A step needs at least one token of room to be picked.
    """
    plan: list[tuple[Pending, int]] = []
    budget = limits.max_tokens
    decodes = [p for p in ready if p.remaining == 1]
    prompts = [p for p in ready if p.remaining > 1]
    for item in (*decodes, *prompts):
        if budget <= 0 or len(plan) == limits.max_sessions:
            break
        n = min(item.remaining, budget)
        plan.append((item, n))
        budget -= n
    return plan


def pipeline_depth(num_layers: int, start: int, end: int) -> int:
    """How many stages the model's pipeline has, guessed from this stage's share of the layers (when the
    steps do not say: a cut that balances work rather than layers makes this guess wrong)."""
    return max(1, math.ceil(num_layers / max(1, end - start)))


def fair_share(open_sessions: int, depth: int) -> int:
    """Sessions a pass should hold so that `depth` stages each work on a different group."""
    return math.ceil(open_sessions / max(1, depth))


@dataclass
class BatchStats:
    """Counters of the passes a worker ran (written by the torch thread only)."""

    passes: int = 0
    steps: int = 0  # session-steps in passes (a chunked prompt counts once per pass it is in)
    tokens: int = 0
    batched_passes: int = 0  # passes with more than one session
    batched_steps: int = 0  # session-steps run in such passes
    prefill_chunks: int = 0  # passes that ran part of a prompt and left the rest for later
    max_sessions: int = 0  # largest pass so far
    busy_s: float = 0.0  # time the torch thread spent running passes
    # sessions in each of the recent passes
    batch_sizes: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=1000))

    def record(self, sizes: Sequence[int], chunked: int) -> None:
        self.passes += 1
        self.steps += len(sizes)
        self.tokens += sum(sizes)
        if len(sizes) > 1:
            self.batched_passes += 1
            self.batched_steps += len(sizes)
        self.prefill_chunks += chunked
        self.max_sessions = max(self.max_sessions, len(sizes))
        self.batch_sizes.append(len(sizes))
