"""Leaf modules shared by the decoder and the encoder.

They allocate their parameters uninitialised: every weight comes from the checkpoint, and stages
are built on the meta device, where nn.Embedding's and nn.LayerNorm's init would import
torch._dynamo and sympy (~70 MB and ~1 s in each process that builds a stage).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Embedding(nn.Module):
    """Lookup table (like nn.Embedding, without its random init)."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in float32 like the reference, scale in the model dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def column_major_pays(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether projection weights on this device and dtype are better stored column-major: the same (out, in)
    matrix, its transpose contiguous in memory. Yes for float32 on CPU: torch's kernel for x @ W.T streams a
    column-major W about twice as fast when W does not fit in cache, which is what batch-1 decoding reads (an
    LM head of 32000 x 512: 7.7 -> 3.5 ms on one core), and about as fast at 8 rows or more (within noise,
    sometimes a little slower). No for float16 (several times slower that way), bfloat16 (no faster) and CUDA.
    The outputs change only in rounding (another summation order)."""
    return device.type == "cpu" and dtype == torch.float32


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (like nn.LayerNorm, without its init)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
