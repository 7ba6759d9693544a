"""Random-initialised Hugging Face checkpoints (config, safetensors, tokenizer) for tests and demos.

Tensor names, shapes and config fields follow transformers' LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM and BertModel, so transformers loads what this writes: that is how the tests
check our model code against an independent implementation. transformers itself is not used here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from modelgrid.model.safetensors_io import INDEX_FILE

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "bert": "BertModel",
}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens

_CORPUS = """\
The river ran past the mill, and the miller's daughter counted the barges as they went by.
In the morning the market opened early; traders set out apples, bread, cheese and fresh fish.
A pipeline splits a large model into stages, and each stage runs a few layers on its own device.
Tokens flow from the first stage to the last, which turns the final hidden state into logits.
She asked whether the train to the coast would leave on time, and the clerk said it might not.
Numbers such as 3, 14, 159, 2653 and 58979 appear in tables, receipts and measurements.
The quick brown fox jumps over the lazy dog; the five boxing wizards jump quickly.
Rain fell on the roofs of the old town while the lamps were lit one after another.
Engineers measure latency, throughput and memory, then change one thing and measure again.
What is the capital of France? Paris is the capital, and Lyon is another large city.
The library kept maps of distant islands, letters from sailors, and a clock that never stopped.
If the cache is full, the worker evicts the oldest idle session and frees its memory.
Children played in the park until the sun went down behind the hills to the west.
A good error message says what went wrong and what the user can do about it.
Whoever reads the code later should be able to hold each module in their head at once.
"""


def build_tokenizer(vocab_size: int, bos: bool = True) -> Tokenizer:
    """Byte-level BPE trained on the embedded corpus, padded to exactly vocab_size ids.

    The corpus cannot yield many merges, so ids past what training reached are filler tokens
    (`<|filler_N|>`): never produced by encoding, but every id in [0, vocab_size) decodes.
    """
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer)
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    # printable ASCII is its own byte-level symbol, so fillers decode to themselves
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), vocab_size)})
    tokenizer = Tokenizer.from_str(json.dumps(data))
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
        )
    return tokenizer


def write_random_checkpoint(
    out_dir: str | Path,
    architecture: str = "llama",
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 1000,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool | None = None,
    qkv_bias: bool | None = None,
    seed: int = 0,
    shard_size_bytes: int | None = None,
    dtype: str = "float32",
    init_std: float = 0.02,
    random_norms_and_biases: bool = False,
) -> Path:
    """Write config.json, safetensors (sharded + index when shard_size_bytes is set), tokenizer.json
    and tokenizer_config.json to out_dir; return out_dir.

    Weights are initialised like transformers (normal(0, init_std), zero biases, unit norms).
    random_norms_and_biases draws biases and norm weights at random too, so that a loader that
    drops or misplaces one of them produces different outputs.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    sizes = {"num_layers": num_layers, "hidden_size": hidden_size, "num_heads": num_heads,
             "max_position_embeddings": max_position_embeddings}
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    kv_heads = num_kv_heads or num_heads
    if num_heads % kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {kv_heads}")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    if architecture == "bert":
        inter = intermediate_size or 4 * hidden_size
        config, shapes = _bert(num_layers, hidden_size, num_heads, inter, vocab_size, max_position_embeddings)
    else:
        inter = intermediate_size or _default_intermediate(hidden_size)
        config, shapes = _decoder(
            architecture, num_layers, hidden_size, num_heads, kv_heads, inter, vocab_size,
            max_position_embeddings, tie_word_embeddings, qkv_bias,
        )
    config.update(torch_dtype=dtype, initializer_range=init_std, architectures=[ARCHITECTURES[architecture]])

    tensors = {}
    for name, shape in shapes.items():
        is_norm = "norm" in name.lower()
        if name.endswith("bias") or is_norm:
            base = 1.0 if is_norm and name.endswith("weight") else 0.0
            spread = init_std if random_norms_and_biases else 0.0
            t = base + spread * torch.randn(shape, generator=gen)
        else:
            t = init_std * torch.randn(shape, generator=gen)
        tensors[name] = t.to(torch_dtype).contiguous()
    _save(out, tensors, shard_size_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(out, vocab_size, max_position_embeddings, bos=architecture != "bert")
    return out


def _default_intermediate(hidden: int) -> int:
    """About 8/3 * hidden rounded up to a multiple of 32, as Llama sizes its SwiGLU."""
    return 32 * math.ceil(8 * hidden / 3 / 32)


def _decoder(
    arch: str, layers: int, hidden: int, heads: int, kv_heads: int, inter: int, vocab: int, max_pos: int,
    tie: bool | None, qkv_bias: bool | None,
) -> tuple[dict, dict]:
    """config.json fields and HF tensor name -> shape for a causal LM."""
    tie = arch == "qwen2" if tie is None else tie
    qkv_bias = arch == "qwen2" if qkv_bias is None else qkv_bias
    if arch == "qwen2" and not qkv_bias:
        raise ValueError("qwen2 always has q/k/v biases; qkv_bias=False is not a qwen2 model")
    if arch == "mistral" and qkv_bias:
        raise ValueError("mistral has no attention biases; use llama or qwen2 for qkv_bias=True")
    head_dim = hidden // heads
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6 if arch == "qwen2" else 1e-5,
        "rope_theta": 10000.0 if arch == "llama" else 1000000.0,
        "tie_word_embeddings": tie,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "use_cache": True,
    }
    o_bias = arch == "llama" and qkv_bias  # Llama's attention_bias covers q, k, v and o
    if arch == "llama":
        config.update(attention_bias=qkv_bias, mlp_bias=False)
    if arch == "mistral":
        config.update(sliding_window=None, head_dim=head_dim)
    if arch == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        for proj, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (rows, hidden)
            if qkv_bias:
                shapes[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not tie:
        shapes["lm_head.weight"] = (vocab, hidden)
    return config, shapes


def _bert(layers: int, hidden: int, heads: int, inter: int, vocab: int, max_pos: int) -> tuple[dict, dict]:
    """config.json fields and HF tensor name -> shape for a BertModel."""
    config = {
        "model_type": "bert",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "position_embedding_type": "absolute",
        "pad_token_id": PAD_ID,
    }
    e = "embeddings."
    shapes = {
        e + "word_embeddings.weight": (vocab, hidden),
        e + "position_embeddings.weight": (max_pos, hidden),
        e + "token_type_embeddings.weight": (2, hidden),
        e + "LayerNorm.weight": (hidden,),
        e + "LayerNorm.bias": (hidden,),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name, (rows, cols) in {
            "attention.self.query": (hidden, hidden),
            "attention.self.key": (hidden, hidden),
            "attention.self.value": (hidden, hidden),
            "attention.output.dense": (hidden, hidden),
            "intermediate.dense": (inter, hidden),
            "output.dense": (hidden, inter),
        }.items():
            shapes[f"{p}{name}.weight"] = (rows, cols)
            shapes[f"{p}{name}.bias"] = (rows,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{p}{norm}.weight"] = (hidden,)
            shapes[f"{p}{norm}.bias"] = (hidden,)
    shapes["pooler.dense.weight"] = (hidden, hidden)
    shapes["pooler.dense.bias"] = (hidden,)
    return config, shapes


def _save(out: Path, tensors: dict[str, torch.Tensor], shard_size_bytes: int | None) -> None:
    metadata = {"format": "pt"}
    if shard_size_bytes is None:
        save_file(tensors, out / "model.safetensors", metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_size_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata=metadata)
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _write_tokenizer(out: Path, vocab_size: int, max_len: int, bos: bool) -> None:
    build_tokenizer(vocab_size, bos=bos).save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "model_max_length": max_len,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
