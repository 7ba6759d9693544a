"""ForwardBatch replies are split under a byte budget (the 64 MiB gRPC cap), every result sent once."""

from __future__ import annotations

import torch

from modelgrid.errors import FailedPrecondition
from services.worker.convert import BATCH_REPLY_BYTES, forward_batch_responses
from services.worker.steps import StepResult
from services.worker.tensors import encode


def hidden(tokens: int) -> StepResult:
    return StepResult(hidden=encode(torch.ones(tokens, 256)), cache_length=tokens)  # 1 KiB a token


def test_results_are_split_under_the_budget_in_order() -> None:
    results = [(i, hidden(10)) for i in range(7)] + [(7, FailedPrecondition("session s was closed"))]
    replies = forward_batch_responses(results, budget_bytes=25 * 1024)
    assert [[r.index for r in m.results] for m in replies] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(m.ByteSize() <= 25 * 1024 for m in replies)
    assert replies[-1].results[1].code == "FAILED_PRECONDITION"


def test_a_result_larger_than_the_budget_goes_alone_and_small_batches_stay_one_message() -> None:
    replies = forward_batch_responses([(0, hidden(1)), (1, hidden(40)), (2, hidden(1))], budget_bytes=20 * 1024)
    assert [[r.index for r in m.results] for m in replies] == [[0], [1], [2]]
    assert len(forward_batch_responses([(i, hidden(100)) for i in range(64)])) == 1
    assert BATCH_REPLY_BYTES == 16 * 1024 * 1024
