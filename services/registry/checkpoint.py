"""Validating an uploaded Hugging Face checkpoint and learning what the registry records about it.

Everything here runs on files already verified against the header (sizes, sha256). A problem with
the checkpoint is the uploader's: it becomes InvalidArgument with a message naming it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer

from modelgrid.errors import InvalidArgument
from modelgrid.model import Checkpoint, LayerBytes, ModelFormatError, ModelSpec, layer_bytes, load_spec
from modelgrid.model.checkpoint import meta_stage
from modelgrid.model.safetensors_io import INDEX_FILE
from services.registry.records import FileEntry, TensorEntry, VersionFacts
from services.registry.tensors import build_manifest, read_tensor_layout
from services.registry.validation import WEIGHT_SUFFIX

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


def inspect_checkpoint(directory: Path, files: list[FileEntry]) -> VersionFacts:
    """Validate the checkpoint in directory (config, weights, tokenizer) and describe it.

    Raises InvalidArgument naming the first problem found.
    """
    directory = Path(directory)
    try:
        return _inspect(directory, files)
    except ModelFormatError as exc:
        # the library names the directory; the uploader knows it as "the uploaded checkpoint"
        raise InvalidArgument(str(exc).replace(str(directory), "the uploaded checkpoint")) from None


def _inspect(directory: Path, files: list[FileEntry]) -> VersionFacts:
    names = {f.path for f in files}
    config_json = _read_config(directory)
    # our strict header parse first, so the model library only ever sees well-formed files
    layouts = {n: read_tensor_layout(directory / n) for n in sorted(names) if n.endswith(WEIGHT_SUFFIX)}
    weight_map = _read_index(directory, names)
    spec, checkpoint, sizes, dtype = _model_facts(directory)
    _check_tokenizer(directory, names)
    manifest = build_manifest(directory, layouts)
    _check_index(weight_map, names, manifest)
    return VersionFacts(
        architecture=spec.architecture,
        kind=spec.kind,
        num_layers=spec.num_layers,
        layer_bytes=list(sizes.layers),
        embed_bytes=sizes.embed,
        # what a last stage loads beyond its layers, a tied embedding matrix included
        head_bytes=sizes.head,
        kv_bytes_per_token_per_layer=spec.kv_bytes_per_layer_token(dtype),
        vocab_size=spec.vocab_size,
        max_context=spec.max_position_embeddings,
        config_json=config_json,
        files=sorted(files, key=lambda f: f.path),
        tensors=manifest,
    )


def _model_facts(directory: Path) -> tuple[ModelSpec, Checkpoint, LayerBytes, torch.dtype]:
    """What the model library makes of config.json and the weights: spec, checkpoint, sizes, dtype."""
    try:
        spec = load_spec(directory)
        _check_sizes(spec)
        checkpoint = Checkpoint(directory)
        _check_tensors(checkpoint, spec)
        sizes = layer_bytes(checkpoint, spec)
        first_layer = meta_stage(spec, 0, 1).checkpoint_names()
        dtype = checkpoint.dtype(next(n for k, n in first_layer.items() if k.startswith("layers.")))
    except (ModelFormatError, InvalidArgument):
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, ArithmeticError, StopIteration) as exc:
        # config values odd enough to trip the model code (a string for a size, a negative count):
        # still the upload's fault, but logged with its traceback in case it is ours
        log.warning("model library failed on the checkpoint in %s", directory, exc_info=True)
        raise InvalidArgument(
            f"config.json does not describe a model we can build ({type(exc).__name__}: {exc}); check its sizes "
            "and counts"
        ) from None
    return spec, checkpoint, sizes, dtype


def _check_sizes(spec: ModelSpec) -> None:
    """Positive integer sizes, checked before the model code builds anything from them."""
    hf_names = {
        "num_layers": "num_hidden_layers",
        "hidden_size": "hidden_size",
        "num_heads": "num_attention_heads",
        "num_kv_heads": "num_key_value_heads",
        "head_dim": "head_dim",
        "intermediate_size": "intermediate_size",
        "vocab_size": "vocab_size",
        "max_position_embeddings": "max_position_embeddings",
    }
    for field, hf_name in hf_names.items():
        value = getattr(spec, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArgument(f"config.json: {hf_name} is {value!r}; it must be an integer >= 1")


def _read_config(directory: Path) -> str:
    text = (directory / "config.json").read_text(encoding="utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"config.json is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument("config.json must hold a JSON object")
    return text


def _read_index(directory: Path, names: set[str]) -> dict[str, str]:
    """The weight_map of model.safetensors.index.json ({} without one)."""
    if INDEX_FILE not in names:
        return {}
    try:
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument(f"{INDEX_FILE} is not a valid index: it needs a 'weight_map' object") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidArgument(f"{INDEX_FILE}: 'weight_map' must map tensor names to file names")
    return weight_map


def _check_tensors(checkpoint: Checkpoint, spec: ModelSpec) -> None:
    """Every tensor of every layer (and embeddings and head) present, with the shape config.json implies."""
    stage = meta_stage(spec, 0, spec.num_layers)
    names = stage.checkpoint_names()
    checkpoint.require(names.values(), f"the {spec.architecture} model config.json describes")
    params = dict(stage.named_parameters(remove_duplicate=False))
    for key, name in names.items():
        expected, got = tuple(params[key].shape), checkpoint.shape(name)
        if expected != got:
            raise InvalidArgument(
                f"tensor {name!r} has shape {list(got)}, but config.json implies {list(expected)} "
                f"({spec.architecture}: hidden_size={spec.hidden_size}, heads={spec.num_heads}, "
                f"kv_heads={spec.num_kv_heads}, head_dim={spec.head_dim}, "
                f"intermediate_size={spec.intermediate_size}, vocab_size={spec.vocab_size})"
            )
        checkpoint.dtype(name)  # refuses dtypes the model code cannot load


def _check_tokenizer(directory: Path, names: set[str]) -> None:
    if TOKENIZER_FILE not in names:
        raise InvalidArgument(
            "the upload has no tokenizer.json: the gateway tokenizes with it (save it with "
            "tokenizer.save_pretrained(dir) from a fast tokenizer)"
        )
    try:
        Tokenizer.from_file(str(directory / TOKENIZER_FILE))
    except Exception as exc:  # the Rust library raises plain Exception
        raise InvalidArgument(f"tokenizer.json does not load with the tokenizers library: {exc}") from None


def _check_index(weight_map: dict[str, str], names: set[str], manifest: dict[str, TensorEntry]) -> None:
    """A model.safetensors.index.json, when uploaded, must agree with the shards."""
    for name, file in weight_map.items():
        if file not in names:
            raise InvalidArgument(f"{INDEX_FILE} puts tensor {name!r} in {file!r}, which is not in the upload")
        entry = manifest.get(name)
        if entry is None or entry.file != file:
            where = f"it is in {entry.file!r}" if entry else "no shard has it"
            raise InvalidArgument(f"{INDEX_FILE} puts tensor {name!r} in {file!r}, but {where}")
