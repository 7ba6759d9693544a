"""BERT encoder stages: the real all-MiniLM-L6-v2 and random checkpoints, against transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from modelgrid.model import EncoderStage, load_spec, load_stage

pytestmark = pytest.mark.usefixtures("torch_one_thread")

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread with butter and jam this morning.",
    "The stock market fell sharply today after the announcement.",
    "Hi",
]


def tokenize(directory: Path, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest sentence
    batch = tokenizer.encode_batch(sentences)
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long)  # noqa: E731
    return (
        as_tensor([e.ids for e in batch]),
        as_tensor([e.attention_mask for e in batch]),
        as_tensor([e.type_ids for e in batch]),
    )


def reference_embeddings(directory: Path, ids, mask, types) -> torch.Tensor:
    """transformers BertModel + mean pooling + L2 normalisation, as sentence-transformers does."""
    model = transformers.BertModel.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    weights = mask[:, :, None].float()
    return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=1)


def embed(stages: list[EncoderStage], ids, mask, types) -> torch.Tensor:
    x = stages[0](ids, mask, token_type_ids=types)
    for stage in stages[1:]:
        x = stage(x, mask)
    return x


def test_minilm_in_two_stages_matches_transformers(minilm_dir):
    ids, mask, types = tokenize(minilm_dir, SENTENCES)
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) == len(SENTENCES) and (mask == 0).any()  # a padded, ragged batch
    stages = [load_stage(minilm_dir, 0, 3), load_stage(minilm_dir, 3, 6)]
    hidden = stages[0](ids, mask, token_type_ids=types)
    assert hidden.shape == (4, ids.shape[1], 384)
    ours = stages[1](hidden, mask)
    assert ours.shape == (4, 384) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(4), atol=1e-6, rtol=0)
    cosine_distance = 1 - (ours * reference_embeddings(minilm_dir, ids, mask, types)).sum(1)
    assert cosine_distance.abs().max() < 1e-5


def test_minilm_similar_sentences_score_higher(minilm_dir):
    stages = [load_stage(minilm_dir, 0, 2), load_stage(minilm_dir, 2, 6)]
    e = embed(stages, *tokenize(minilm_dir, SENTENCES))
    similarity = e @ e.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[0, 1] > similarity[1, 2] + 0.3


def test_bert_prefixed_tensor_names_are_detected(minilm_dir, tmp_path):
    """Checkpoints saved from BertForMaskedLM and friends name tensors `bert.encoder...`."""
    with safe_open(minilm_dir / "model.safetensors", framework="pt") as f:
        tensors = {f"bert.{name}": f.get_tensor(name) for name in f.keys()}
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(minilm_dir / "config.json", tmp_path / "config.json")
    assert load_spec(tmp_path).tensor_prefix == "bert."
    batch = tokenize(minilm_dir, SENTENCES)
    prefixed = embed([load_stage(tmp_path, 0, 6)], *batch)
    plain = embed([load_stage(minilm_dir, 0, 6)], *batch)
    torch.testing.assert_close(prefixed, plain, atol=0, rtol=0)


def test_random_bert_in_three_stages_with_token_types(make_checkpoint):
    directory = make_checkpoint(
        architecture="bert", num_layers=5, hidden_size=64, num_heads=4, vocab_size=512,
        init_std=0.2, random_norms_and_biases=True,
    )
    assert json.loads((directory / "config.json").read_text())["architectures"] == ["BertModel"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    types = torch.randint(0, 2, (3, 11), generator=g)
    stages = [load_stage(directory, 0, 2), load_stage(directory, 2, 3), load_stage(directory, 3, 5)]
    ours = embed(stages, ids, mask, types)
    cosine_distance = 1 - (ours * reference_embeddings(directory, ids, mask, types)).sum(1)
    assert cosine_distance.abs().max() < 1e-5
