"""ModelSpec: the architecture facts a stage needs, parsed from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelgrid.model.errors import ModelFormatError
from modelgrid.model.safetensors_io import read_header

DECODERS = ("llama", "mistral", "qwen2")
ENCODERS = ("bert",)
SUPPORTED = DECODERS + ENCODERS
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ENCODER_ACTS = ("gelu", "gelu_new", "relu")


@dataclass(frozen=True)
class ModelSpec:
    """What a stage needs to know about a model; built by from_hf_config / load_spec."""

    architecture: str  # "llama" | "mistral" | "qwen2" | "bert" (the config's model_type)
    kind: str  # "decoder" (causal LM, has a KV cache) | "encoder" (BERT, produces embeddings)
    num_layers: int  # transformer blocks; a stage is a range [start, end) of them
    hidden_size: int  # width of the residual stream
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads; < num_heads means grouped-query attention
    head_dim: int  # width of one head (usually hidden_size // num_heads)
    intermediate_size: int  # width of the MLP's inner layer
    vocab_size: int  # rows of the token embedding (and of the LM head)
    max_position_embeddings: int  # longest context the model was configured for
    rope_theta: float = 10000.0  # RoPE base (decoders)
    rope_scaling: dict[str, Any] | None = None  # RoPE scaling parameters; rope_type default|linear|llama3
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon (decoders)
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon (encoders)
    tie_word_embeddings: bool = False  # LM head reuses the token embedding matrix
    qkv_bias: bool = False  # q/k/v projections have biases (Qwen2; Llama with attention_bias)
    o_bias: bool = False  # output projection has a bias (Llama with attention_bias)
    mlp_bias: bool = False  # MLP projections have biases (Llama with mlp_bias)
    hidden_act: str = "silu"  # MLP activation: silu (decoders, SwiGLU) or gelu (BERT)
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding-window size, None = full attention
    type_vocab_size: int = 0  # token-type (segment) embeddings rows (BERT)
    pad_token_id: int | None = None  # padding token, if the config names one
    bos_token_id: int | None = None  # beginning-of-sequence token
    eos_token_id: int | list[int] | None = None  # one id or several (any of them ends generation)
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, as config.json says
    tensor_prefix: str = ""  # before the backbone's tensor names: "model." (decoders), "" or "bert."

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelSpec:
        """Build a spec from a parsed Hugging Face config.json, refusing what we cannot run."""
        arch = config.get("model_type")
        if arch not in SUPPORTED:
            names = config.get("architectures") or ["?"]
            raise ModelFormatError(
                f"unsupported architecture {names[0]!r} (model_type {arch!r}); supported model_type: "
                f"{', '.join(SUPPORTED)} (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, BertModel)"
            )
        try:
            if arch in DECODERS:
                return _decoder_spec(arch, config)
            return _encoder_spec(arch, config)
        except KeyError as exc:
            raise ModelFormatError(f"config.json for {arch} lacks the field {exc.args[0]!r}") from None

    def kv_bytes_per_layer_token(self, dtype: torch.dtype) -> int:
        """KV-cache bytes one token costs in one layer (0 for encoders, which keep no cache)."""
        if self.kind != "decoder":
            return 0
        return 2 * self.num_kv_heads * self.head_dim * dtype.itemsize

    def kv_bytes_per_token(self, dtype: torch.dtype, num_layers: int | None = None) -> int:
        """KV-cache bytes one token costs across num_layers layers (default: all of them)."""
        layers = self.num_layers if num_layers is None else num_layers
        return layers * self.kv_bytes_per_layer_token(dtype)

    def dtype_default(self, device: torch.device | str = "cpu") -> torch.dtype:
        """float32 on CPU (bf16 matmuls are slow there), bfloat16 on accelerators."""
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16

    def with_tensor_names(self, names: set[str] | list[str]) -> ModelSpec:
        """The same spec with tensor_prefix read off actual checkpoint tensor names (if they tell)."""
        if self.kind == "decoder":
            candidates, markers = ("model.", ""), ("layers.", "embed_tokens.", "norm.")
        else:
            candidates, markers = ("bert.", ""), ("encoder.layer.", "embeddings.")
        for prefix in candidates:
            if any(n.startswith(prefix + m) for n in names for m in markers):
                return dataclasses.replace(self, tensor_prefix=prefix)
        return self


def load_spec(directory: str | Path) -> ModelSpec:
    """Read directory/config.json; the tensor-name prefix is checked against the safetensors there."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelFormatError(f"model directory {directory} does not exist")
    path = directory / "config.json"
    if not path.is_file():
        raise ModelFormatError(
            f"{directory} has no config.json: a model directory needs the Hugging Face config.json "
            "next to its *.safetensors files"
        )
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from None
    spec = ModelSpec.from_hf_config(config)
    names: set[str] = set()
    for file in sorted(directory.glob("*.safetensors")):
        names.update(read_header(file))
    return spec.with_tensor_names(names) if names else spec


