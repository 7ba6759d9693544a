"""Token sampling: temperature, top-k, top-p, with a per-session seeded generator on the CPU.

Sampling always runs on the CPU in float32, so a seed gives the same tokens whichever device or
split produced the logits.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy (argmax); otherwise logits are divided by it
    top_k: int = 0  # keep only the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # seeds the session's generator; None draws a random seed

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Draws one session's tokens; holds that session's generator, so keep one per session."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)

    def sample(self, logits: Tensor) -> tuple[int, float]:
        """(token id, its log-probability under log_softmax of the raw logits) for logits (vocab,)."""
        logits = logits.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        logprobs = torch.log_softmax(logits, dim=-1)
        p = self.params
        if p.greedy:
            token = int(torch.argmax(logits))
            return token, float(logprobs[token])
        scores = logits / p.temperature
        if 0 < p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if p.top_p < 1:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            # drop a token when the ones before it already reach top_p (the first always stays)
            drop = probs.cumsum(-1) - probs >= p.top_p
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, -math.inf))
        token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator))
        return token, float(logprobs[token])
