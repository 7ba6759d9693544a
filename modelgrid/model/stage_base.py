"""What decoder and encoder stages share: their layer range and how their weights are named."""

from __future__ import annotations

import torch
from torch import nn

from modelgrid.model.errors import ModelFormatError
from modelgrid.model.spec import ModelSpec


class StageModule(nn.Module):
    """Layers [start, end) of one model; embeddings if start == 0, the model's head if end == num_layers.

    Subclasses name their submodules so that a parameter's local name maps to its checkpoint tensor
    name through `_checkpoint_name`; `checkpoint_names` is the single source of truth for which
    tensors a stage needs.
    """

    def __init__(self, spec: ModelSpec, start: int, end: int) -> None:
        super().__init__()
        if not 0 <= start < end <= spec.num_layers:
            raise ModelFormatError(
                f"layer range [{start}, {end}) is out of bounds for this {spec.architecture} model with "
                f"{spec.num_layers} layers; valid ranges satisfy 0 <= start < end <= {spec.num_layers}"
            )
        self.spec = spec
        self.start = start
        self.end = end

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.spec.num_layers

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def checkpoint_names(self) -> dict[str, str]:
        """Local parameter name -> checkpoint tensor name, for every parameter (shared ones included)."""
        return {key: self._checkpoint_name(key) for key, _ in self.named_parameters(remove_duplicate=False)}

    def param_bytes(self) -> int:
        """Bytes of the weights this stage holds (a tensor shared by two modules counts once)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def init_buffers(self, device: torch.device | str) -> None:
        """Compute buffers that are not in the checkpoint, once weights sit on `device`."""

    def _checkpoint_name(self, key: str) -> str:
        raise NotImplementedError

    def _global_layer(self, key: str) -> tuple[int, str]:
        """'layers.2.mlp.up_proj.weight' -> (start + 2, 'mlp.up_proj.weight')."""
        _, local, rest = key.split(".", 2)
        return self.start + int(local), rest
