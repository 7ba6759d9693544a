"""Bad checkpoints and bad requests fail with a ModelFormatError that names the problem."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelgrid.model import Checkpoint, ModelFormatError, load_spec, load_stage

pytestmark = pytest.mark.usefixtures("torch_one_thread")

MODEL = dict(architecture="llama", num_layers=4, hidden_size=64, num_heads=4, vocab_size=512)


@pytest.fixture
def checkpoint_copy(make_checkpoint, tmp_path) -> Path:
    """A private, modifiable copy of a small Llama checkpoint."""
    return Path(shutil.copytree(make_checkpoint(**MODEL), tmp_path / "model"))


def edit_config(directory: Path, **fields) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_missing_tensor_is_named_with_the_files(checkpoint_copy):
    path = checkpoint_copy / "model.safetensors"
    with safe_open(path, framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys() if n != "model.layers.2.mlp.up_proj.weight"}
    save_file(tensors, path)
    load_stage(checkpoint_copy, 0, 2)  # stages that do not need it still load
    expected = r"lacks tensor 'model\.layers\.2\.mlp\.up_proj\.weight'.*files: model\.safetensors"
    with pytest.raises(ModelFormatError, match=expected):
        load_stage(checkpoint_copy, 2, 4)


def test_missing_shard_is_explained_by_the_index(make_checkpoint, tmp_path):
    directory = Path(shutil.copytree(make_checkpoint(**MODEL, shard_size_bytes=100_000), tmp_path / "sharded"))
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    lost = index["weight_map"]["lm_head.weight"]
    (directory / lost).unlink()
    with pytest.raises(ModelFormatError, match=rf"lacks tensor 'lm_head\.weight'.*puts them in {lost}"):
        load_stage(directory, 2, 4)


def test_unsupported_architecture_lists_the_supported_ones(checkpoint_copy):
    edit_config(checkpoint_copy, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    expected = r"unsupported architecture 'GPT2LMHeadModel'.*llama, mistral, qwen2, bert"
    with pytest.raises(ModelFormatError, match=expected):
        load_stage(checkpoint_copy, 0, 4)


def test_shape_mismatch_names_tensor_expected_and_actual(checkpoint_copy):
    edit_config(checkpoint_copy, intermediate_size=200)  # the checkpoint was written with 192
    expected = r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(192, 64\).*implies \(200, 64\)"
    with pytest.raises(ModelFormatError, match=expected):
        load_stage(checkpoint_copy, 0, 1)


@pytest.mark.parametrize("start, end", [(0, 5), (-1, 2), (3, 3), (4, 5), (2, 1)])
def test_layer_range_out_of_bounds_states_the_valid_range(make_checkpoint, start, end):
    expected = rf"\[{start}, {end}\) is out of bounds.*4 layers.*0 <= start < end <= 4"
    with pytest.raises(ModelFormatError, match=expected):
        load_stage(make_checkpoint(**MODEL), start, end)


def test_missing_config(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="has no config.json"):
        load_stage(checkpoint_copy, 0, 4)


class _Explodes:
    """Unpickling this would run code; the test proves it never happens."""

    def __reduce__(self):
        return (pytest.fail, ("a pickled checkpoint was unpickled",))


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt", "weights.pth", "model.pkl"])
def test_pickled_weights_are_refused_without_unpickling(checkpoint_copy, monkeypatch, filename):
    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    monkeypatch.setattr(pickle, "load", no_torch_load)
    (checkpoint_copy / "model.safetensors").unlink()
    (checkpoint_copy / filename).write_bytes(pickle.dumps(_Explodes()))
    expected = rf"pickled weights \({filename}\).*refused.*[Cc]onvert.*safetensors"
    with pytest.raises(ModelFormatError, match=expected):
        load_stage(checkpoint_copy, 0, 4)
    with pytest.raises(ModelFormatError, match="refused"):
        Checkpoint(checkpoint_copy)


def test_safetensors_win_over_pickles_in_the_same_directory(checkpoint_copy, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    (checkpoint_copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Explodes()))
    assert load_stage(checkpoint_copy, 0, 4).is_last


def test_not_a_safetensors_file(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelFormatError, match="not a safetensors file"):
        load_spec(checkpoint_copy)


def test_unsupported_rope_type(checkpoint_copy):
    edit_config(checkpoint_copy, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelFormatError, match="rope_type 'yarn' is not supported; supported: default, linear"):
        load_spec(checkpoint_copy)


def test_malformed_stage_input_is_a_value_error(make_checkpoint, minilm_dir):
    directory = make_checkpoint(**MODEL)
    first, middle = load_stage(directory, 0, 2), load_stage(directory, 2, 4)
    with pytest.raises(ValueError, match=r"token id 512 is outside \[0, 512\)"):
        first(torch.tensor([1, 512]), first.new_cache())
    with pytest.raises(ValueError, match=r"takes \(T,\) int64 token ids"):
        first(torch.zeros(2, 64), first.new_cache())
    with pytest.raises(ValueError, match=r"takes \(T, 64\) activations"):
        middle(torch.tensor([1, 2]), middle.new_cache())
    with pytest.raises(ValueError, match=r"positions must have shape \(2,\)"):
        first(torch.tensor([1, 2]), first.new_cache(), positions=torch.arange(3))
    encoder = load_stage(minilm_dir, 0, 1)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(1, 3\)"):
        encoder(torch.tensor([[101, 7592, 102]]), torch.ones(1, 4))
