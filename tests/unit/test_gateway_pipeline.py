"""The generation session over an in-memory stand-in for the workers: finish reasons, usage, replay after a
failed hop, bounded retries, CloseSession on every hop whatever ends the stream.

The stand-in keeps the worker's contract (KV length per session and stage, position checks, reset) so
a wrong replay fails here; the real gRPC path is covered by tests/integration/test_gateway_*.py.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from modelgrid.errors import Aborted, FailedPrecondition, InvalidArgument, Unavailable
from services.gateway.domain import Hop, Route, Sampling, VersionInfo
from services.gateway.pipeline import Plan, RetryPolicy, Router, Session, embed, generate, micro_batches
from services.gateway.tokenizers import ModelTokenizer
from services.gateway.upstream import HopOutput, RouteCache

VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer() -> ModelTokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Hello world. The answer is STOP here; café 日本"] * 5, trainer)
    return ModelTokenizer(tok, bos_id=1, add_bos=False, pad_id=0)


class FakeScheduler:
    """Routes over `stages` spans, choosing per span the first worker not excluded or reported failed."""

    def __init__(self, replicas: dict[tuple[int, int], list[str]]) -> None:
        self.replicas = replicas
        self.epoch = 1
        self.reported: list[str] = []
        self.route_calls = 0

    async def get_route(self, model: str, version: str, exclude=(), timeout=None) -> Route:
        self.route_calls += 1
        hops = []
        for (start, end), workers in self.replicas.items():
            ok = [w for w in workers if w not in exclude]
            if not ok:
                raise Unavailable(f"no replica of [{start},{end}) outside {sorted(exclude)}")
            hops.append(Hop(start, end, ok[0], f"addr-{ok[0]}"))
        return Route(model, version, self.epoch, tuple(hops))

    async def report_failure(self, worker_id: str, reason: str, timeout: float = 5.0) -> None:
        """Like the real scheduler after a failed health probe: the worker is no longer offered."""
        self.reported.append(worker_id)
        for workers in self.replicas.values():
            if worker_id in workers:
                workers.remove(worker_id)


class FakeWorkers:
    """Per (address, session, stage) token counts with the worker's position rules; the last stage emits
    script[step] (a seeded sampler gives the same token for the same step on any worker)."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.cached: dict[tuple[str, str, int], int] = {}
        self.fail: dict[int, Exception] = {}  # call number -> error raised instead
        self.calls: list[tuple[str, int, int, bool]] = []  # (address, position, n tokens, reset)
        self.closed: list[str] = []
        self.delay_s = 0.0

    async def forward_decoder(self, route, hop, session_id, *, tokens, hidden, position, reset, sampling, step,
                              max_session_tokens, timeout) -> HopOutput:
        n = len(tokens) if tokens is not None else hidden
        self.calls.append((hop.address, position, n, reset))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        err = self.fail.pop(len(self.calls), None)
        if err is not None:
            raise err
        key = (hop.address, session_id, hop.start_layer)
        if reset:
            self.cached.pop(key, None)
        have = self.cached.get(key, 0)
        if position != have:
            raise FailedPrecondition(f"{have} tokens cached, step at position {position}")
        self.cached[key] = have + n
        if hop is route.hops[-1]:
            return HopOutput(token=(self.script[step], -0.5))
        return HopOutput(hidden=n)

    async def close_session(self, address: str, session_id: str, timeout: float = 5.0) -> None:
        self.closed.append(address)
        for key in [k for k in self.cached if k[0] == address and k[1] == session_id]:
            del self.cached[key]


def make(script: list[int], replicas=None, max_failovers: int = 3):
    scheduler = FakeScheduler(replicas or {(0, 2): ["a", "a2"], (2, 4): ["b", "b2"]})
    workers = FakeWorkers(script)
    router = Router(RouteCache(scheduler, ttl_s=60), scheduler, workers, RetryPolicy(max_failovers, 0.0, 0.0))
    return router, scheduler, workers


def plan(prompt=(5, 6, 7), max_tokens=8, eos=(2,), stop=(), deadline_s=30.0) -> Plan:
    version = VersionInfo("m", "v1", "llama", "decoder", VOCAB, 2048, {"eos_token_id": list(eos)})
    sampling = Sampling(0.0, 0, 1.0, 7)
    return Plan(version, tuple(prompt), max_tokens, sampling, tuple(stop), time.monotonic() + deadline_s)


async def collect(router, p, tokenizer, session=None):
    return [c async for c in generate(router, p, tokenizer, session)]


class CountingSession(Session):
    """Records every step asked for when it is asked (a step started and cancelled at once still counts)."""

    def __init__(self, router, p) -> None:
        super().__init__(router, p)
        self.steps: list[int] = []

    def step(self, new_ids, step: int):
        self.steps.append(step)
        return super().step(new_ids, step)


