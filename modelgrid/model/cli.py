"""`modelgrid make-checkpoint`: write a random-initialised Hugging Face checkpoint for tests and demos."""

from __future__ import annotations

import argparse
import sys

from modelgrid.model.synthetic import ARCHITECTURES, write_random_checkpoint


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `make-checkpoint` on a parent parser's subparsers; dispatch to run(args)."""
    parser = subparsers.add_parser(
        "make-checkpoint",
        help="write a random-initialised HF checkpoint (config.json, safetensors, tokenizer)",
        description="Write a random-initialised Hugging Face checkpoint: config.json, *.safetensors "
        "(sharded with model.safetensors.index.json when --shard-mb is given), tokenizer.json.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llama", help="default: llama")
    parser.add_argument("--layers", type=_positive_int, default=4, help="transformer layers (default 4)")
    parser.add_argument("--hidden", type=_positive_int, default=64, help="hidden size (default 64)")
    parser.add_argument("--heads", type=_positive_int, default=4, help="attention heads (default 4)")
    parser.add_argument("--kv-heads", type=_positive_int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--intermediate", type=_positive_int, default=None, help="MLP width (default ~8/3 hidden)")
    parser.add_argument("--vocab", type=_positive_int, default=1000, help="vocabulary size (default 1000)")
    parser.add_argument(
        "--tie", action=argparse.BooleanOptionalAction, default=None,
        help="tie the LM head to the embeddings (default: qwen2 ties, llama and mistral do not)",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--shard-mb", type=_positive_float, default=None, help="shard files at this many MB")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the checkpoint; print where; 0 on success, 2 on invalid arguments."""
    try:
        out = write_random_checkpoint(
            args.out_dir,
            architecture=args.arch,
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            intermediate_size=args.intermediate,
            vocab_size=args.vocab,
            tie_word_embeddings=args.tie,
            seed=args.seed,
            shard_size_bytes=None if args.shard_mb is None else int(args.shard_mb * 1024 * 1024),
            dtype=args.dtype,
        )
    except (ValueError, OSError) as exc:
        print(f"make-checkpoint: {exc}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {args.arch} checkpoint to {out} ({args.layers} layers, {size / 1e6:.1f} MB of safetensors)")
    return 0
