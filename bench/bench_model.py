"""Decode throughput at batch 1 on CPU: our stage vs transformers' generate, same random checkpoint.

    PYTHONPATH=. python bench/bench_model.py [--reps 5] [--new-tokens 64] [--prompt 32]

Prints tokens/s (median of the repetitions) for both, and their ratio. Greedy decoding, so the two
token sequences are also compared (they should be identical).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from bench_platform import MODEL, Runs, own_generate
from modelgrid.model import load_stage, write_random_checkpoint

def ours(stage, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:  # noqa: ANN001
    runs = Runs("modelgrid")
    tokens = own_generate(stage, prompt.tolist(), new_tokens, runs)
    return runs.totals[0], tokens


def theirs(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = model.generate(
        prompt[None],
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
    )
    return time.perf_counter() - start, out[0, len(prompt) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as directory, torch.inference_mode():
        write_random_checkpoint(directory, **MODEL)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # never stop early: time exactly new_tokens
        prompt = torch.randint(3, 32000, (args.prompt,), generator=torch.Generator().manual_seed(0))
        stage = load_stage(directory, 0, MODEL["num_layers"])
        ours(stage, prompt, 4)  # warm-up
        theirs(model, prompt, 4)
        our_times, their_times = [], []
        for _ in range(args.reps):
            seconds, our_tokens = ours(stage, prompt, args.new_tokens)
            our_times.append(seconds)
            seconds, their_tokens = theirs(model, prompt, args.new_tokens)
            their_times.append(seconds)

    ours_tps = args.new_tokens / statistics.median(our_times)
    theirs_tps = args.new_tokens / statistics.median(their_times)
    print("checkpoint: llama, " + ", ".join(f"{k} {v}" for k, v in MODEL.items()) + ", float32")
    print(f"batch 1, prompt {args.prompt} tokens, {args.new_tokens} new tokens (greedy), "
          f"{torch.get_num_threads()} threads, median of {args.reps}")
    print(f"modelgrid     {ours_tps:8.1f} tokens/s")
    print(f"transformers  {theirs_tps:8.1f} tokens/s")
    print(f"ratio         {ours_tps / theirs_tps:8.2f}x")
    print(f"same tokens:  {our_tokens == their_tokens}")


if __name__ == "__main__":
    main()
