"""write_random_checkpoint's files, tokenizer and the make-checkpoint command."""

from __future__ import annotations

import argparse
import json
import time

import pytest
from tokenizers import Tokenizer

from modelgrid.model import Checkpoint, load_spec
from modelgrid.model.cli import add_parser, run
from modelgrid.model.synthetic import build_tokenizer, write_random_checkpoint

TEXTS = [
    "The river ran past the mill.",
    "Pipelines split models into stages; each stage runs a few layers!",
    "  leading spaces, tabs\tand\nnewlines, digits 0123456789, unicode: naïve café — 東京 🙂",
    "",
]


@pytest.mark.parametrize("vocab_size", [300, 1000, 32000])
def test_tokenizer_round_trips_text_and_decodes_every_id(vocab_size):
    started = time.perf_counter()
    tokenizer = build_tokenizer(vocab_size)
    assert time.perf_counter() - started < 2.0
    assert tokenizer.get_vocab_size() == vocab_size
    for text in TEXTS:
        encoding = tokenizer.encode(text)
        assert encoding.ids[0] == 1  # <s>
        assert max(encoding.ids) < vocab_size
        assert tokenizer.decode(encoding.ids) == text
    for token_id in range(vocab_size):
        assert tokenizer.decode([token_id], skip_special_tokens=False) != ""


def test_tokenizer_rejects_a_vocabulary_smaller_than_the_byte_alphabet():
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        build_tokenizer(100)


def test_checkpoint_files_follow_the_hugging_face_layout(tmp_path):
    out = write_random_checkpoint(tmp_path, architecture="qwen2", num_layers=2, num_kv_heads=2, vocab_size=400)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    names = set(Checkpoint(out).names())
    assert "lm_head.weight" not in names  # tied: transformers does not save it either
    assert {"model.layers.1.self_attn.q_proj.bias", "model.norm.weight", "model.embed_tokens.weight"} <= names
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 400
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer.token_to_id(tokenizer_config["eos_token"]) == config["eos_token_id"]


def test_sharded_checkpoint_index_covers_every_tensor_once(tmp_path):
    out = write_random_checkpoint(tmp_path, num_layers=3, shard_size_bytes=150_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    checkpoint = Checkpoint(out)
    assert sorted(index["weight_map"]) == checkpoint.names()
    assert index["metadata"]["total_size"] == sum(checkpoint.nbytes(n) for n in checkpoint.names())


def test_same_seed_same_weights(tmp_path):
    a = write_random_checkpoint(tmp_path / "a", seed=3)
    b = write_random_checkpoint(tmp_path / "b", seed=3)
    c = write_random_checkpoint(tmp_path / "c", seed=4)
    name = "model.layers.0.mlp.up_proj.weight"
    assert Checkpoint(a).load(name).equal(Checkpoint(b).load(name))
    assert not Checkpoint(a).load(name).equal(Checkpoint(c).load(name))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(architecture="gpt2"), "unknown architecture 'gpt2'"),
        (dict(hidden_size=60, num_heads=8), "not a multiple of num_heads"),
        (dict(num_heads=4, num_kv_heads=3), "not a multiple of num_kv_heads"),
        (dict(architecture="mistral", qkv_bias=True), "mistral has no attention biases"),
        (dict(num_layers=0), "num_layers must be >= 1"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_random_checkpoint(tmp_path, **kwargs)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="modelgrid")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_make_checkpoint_command(tmp_path, capsys):
    out = tmp_path / "tiny"
    args = parse(["make-checkpoint", str(out), "--arch", "mistral", "--layers", "3", "--hidden", "32",
                  "--heads", "4", "--kv-heads", "2", "--vocab", "300", "--no-tie", "--shard-mb", "0.05"])
    assert args.func is run
    assert run(args) == 0
    assert "wrote mistral checkpoint" in capsys.readouterr().out
    spec = load_spec(out)
    assert (spec.architecture, spec.num_layers, spec.hidden_size, spec.num_kv_heads) == ("mistral", 3, 32, 2)
    assert (out / "model.safetensors.index.json").is_file()


def test_make_checkpoint_reports_bad_combinations(tmp_path, capsys):
    assert run(parse(["make-checkpoint", str(tmp_path), "--hidden", "30", "--heads", "4"])) == 2
    assert "not a multiple of num_heads" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["make-checkpoint", str(tmp_path), "--layers", "0"])
