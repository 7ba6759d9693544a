"""The worker's KV-cache budget (admission) and continuous batching (pass planning, chunked prefill),
on their own: no network, a tiny real decoder stage where the model matters."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
import torch

from modelgrid.errors import FailedPrecondition, ResourceExhausted
from modelgrid.model import load_stage, write_random_checkpoint
from modelgrid.model.sampling import SamplingParams
from modelgrid.v1 import worker_pb2
from services.common.settings import parse_settings
from services.worker.admission import KVAdmission
from services.worker.batching import BatchLimits, BatchStats, Pending, fair_share, heads, pipeline_depth, plan_pass
from services.worker.config import WorkerConfig
from services.worker.convert import decoder_step_from_proto
from services.worker.sessions import SessionStore, StageKey
from services.worker.steps import DecoderStep, StepContext, run_pass

A = StageKey("llama", "v1", 0, 2)
B = StageKey("llama", "v1", 2, 4)


class Cache:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


# ---- the ledger: reservations in the session store --------------------------------------------


def test_reservations_count_until_dropped_and_a_cache_never_counts_twice() -> None:
    store = SessionStore()
    released = []
    store.on_release = lambda: released.append(1)
    assert store.try_reserve("s1", A, 600, limit=1000)
    assert not store.try_reserve("s2", A, 500, limit=1000)  # 600 + 500 > 1000: nothing changes
    assert store.peek("s2", A) is None and store.kv_bytes() == 600
    assert store.try_reserve("s1", A, 900, limit=1000)  # a session's own bytes do not block its replay
    store.put("s1", A, Cache(900), reserved=900)  # the cache allocated inside the reservation
    assert store.kv_bytes() == 900 and store.active_sessions() == 1
    assert store.drop("s1") == 1 and released == [1] and store.kv_bytes() == 0
    assert store.drop("s1") == 0 and released == [1]  # nothing dropped, nobody woken


# ---- admission --------------------------------------------------------------------------------


def admission(limit: int = 1000, timeout_s: float = 5.0) -> tuple[SessionStore, KVAdmission]:
    store = SessionStore()
    adm = KVAdmission(store, lambda: limit, timeout_s, lambda: "w9")
    store.on_release = adm.wake
    return store, adm


async def queued(adm: KVAdmission, n: int) -> None:
    """Let the event loop run until n sessions wait for memory."""
    while adm.queued < n:
        await asyncio.sleep(0)


async def test_sessions_that_fit_are_admitted_at_once() -> None:
    store, adm = admission()
    await adm.admit("s1", A, 400, 4)
    await adm.admit("s2", A, 600, 6)
    assert store.kv_bytes() == 1000 and adm.stats.admitted == 2 and adm.queued == 0


async def test_a_full_budget_queues_newcomers_in_order_until_memory_is_freed() -> None:
    store, adm = admission()
    await adm.admit("s1", A, 1000, 10)
    order: list[str] = []

    async def join(sid: str, nbytes: int) -> None:
        await adm.admit(sid, A, nbytes, 1)
        order.append(sid)

    waiting = [asyncio.create_task(join("s2", 700)), asyncio.create_task(join("s3", 200))]
    await queued(adm, 2)
    assert order == [] and adm.stats.waited == 2
    store.drop("s1")  # CloseSession: both fit now, and come in in arrival order
    await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert order == ["s2", "s3"] and store.kv_bytes() == 900 and adm.queued == 0


async def test_no_overtaking_a_big_request_is_not_starved_by_small_ones() -> None:
    store, adm = admission()
    await adm.admit("s1", A, 600, 6)
    big = asyncio.create_task(adm.admit("big", A, 800, 8))
    await queued(adm, 1)
    small = asyncio.create_task(adm.admit("small", A, 100, 1))  # would fit, but queues behind "big"
    await asyncio.sleep(0.01)
    assert not small.done()
    store.drop("s1")
    await asyncio.wait_for(big, 5)
    await asyncio.wait_for(small, 5)
    assert store.kv_bytes() == 900


async def test_a_session_already_here_queues_ahead_of_new_ones() -> None:
    store, adm = admission()
    await adm.admit("old", A, 500, 5)  # holds stage A; will want stage B of this worker too
    await adm.admit("s1", A, 500, 5)
    new = asyncio.create_task(adm.admit("new", A, 500, 5))
    await queued(adm, 1)
    old_next = asyncio.create_task(adm.admit("old", B, 500, 5))
    await queued(adm, 2)
    store.drop("s1")
    await asyncio.wait_for(old_next, 5)
    assert not new.done() and store.peek("old", B) is not None
    new.cancel()


async def test_waiting_too_long_is_refused_with_the_numbers() -> None:
    store, adm = admission(timeout_s=0.05)
    await adm.admit("s1", A, 700, 7)
    with pytest.raises(ResourceExhausted) as info:
        await adm.admit("s2", A, 512, 16)
    message = info.value.message
    for part in ("worker w9", "session s2", "512 bytes (16 tokens)", "300 bytes are free", "1000-byte KV budget",
                 "waited 0.1 s"):
        assert part in message, message
    assert adm.stats.refused == 1 and adm.queued == 0 and store.peek("s2", A) is None


async def test_more_than_the_whole_budget_is_refused_without_waiting() -> None:
    store, adm = admission(timeout_s=60)
    with pytest.raises(ResourceExhausted) as info:
        await asyncio.wait_for(adm.admit("huge", A, 1001, 1001), 1)
    assert "more than the whole KV budget of 1000 bytes" in info.value.message
    assert adm.stats.waited == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_holds_nothing() -> None:
    store, adm = admission()
    await adm.admit("s1", A, 1000, 10)
    waiter = asyncio.create_task(adm.admit("gone", A, 500, 5))
    await queued(adm, 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    store.drop("s1")
    await asyncio.sleep(0)
    assert adm.queued == 0 and store.kv_bytes() == 0


def test_budget_settings_are_read_and_bad_ones_refused(capsys: pytest.CaptureFixture) -> None:
    c = parse_settings(WorkerConfig, ["--kv-budget-bytes", "4096", "--batch-wait-ms", "0"], {
        "MODELGRID_WORKER_KV_ADMISSION_TIMEOUT_S": "0.5", "MODELGRID_WORKER_MAX_BATCH_TOKENS": "64",
        "MODELGRID_WORKER_TORCH_THREADS": "1"})
    assert (c.kv_budget_bytes, c.kv_admission_timeout_s, c.max_batch_tokens, c.batch_wait_ms, c.torch_threads) == (
        4096, 0.5, 64, 0.0, 1)
    d = parse_settings(WorkerConfig, [], {})
    assert (d.kv_budget_bytes, d.kv_admission_timeout_s, d.max_batch_tokens, d.batch_wait_ms, d.torch_threads) == (
        0, 5.0, 512, 10.0, 0)
    for argv, message in [
        (["--kv-budget-bytes", "-1"], "--kv-budget-bytes must be >= 0"),
        (["--kv-budget-bytes", "200", "--memory-bytes", "100"], "exceeds --memory-bytes 100"),
        (["--kv-admission-timeout-s", "-1"], "--kv-admission-timeout-s"),
        (["--max-batch-tokens", "0"], "--max-batch-tokens must be >= 1"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms must be in [0, 1000]"),
        (["--torch-threads", "-2"], "--torch-threads must be >= 0"),
    ]:
        with pytest.raises(SystemExit):
            parse_settings(WorkerConfig, argv, {})
        assert message in capsys.readouterr().err


# ---- pass planning ----------------------------------------------------------------------------


def step(session: str, n: int, done: int = 0) -> Pending:
    item = Pending(DecoderStep(session, list(range(n)), None, 0, False, SamplingParams(0.0), 0, 0), None)
    item.x, item.done = torch.zeros(n, dtype=torch.int64), done
    return item


def test_decodes_go_first_and_prompts_are_cut_to_the_token_budget() -> None:
    long_prompt, d1, short_prompt, d2 = step("p1", 40), step("d1", 1), step("p2", 5), step("d2", 1)
    plan = plan_pass([long_prompt, d1, short_prompt, d2], BatchLimits(max_tokens=16))
    assert [(p.session_id, n) for p, n in plan] == [("d1", 1), ("d2", 1), ("p1", 14)]
    long_prompt.done = 14
    plan = plan_pass([long_prompt, short_prompt], BatchLimits(max_tokens=30))
    assert [(p.session_id, n) for p, n in plan] == [("p1", 26), ("p2", 4)]


def test_a_pass_aims_at_its_share_of_the_sessions_going_round_the_pipeline() -> None:
    assert [pipeline_depth(8, a, b) for a, b in ((0, 4), (4, 8), (0, 8), (0, 5), (5, 8))] == [2, 2, 1, 2, 3]
    assert [fair_share(n, 2) for n in (0, 1, 2, 3, 16)] == [0, 1, 1, 2, 8]
    assert fair_share(16, 1) == 16  # one stage: everyone in the same pass


def test_a_step_carries_the_routes_stage_count() -> None:
    request = worker_pb2.ForwardRequest(session_id="s", num_stages=2)
    request.tokens.ids.extend([1, 2])
    assert decoder_step_from_proto(request).num_stages == 2
    request.num_stages = 0  # an older gateway: the worker guesses from its share of the layers
    assert decoder_step_from_proto(request).num_stages == 0


def test_one_step_per_session_and_at_most_max_sessions() -> None:
    first, second, other = step("s", 3), step("s", 1), step("t", 1)
    assert heads([first, second, other]) == [first, other]
    many = [step(f"s{i}", 1) for i in range(10)]
    assert len(plan_pass(many, BatchLimits(max_tokens=512, max_sessions=4))) == 4


# ---- passes through a real stage ----------------------------------------------------------------


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory, torch_one_thread) -> tuple:
    directory = write_random_checkpoint(tmp_path_factory.mktemp("llama"), num_layers=4, hidden_size=64,
                                        num_heads=4, num_kv_heads=2, vocab_size=300, seed=7)
    return load_stage(directory, 0, 2), load_stage(directory, 2, 4)


def context(store: SessionStore, limit: int = 1 << 30) -> StepContext:
    return StepContext(store, lambda: limit, lambda: False, "w9")


def run_until_done(stage, key: StageKey, queue: list[Pending], ctx: StepContext, limits: BatchLimits,
                   stats: BatchStats) -> dict[str, object]:
    results = {}
    while queue:
        for item, result in run_pass(stage, key, queue, ctx, limits, stats):
            queue.remove(item)
            results[item.session_id] = result
    return results


def decoder_step(session: str, tokens: list[int] | None = None, hidden: torch.Tensor | None = None,
                 max_session_tokens: int = 64) -> Pending:
    req = DecoderStep(session, tokens, hidden, 0, False, SamplingParams(0.0), 0, max_session_tokens)
    return Pending(req, concurrent.futures.Future())


def test_chunked_prefill_computes_what_one_pass_does(stages: tuple) -> None:
    first, last = stages
    prompt = [(7 * i) % 290 + 3 for i in range(40)]
    store, stats = SessionStore(), BatchStats()
    ctx = context(store)
    queue = [decoder_step("chunked", prompt), decoder_step("d", [5])]
    out = run_until_done(first, A, queue, ctx, BatchLimits(max_tokens=16), stats)
    assert stats.passes == 3 and stats.prefill_chunks == 2 and stats.batched_passes == 1  # "d" rode along
    whole = run_until_done(first, A, [decoder_step("whole", prompt)], ctx, BatchLimits(max_tokens=512), BatchStats())
    chunked_h = torch.frombuffer(bytearray(out["chunked"].hidden.data), dtype=torch.float32).view(40, 64)
    whole_h = torch.frombuffer(bytearray(whole["whole"].hidden.data), dtype=torch.float32).view(40, 64)
    torch.testing.assert_close(chunked_h, whole_h, atol=1e-5, rtol=1e-4)
    assert out["chunked"].cache_length == 40
    # the last stage: a chunked prompt samples the token of the whole one
    tokens = run_until_done(last, B, [decoder_step("c", hidden=chunked_h)], ctx, BatchLimits(max_tokens=7),
                            BatchStats())
    reference = last.forward(whole_h, last.new_cache(64), last_only=True)[-1]
    assert tokens["c"].token[0] == int(reference.argmax())


def test_caches_are_allocated_whole_within_the_budget_and_refused_past_it(stages: tuple) -> None:
    first, _ = stages
    per_token = first.spec.kv_bytes_per_token(torch.float32, num_layers=2)
    store = SessionStore()
    ctx = context(store, limit=100 * per_token)
    out = run_until_done(first, A, [decoder_step("a", [1, 2, 3], max_session_tokens=60)], ctx, BatchLimits(),
                         BatchStats())
    assert out["a"].cache_length == 3 and store.kv_bytes() == 60 * per_token
    assert store.peek("a", A).cache.nbytes == 60 * per_token  # never grows past its reservation
    out = run_until_done(first, A, [decoder_step("b", [1], max_session_tokens=41)], ctx, BatchLimits(),
                         BatchStats())
    assert isinstance(out["b"], ResourceExhausted)
    assert f"needs {41 * per_token} bytes (41 tokens), {40 * per_token} bytes are free of the " \
           f"{100 * per_token}-byte KV budget" in out["b"].message
    assert store.peek("b", A) is None
    bad = decoder_step("c", [1])
    bad.req.position = 4  # a new session must start at 0: refused, and nothing is held for it
    out = run_until_done(first, A, [bad], ctx, BatchLimits(), BatchStats())
    assert isinstance(out["c"], FailedPrecondition) and store.peek("c", A) is None