def _decoder_spec(arch: str, c: dict[str, Any]) -> ModelSpec:
    if c.get("hidden_act", "silu") != "silu":
        raise ModelFormatError(f"{arch} with hidden_act {c['hidden_act']!r} is not supported (only silu)")
    num_layers = c["num_hidden_layers"]
    num_heads = c["num_attention_heads"]
    num_kv_heads = c.get("num_key_value_heads") or num_heads
    if num_heads % num_kv_heads:
        raise ModelFormatError(
            f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
        )
    rope_theta, rope_scaling = _rope(c)
    attention_bias = bool(c.get("attention_bias", False))
    names = c.get("architectures") or []
    return ModelSpec(
        architecture=arch,
        kind="decoder",
        num_layers=num_layers,
        hidden_size=c["hidden_size"],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // num_heads,
        intermediate_size=c["intermediate_size"],
        vocab_size=c["vocab_size"],
        max_position_embeddings=c["max_position_embeddings"],
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or attention_bias,
        o_bias=arch == "llama" and attention_bias,
        mlp_bias=arch == "llama" and bool(c.get("mlp_bias", False)),
        hidden_act="silu",
        layer_windows=_layer_windows(arch, c, num_layers),
        pad_token_id=c.get("pad_token_id"),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id"),
        torch_dtype=c.get("torch_dtype") or c.get("dtype"),
        tensor_prefix="" if names and not names[0].endswith("ForCausalLM") else "model.",
    )


def _encoder_spec(arch: str, c: dict[str, Any]) -> ModelSpec:
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ModelFormatError(
            f"bert with position_embedding_type {c['position_embedding_type']!r} is not supported (only absolute)"
        )
    act = c.get("hidden_act", "gelu")
    if act not in SUPPORTED_ENCODER_ACTS:
        raise ModelFormatError(
            f"bert with hidden_act {act!r} is not supported; supported: {', '.join(SUPPORTED_ENCODER_ACTS)}"
        )
    num_heads = c["num_attention_heads"]
    names = c.get("architectures") or ["BertModel"]
    return ModelSpec(
        architecture=arch,
        kind="encoder",
        num_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=c["hidden_size"] // num_heads,
        intermediate_size=c["intermediate_size"],
        vocab_size=c["vocab_size"],
        max_position_embeddings=c["max_position_embeddings"],
        layer_norm_eps=c.get("layer_norm_eps", 1e-12),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        hidden_act=act,
        layer_windows=(None,) * c["num_hidden_layers"],
        type_vocab_size=c.get("type_vocab_size", 2),
        pad_token_id=c.get("pad_token_id"),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id"),
        torch_dtype=c.get("torch_dtype") or c.get("dtype"),
        tensor_prefix="" if names[0] == "BertModel" else "bert.",
    )


def _rope(c: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and scaling from either the transformers>=5 `rope_parameters` or the older
    `rope_theta` + `rope_scaling` fields."""
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", c.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelFormatError(
            f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}


def _layer_windows(arch: str, c: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Sliding-window size per layer, following transformers: Mistral slides every layer when
    sliding_window is set; Qwen2 only with use_sliding_window, on layers >= max_window_layers (or as
    layer_types says)."""
    window = c.get("sliding_window")
    if arch == "mistral":
        return (window,) * num_layers
    if arch == "qwen2" and c.get("use_sliding_window") and window is not None:
        first_sliding = c.get("max_window_layers", 28)
        types = c.get("layer_types") or [
            "sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)
        ]
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (None,) * num_layers
