"""ModelGrid's model core: our own compact PyTorch for Llama-family decoders and BERT encoders,
loaded from Hugging Face safetensors checkpoints one pipeline stage at a time. No gRPC here."""

from modelgrid.model.checkpoint import Checkpoint, LayerBytes, layer_bytes, stage_tensor_names
from modelgrid.model.errors import CacheCapacityError, ModelFormatError
from modelgrid.model.kv_cache import KVCache
from modelgrid.model.sampling import Sampler, SamplingParams
from modelgrid.model.spec import ModelSpec, load_spec
from modelgrid.model.stage import DecoderStage, EncoderStage, load_stage
from modelgrid.model.synthetic import write_random_checkpoint

__all__ = [
    "CacheCapacityError",
    "Checkpoint",
    "DecoderStage",
    "EncoderStage",
    "KVCache",
    "LayerBytes",
    "ModelFormatError",
    "ModelSpec",
    "Sampler",
    "SamplingParams",
    "layer_bytes",
    "load_spec",
    "load_stage",
    "stage_tensor_names",
    "write_random_checkpoint",
]
