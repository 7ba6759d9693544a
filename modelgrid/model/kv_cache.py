"""KVCache: one session's keys and values for the layers of one decoder stage."""

from __future__ import annotations

import torch

from modelgrid.model.errors import CacheCapacityError

BLOCK_TOKENS = 256  # capacity grows in multiples of this, at least doubling, so appends are amortised O(1)


class KVCache:
    """Pre-allocated keys/values, (num_layers, num_kv_heads, capacity, head_dim) each.

    Slots [0, length) hold the session's tokens in the order they were appended; a forward writes
    its T new tokens at [length, length + T) in every layer and then advances length. Capacity
    grows by reallocating (one copy for all layers), never by concatenating per token.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        max_tokens: int,
    ) -> None:
        self.max_tokens = max_tokens
        self.length = 0
        self.k = torch.empty(num_layers, num_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes currently allocated for keys and values (capacity, not just length)."""
        return 2 * self.k.numel() * self.k.element_size()

    def reserve(self, n: int) -> None:
        """Make room for n more tokens, or raise CacheCapacityError past max_tokens."""
        need = self.length + n
        if need > self.max_tokens:
            raise CacheCapacityError(
                f"session cache holds {self.length} tokens; {n} more would exceed its limit of {self.max_tokens}"
            )
        if need <= self.capacity:
            return
        blocks = -(-max(need, 2 * self.capacity) // BLOCK_TOKENS)
        new_capacity = min(blocks * BLOCK_TOKENS, self.max_tokens)
        layers, heads, _, dim = self.k.shape
        k = self.k.new_empty(layers, heads, new_capacity, dim)
        v = self.v.new_empty(layers, heads, new_capacity, dim)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def truncate(self, n: int) -> None:
        """Forget all but the first n tokens (e.g. to roll back a speculative step)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n
