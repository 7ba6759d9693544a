"""BERT-family encoder (as in all-MiniLM-L6-v2): post-norm layers, padding mask, mean pooling.

The last stage pools like sentence-transformers: the mean of the token states over non-padding
tokens, L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelgrid.model.layers import Embedding, LayerNorm
from modelgrid.model.spec import ModelSpec
from modelgrid.model.stage_base import StageModule

_ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU, as transformers' "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# our short names -> Hugging Face's, inside `encoder.layer.{i}.` and `embeddings.`
_LAYER_NAMES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "ffn_norm": "output.LayerNorm",
}
_EMBEDDING_NAMES = {"norm": "LayerNorm"}


class Embeddings(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.word_embeddings = Embedding(spec.vocab_size, spec.hidden_size)
        self.position_embeddings = Embedding(spec.max_position_embeddings, spec.hidden_size)
        self.token_type_embeddings = Embedding(spec.type_vocab_size, spec.hidden_size)
        self.norm = LayerNorm(spec.hidden_size, spec.layer_norm_eps)

    def forward(self, ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        _, t = ids.shape
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(ids)
        h = self.word_embeddings(ids) + self.token_type_embeddings(token_type_ids)  # (B, T, hidden)
        h = h + self.position_embeddings(torch.arange(t, device=ids.device))
        return self.norm(h)


class EncoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        hidden, eps = spec.hidden_size, spec.layer_norm_eps
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = LayerNorm(hidden, eps)
        self.ffn_in = nn.Linear(hidden, spec.intermediate_size)
        self.ffn_out = nn.Linear(spec.intermediate_size, hidden)
        self.ffn_norm = LayerNorm(hidden, eps)
        self.act = _ACTIVATIONS[spec.hidden_act]

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, t, _ = x.shape

        def heads(y: Tensor) -> Tensor:
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        att = att.transpose(1, 2).reshape(b, t, -1)  # (B, T, hidden)
        x = self.attn_norm(x + self.attn_out(att))
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))


class EncoderStage(StageModule):
    """Layers [start, end) of a BERT encoder, with embeddings when first and pooling when last."""

    def __init__(self, spec: ModelSpec, start: int, end: int) -> None:
        super().__init__(spec, start, end)
        if self.is_first:
            self.embeddings = Embeddings(spec)
        self.layers = nn.ModuleList(EncoderLayer(spec) for _ in range(start, end))

    @torch.inference_mode()
    def forward(self, x: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """x: (B, T) int64 ids on the first stage, else (B, T, hidden); attention_mask (B, T) of 1/0.

        Returns (B, T, hidden) activations, or on the last stage (B, hidden) float32 sentence
        embeddings: mean over tokens where attention_mask is 1, L2-normalised.
        """
        self._check_input(x, attention_mask)
        device = self.device
        x, mask = x.to(device), attention_mask.to(device)
        if self.is_first:
            x = self.embeddings(x, None if token_type_ids is None else token_type_ids.to(device))
        else:
            x = x.to(self.dtype)
        # additive bias (B, 1, 1, T): 0 where attended, the dtype's minimum on padding
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, bias)
        if not self.is_last:
            return x
        weights = mask.float()[:, :, None]  # (B, T, 1)
        pooled = (x.float() * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, hidden)
        return F.normalize(pooled, p=2, dim=1)

    def _check_input(self, x: Tensor, attention_mask: Tensor) -> None:
        if self.is_first:
            if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32) or x.numel() == 0:
                raise ValueError(f"the first stage takes (B, T) int64 token ids; got {x.dtype} {tuple(x.shape)}")
            low, high = int(x.min()), int(x.max())
            if low < 0 or high >= self.spec.vocab_size:
                raise ValueError(f"token id {low if low < 0 else high} is outside [0, {self.spec.vocab_size})")
            if x.shape[1] > self.spec.max_position_embeddings:
                raise ValueError(
                    f"{x.shape[1]} tokens exceed this model's {self.spec.max_position_embeddings} positions"
                )
        elif x.dim() != 3 or x.shape[2] != self.spec.hidden_size or not x.is_floating_point():
            raise ValueError(
                f"stage [{self.start}, {self.end}) takes (B, T, {self.spec.hidden_size}) activations; "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        if tuple(attention_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"attention_mask must have shape {tuple(x.shape[:2])}, got {tuple(attention_mask.shape)}"
            )

    def _checkpoint_name(self, key: str) -> str:
        prefix = self.spec.tensor_prefix
        if key.startswith("layers."):
            index, rest = self._global_layer(key)
            module, param = rest.rsplit(".", 1)
            return f"{prefix}encoder.layer.{index}.{_LAYER_NAMES[module]}.{param}"
        _, module, param = key.split(".")  # embeddings.<module>.<param>
        return f"{prefix}embeddings.{_EMBEDDING_NAMES.get(module, module)}.{param}"
