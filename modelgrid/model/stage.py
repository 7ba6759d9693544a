"""load_stage: build layers [start, end) of a model from the checkpoint tensors they need, and no others."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from modelgrid.model.checkpoint import Checkpoint, meta_stage
from modelgrid.model.decoder import DecoderStage
from modelgrid.model.encoder import EncoderStage
from modelgrid.model.errors import ModelFormatError
from modelgrid.model.layers import column_major_pays
from modelgrid.model.spec import load_spec

__all__ = ["DecoderStage", "EncoderStage", "load_stage"]


def load_stage(
    directory: str | Path,
    start: int,
    end: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> DecoderStage | EncoderStage:
    """Layers [start, end) of the model in `directory`, on `device`, in eval mode.

    The modules are built on the meta device and each needed tensor is read from its file and
    assigned in place, so memory holds this stage's weights only. The directory may hold just
    those tensors (plus config.json). dtype None means float32 on CPU, bfloat16 elsewhere. Float32
    projections on CPU are stored column-major, which decodes faster (layers.column_major_pays); a matrix two
    modules share (an LM head tied to the embeddings in the same stage) keeps rows, for the lookup.
    """
    spec = load_spec(directory)
    device = torch.device(device)
    dtype = _dtype(dtype) if dtype is not None else spec.dtype_default(device)
    stage = meta_stage(spec, start, end)
    names = stage.checkpoint_names()  # local parameter name -> checkpoint tensor name
    checkpoint = Checkpoint(directory)
    checkpoint.require(names.values(), f"layers [{start}, {end}) of {directory}")
    params = dict(stage.named_parameters(remove_duplicate=False))
    projections = {f"{name}.weight" for name, m in stage.named_modules() if isinstance(m, nn.Linear)}
    local_keys: dict[str, list[str]] = {}
    for key, name in names.items():
        expected, got = tuple(params[key].shape), checkpoint.shape(name)
        if expected != got:
            raise ModelFormatError(
                f"tensor {name!r} has shape {got} in {directory}, but config.json implies {expected} "
                f"({spec.architecture}: hidden_size={spec.hidden_size}, heads={spec.num_heads}, "
                f"kv_heads={spec.num_kv_heads}, head_dim={spec.head_dim}, "
                f"intermediate_size={spec.intermediate_size}, vocab_size={spec.vocab_size})"
            )
        local_keys.setdefault(name, []).append(key)
    column_major = set()
    if column_major_pays(device, dtype):
        column_major = {name for name, keys in local_keys.items() if len(keys) == 1 and keys[0] in projections}
    for name, tensor in checkpoint.load_many(local_keys, device, dtype, column_major):
        param = nn.Parameter(tensor, requires_grad=False)
        for key in local_keys[name]:  # two keys when a stage both embeds and has a tied LM head
            module, attr = key.rsplit(".", 1)
            setattr(stage.get_submodule(module), attr, param)
    stage.init_buffers(device)
    return stage.eval()


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype (e.g. 'float32', 'bfloat16')")
    return resolved
