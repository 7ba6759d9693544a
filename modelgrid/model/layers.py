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


def column_major_linears(module: nn.Module) -> int:
    """Store the weight of every nn.Linear in `module` column-major (the same (out, in) tensor, its transpose
    contiguous); returns how many were re-laid. Float32 on CPU only, where it pays: torch's float32 kernel
    for x @ W.T streams a column-major W about twice as fast when W does not fit in cache (batch-1 decode:
    an LM head of 32000 x 512 takes 3.5 ms instead of 7.7 ms on one core), and is no slower for larger
    batches; for float16 it is several times slower, for bfloat16 even. A weight that another module shares
    (an LM head tied to the embeddings in the same stage) stays as it is: the lookup wants rows.

    The outputs change only in rounding (another summation order). Each weight is copied once, so loading
    briefly needs one more copy of the largest weight.
    """
    owners: dict[int, int] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    changed = 0
    for m in module.modules():
        w = getattr(m, "weight", None) if isinstance(m, nn.Linear) else None
        if w is None or w.device.type != "cpu" or w.dtype != torch.float32 or w.dim() != 2 or owners[id(w)] > 1:
            continue
        if w.t().is_contiguous():
            continue
        m.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=False)
        changed += 1
    return changed


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (like nn.LayerNorm, without its init)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
