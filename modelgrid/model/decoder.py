"""Llama-family decoder (Llama, Mistral, Qwen2): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Submodule names mirror Hugging Face's, so `layers.3.self_attn.q_proj.weight` of a stage starting
at layer 10 is `model.layers.13.self_attn.q_proj.weight` in the checkpoint.

Activations inside a stage are (N, hidden): the tokens of every session in a step, concatenated.
The dense work (norms, projections, MLP) runs on all N rows at once; attention runs per session
against that session's KVCache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelgrid.model.kv_cache import KVCache
from modelgrid.model.layers import Embedding, RMSNorm
from modelgrid.model.spec import ModelSpec
from modelgrid.model.stage_base import StageModule


def rope_inv_freq(spec: ModelSpec, device: torch.device | str) -> Tensor:
    """Inverse frequencies (head_dim // 2,), float32, with linear or Llama-3 scaling if configured."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are divided by factor, short ones kept, the band between interpolated
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.to(device)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and signed sin tables (N, 1, head_dim) for positions (N,), broadcastable over heads.

    The first half of sin is negated so that apply_rope rolls x instead of building HF's
    rotate_half(x) = cat(-x2, x1): x2 * -sin == -x2 * sin exactly, in fewer ops.
    """
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (N, head_dim // 2)
    cos = torch.cat((freqs, freqs), dim=-1).cos()
    sin = freqs.sin()
    sin = torch.cat((-sin, sin), dim=-1)
    return cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (N, heads, head_dim) by the tables of rope_cos_sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


@dataclass
class Span:
    """One session's rows in a step: rows [offset, offset + n) of the activations, written to
    cache slots [past, past + n)."""

    cache: KVCache
    offset: int
    n: int
    past: int  # tokens the cache held before this step


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, window: int | None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        # sliding-window size (Mistral), None for full causal attention; the cache still keeps every
        # token, so that replay and truncate stay simple, and only the last `window` are attended
        self.window = window
        q_dim, kv_dim = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, q_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden_size, kv_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden_size, kv_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(q_dim, spec.hidden_size, bias=spec.o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, spans: list[Span], layer: int) -> Tensor:
        n = x.shape[0]
        q = apply_rope(self.q_proj(x).view(n, self.num_heads, self.head_dim), cos, sin)  # (N, H, D)
        k = apply_rope(self.k_proj(x).view(n, self.num_kv_heads, self.head_dim), cos, sin)  # (N, Hkv, D)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)  # (N, Hkv, D)
        outs = []
        for s in spans:
            rows = slice(s.offset, s.offset + s.n)
            end = s.past + s.n
            s.cache.k[layer, :, s.past : end] = k[rows].transpose(0, 1)
            s.cache.v[layer, :, s.past : end] = v[rows].transpose(0, 1)
            # the oldest key any of these queries may see; the window counts the query itself
            lo = 0 if self.window is None else max(0, s.past + 1 - self.window)
            keys = s.cache.k[None, layer, :, lo:end]  # (1, Hkv, S, D)
            values = s.cache.v[None, layer, :, lo:end]
            mask = _mask(s.past, s.n, lo, self.window, x.device)
            out = F.scaled_dot_product_attention(
                q[None, rows].transpose(1, 2),  # (1, H, n, D)
                keys,
                values,
                attn_mask=mask,
                is_causal=mask is None and s.n > 1,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
            outs.append(out[0].transpose(0, 1).reshape(s.n, -1))  # (n, H * D)
        return self.o_proj(_cat(outs))


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _mask(past: int, n: int, lo: int, window: int | None, device: torch.device) -> Tensor | None:
    """Boolean (n, S) mask, True = attend, for n queries at cache slots past..past+n-1 over keys at
    slots lo..past+n-1; None when plain attention (one query, all keys) or is_causal (a fresh
    square prefill) is already exact."""
    if n == 1 or (past == 0 and (window is None or window >= n)):
        return None
    q_slot = torch.arange(past, past + n, device=device)[:, None]
    k_slot = torch.arange(lo, past + n, device=device)[None, :]
    allowed = k_slot <= q_slot
    if window is not None:
        allowed &= k_slot > q_slot - window
    return allowed


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, spec.layer_windows[index])
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, spans: list[Span], layer: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, spans, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStage(StageModule):
    """Layers [start, end) of a decoder, with embed_tokens when first and norm + lm_head when last."""

    def __init__(self, spec: ModelSpec, start: int, end: int) -> None:
        super().__init__(spec, start, end)
        if self.is_first:
            self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(start, end))
        if self.is_last:
            self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        # RoPE inverse frequencies: not in the checkpoint, computed by init_buffers on the stage's device
        self.register_buffer("inv_freq", torch.empty(spec.head_dim // 2), persistent=False)

    def new_cache(self, max_tokens: int | None = None) -> KVCache:
        """An empty cache for one session (default limit: max_position_embeddings tokens)."""
        return KVCache(
            len(self.layers),
            self.spec.num_kv_heads,
            self.spec.head_dim,
            dtype=self.dtype,
            device=self.device,
            max_tokens=max_tokens or self.spec.max_position_embeddings,
        )

    def forward(
        self, x: Tensor, cache: KVCache, positions: Tensor | None = None, last_only: bool = False
    ) -> Tensor:
        """Run T tokens of one session through the stage, appending T entries to its cache.

        x: (T,) int64 ids on the first stage, else (T, hidden) activations. positions (T,) default
        to cache.length + arange(T). Returns (T, hidden) activations, or on the last stage float32
        logits (T, vocab), (1, vocab) with last_only.
        """
        return self._step([(x, cache, positions)], last_only)[0]

    def forward_batch(self, items: list[tuple[Tensor, KVCache]], last_only: bool = True) -> list[Tensor]:
        """forward for many sessions in one pass: dense work concatenated, attention per session."""
        if len({id(cache) for _, cache in items}) != len(items):
            raise ValueError("forward_batch got the same KVCache twice; one item per session per step")
        return self._step([(x, cache, None) for x, cache in items], last_only)

    def init_buffers(self, device: torch.device | str) -> None:
        self.inv_freq = rope_inv_freq(self.spec, device)

    @torch.inference_mode()
    def _step(self, items: list[tuple[Tensor, KVCache, Tensor | None]], last_only: bool) -> list[Tensor]:
        if not items:
            return []
        device = self.device
        spans, positions, offset = [], [], 0
        for x, cache, pos in items:
            self._check_input(x, pos)
            n = x.shape[0]
            spans.append(Span(cache, offset, n, cache.length))
            if pos is None:
                pos = torch.arange(cache.length, cache.length + n, device=device)
            positions.append(pos.to(device))
            offset += n
        h = _cat([x.to(device) for x, _, _ in items])
        # ids -> (N, hidden); activations from a stage on another device or dtype are converted
        h = self.embed_tokens(h) if self.is_first else h.to(self.dtype)
        cos, sin = rope_cos_sin(self.inv_freq, _cat(positions), h.dtype)
        for s in spans:
            s.cache.reserve(s.n)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, spans, i)
        for s in spans:
            s.cache.length = s.past + s.n
        if not self.is_last:
            return list(h.split([s.n for s in spans]))
        if last_only:
            h = h[[s.offset + s.n - 1 for s in spans]]  # (num_sessions, hidden)
            sizes = [1] * len(spans)
        else:
            sizes = [s.n for s in spans]
        logits = self.lm_head(self.norm(h)).float()  # (rows, vocab)
        return list(logits.split(sizes))

    def _check_input(self, x: Tensor, positions: Tensor | None) -> None:
        """Reject malformed input with a ValueError (an out-of-range id would otherwise be a
        device-side assert on CUDA, which poisons the whole process)."""
        if self.is_first:
            if x.dim() != 1 or x.dtype not in (torch.int64, torch.int32) or x.numel() == 0:
                raise ValueError(
                    f"the first stage takes (T,) int64 token ids, T >= 1; got {x.dtype} {tuple(x.shape)}"
                )
            low, high = int(x.min()), int(x.max())
            if low < 0 or high >= self.spec.vocab_size:
                raise ValueError(f"token id {low if low < 0 else high} is outside [0, {self.spec.vocab_size})")
        elif x.dim() != 2 or x.shape[1] != self.spec.hidden_size or not x.is_floating_point() or x.numel() == 0:
            raise ValueError(
                f"stage [{self.start}, {self.end}) takes (T, {self.spec.hidden_size}) activations, T >= 1; "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        if positions is not None and tuple(positions.shape) != (x.shape[0],):
            raise ValueError(f"positions must have shape ({x.shape[0]},), got {tuple(positions.shape)}")

    def _checkpoint_name(self, key: str) -> str:
        prefix = self.spec.tensor_prefix
        if key.startswith("layers."):
            index, rest = self._global_layer(key)
            return f"{prefix}layers.{index}.{rest}"
        if key == "lm_head.weight":
            return f"{prefix}embed_tokens.weight" if self.spec.tie_word_embeddings else key
        return prefix + key  # embed_tokens.weight, norm.weight