async def until(condition, timeout_s: float = 10.0) -> None:
    """Polls the event loop until condition() holds (no fixed sleeps: a loaded machine only makes it slower)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def test_length_finish_usage_and_close_on_every_hop(tokenizer) -> None:
    script = [40, 41, 42, 43, 44, 45, 46, 47]
    router, _, workers = make(script)
    chunks = await collect(router, plan(max_tokens=8), tokenizer)
    assert [c.token_id for c in chunks] == script
    assert [c.index for c in chunks] == list(range(8))
    assert [c.finish_reason for c in chunks] == [None] * 7 + ["length"]
    assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (3, 8)
    assert "".join(c.text for c in chunks) == tokenizer.decode(script)
    # prefill of 3 tokens at 0, then one token per step at the next position, on both hops
    assert [c for c in workers.calls if c[0] == "addr-a"] == [("addr-a", 0, 3, False)] + [
        ("addr-a", 3 + i, 1, False) for i in range(7)
    ]
    assert sorted(workers.closed) == ["addr-a", "addr-b"]
    assert workers.cached == {}


async def test_eos_ends_with_stop_and_counts_the_eos_token(tokenizer) -> None:
    router, _, workers = make([40, 41, 2, 43])
    p = plan(max_tokens=4)
    session = CountingSession(router, p)
    chunks = await collect(router, p, tokenizer, session)
    assert [c.token_id for c in chunks] == [40, 41, 2]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 3
    assert chunks[-1].text == ""
    assert session.steps == [0, 1, 2]  # no step runs ahead past the EOS
    assert len(workers.calls) == 3 * 2
    assert sorted(workers.closed) == ["addr-a", "addr-b"]


async def test_stop_sequence_cuts_the_text(tokenizer) -> None:
    script = tokenizer.encode("Hello world. The answer is STOP here")
    router, _, workers = make(script)
    p = plan(max_tokens=len(script), stop=("STOP",))
    session = CountingSession(router, p)
    chunks = await collect(router, p, tokenizer, session)
    assert "".join(c.text for c in chunks) == "Hello world. The answer is "
    assert chunks[-1].finish_reason == "stop"
    assert len(chunks) < len(script)
    assert session.steps == list(range(len(chunks)))  # no step runs ahead past the stop
    assert len(workers.calls) == 2 * len(chunks)


async def test_unavailable_hop_reroutes_replays_and_gives_the_same_tokens(tokenizer) -> None:
    script = [40, 41, 42, 43, 44, 45]
    router, scheduler, workers = make(script)
    workers.fail[2 * 3 + 2] = Unavailable("worker b is unavailable: connection refused")  # hop b at step 3
    chunks = await collect(router, plan(max_tokens=6), tokenizer)
    assert [c.token_id for c in chunks] == script
    assert scheduler.reported == ["b"]
    # the replay: every token so far (3 prompt + 3 generated) from position 0 with reset, on the new route
    assert ("addr-a", 0, 6, True) in workers.calls and ("addr-b2", 0, 6, True) in workers.calls
    assert set(workers.closed) == {"addr-a", "addr-b", "addr-b2"}
    assert not any(k[0] in ("addr-a", "addr-b2") for k in workers.cached)


async def test_stale_epoch_and_lost_session_replay_without_excluding(tokenizer) -> None:
    script = [40, 41, 42, 43]
    router, scheduler, workers = make(script)
    workers.fail[3] = Aborted("route epoch 1 is older than epoch 2")
    workers.fail[6] = FailedPrecondition("session has 0 tokens cached")
    chunks = await collect(router, plan(max_tokens=4), tokenizer)
    assert [c.token_id for c in chunks] == script
    assert scheduler.reported == []
    assert scheduler.route_calls == 3  # the cached route was dropped twice


async def test_a_stage_answering_the_wrong_output_drops_the_route(tokenizer) -> None:
    """The first stage answering a token (re-placed as a whole model under our route): stale, re-routed, replayed."""
    router, scheduler, workers = make([40, 41])
    forward = workers.forward_decoder

    async def first_call_answers_a_token(route, hop, session_id, **kw) -> HopOutput:
        out = await forward(route, hop, session_id, **kw)
        return HopOutput(token=(99, -0.1)) if len(workers.calls) == 1 else out

    workers.forward_decoder = first_call_answers_a_token
    chunks = await collect(router, plan(max_tokens=2), tokenizer)
    assert [c.token_id for c in chunks] == [40, 41]
    assert scheduler.route_calls == 2 and scheduler.reported == []
    assert ("addr-a", 0, 3, True) in workers.calls  # the prompt replayed from position 0


async def test_prefill_failure_is_replayed_with_reset(tokenizer) -> None:
    router, _, workers = make([40, 41])
    workers.fail[2] = Unavailable("connection reset")  # second hop of the prefill
    chunks = await collect(router, plan(max_tokens=2), tokenizer)
    assert [c.token_id for c in chunks] == [40, 41]
    assert ("addr-a", 0, 3, True) in workers.calls


async def test_retries_are_bounded(tokenizer) -> None:
    router, _, workers = make([40] * 4, replicas={(0, 4): ["a", "b", "c", "d", "e"]}, max_failovers=2)
    for call in range(1, 10):
        workers.fail[call] = Unavailable("connection refused")
    with pytest.raises(Unavailable, match="could not be served after 3 attempts.*connection refused"):
        await collect(router, plan(max_tokens=4), tokenizer)
    assert sorted(workers.closed) == ["addr-a", "addr-b", "addr-c"]


async def test_no_route_left_fails_with_unavailable(tokenizer) -> None:
    router, scheduler, workers = make([40] * 4, replicas={(0, 4): ["a"]})
    workers.fail[1] = Unavailable("connection refused")
    with pytest.raises(Unavailable, match="no replica of"):
        await collect(router, plan(max_tokens=4), tokenizer)
    assert scheduler.reported == ["a"]


async def test_other_errors_pass_through_and_still_close(tokenizer) -> None:
    router, _, workers = make([40] * 4)
    workers.fail[4] = InvalidArgument("bad input")
    with pytest.raises(InvalidArgument, match="bad input"):
        await collect(router, plan(max_tokens=4), tokenizer)
    assert sorted(workers.closed) == ["addr-a", "addr-b"]


async def test_cancel_closes_the_session_on_every_hop(tokenizer) -> None:
    router, _, workers = make([40] * 100)
    workers.delay_s = 0.01
    session = Session(router, plan(max_tokens=100))
    seen = []

    async def consume() -> None:
        async for chunk in generate(router, plan(max_tokens=100), tokenizer, session):
            seen.append(chunk)

    task = asyncio.create_task(consume())
    while len(seen) < 3:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(workers.closed) == ["addr-a", "addr-b"]
    assert workers.cached == {}
    assert len(seen) < 100


async def test_the_next_step_runs_while_the_consumer_holds_a_chunk_and_ends_with_the_stream(tokenizer) -> None:
    router, _, workers = make([40] * 10)
    p = plan(max_tokens=10)
    session = CountingSession(router, p)
    stream = generate(router, p, tokenizer, session)
    first = await stream.__anext__()
    assert first.index == 0
    # the consumer is busy elsewhere: step 1 goes through both hops meanwhile
    await until(lambda: len(workers.calls) == 4)
    assert [c[:2] for c in workers.calls] == [("addr-a", 0), ("addr-b", 0), ("addr-a", 3), ("addr-b", 3)]
    assert session.steps == [0, 1]  # one step ahead, not more
    second = await stream.__anext__()
    assert second.index == 1 and second.token_id == 40
    assert session.steps == [0, 1, 2]
    await stream.aclose()  # step 2 is running ahead: it is ended, then the session closed on every hop
    assert sorted(workers.closed) == ["addr-a", "addr-b"]
    assert workers.cached == {}


async def test_deadline_ends_the_request_and_closes(tokenizer) -> None:
    from modelgrid.errors import DeadlineExceeded

    router, _, workers = make([40] * 100)
    workers.delay_s = 0.01
    with pytest.raises(DeadlineExceeded, match="ran out of time"):
        await collect(router, plan(max_tokens=100, deadline_s=0.1), tokenizer)
    assert sorted(workers.closed) == ["addr-a", "addr-b"]


def test_micro_batches_respect_the_byte_budget() -> None:
    assert micro_batches([3, 5, 2], hidden_size=4, budget_bytes=10_000) == [range(0, 3)]
    # 16 bytes per token: two rows of 5 tokens = 160 bytes fit, a third row does not
    assert micro_batches([5, 5, 5, 1], hidden_size=4, budget_bytes=160) == [range(0, 2), range(2, 4)]
    assert micro_batches([100], hidden_size=4, budget_bytes=16) == [range(0, 1)]  # one row always goes
    assert micro_batches([], hidden_size=4) == []


class FakeEncoderWorkers:
    def __init__(self) -> None:
        self.batches: list[tuple[np.ndarray, np.ndarray]] = []

    async def forward_encoder(self, route, hop, *, tokens, hidden, attention_mask, timeout) -> HopOutput:
        if hop is route.hops[0]:
            self.batches.append((tokens, attention_mask))
            return HopOutput(hidden=tokens)
        vectors = np.stack([hidden.sum(axis=1), attention_mask.sum(axis=1)], axis=1).astype(np.float32)
        return HopOutput(embeddings=vectors)


async def test_embed_pads_each_micro_batch_and_keeps_order(tokenizer) -> None:
    scheduler = FakeScheduler({(0, 2): ["a"], (2, 4): ["b"]})
    workers = FakeEncoderWorkers()
    router = Router(RouteCache(scheduler, ttl_s=60), scheduler, workers, RetryPolicy(3, 0.0, 0.0))
    version = VersionInfo("mini", "v1", "bert", "encoder", VOCAB, 512, {"hidden_size": 1_000_000})
    texts = ["Hello", "Hello world. The answer", "café"]
    result = await embed(router, version, tokenizer, texts, time.monotonic() + 10)
    lengths = [len(tokenizer.encode(t)) for t in texts]
    assert result.prompt_tokens == sum(lengths)
    assert result.vectors[:, 1].tolist() == lengths  # the mask marks exactly the real tokens
    assert result.vectors[:, 0].tolist() == [sum(tokenizer.encode(t)) for t in texts]  # pads are id 0
    assert len(workers.batches) >= 2  # the large hidden size forced micro-batches
