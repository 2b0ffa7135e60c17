"""herd: the Llama 4 system in PyTorch - model, checkpoints, training, inference and serving."""

from herd.config import (
    PRESETS,
    ConfigError,
    Llama4Config,
    TextConfig,
    VisionConfig,
    multimodal_preset,
    preset,
)
from herd.formats.hf import CheckpointError, from_pretrained, load_config, save_pretrained
from herd.infer.generate import generate
from herd.infer.sampling import SamplingParams
from herd.model.build import build_model, materialize
from herd.model.cache import KVCache
from herd.model.multimodal import Llama4ForConditionalGeneration
from herd.model.text import Llama4ForCausalLM
from herd.sizes import count_params

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "KVCache", "Llama4Config", "Llama4ForCausalLM",
           "Llama4ForConditionalGeneration", "PRESETS", "TextConfig", "VisionConfig", "build_model", "count_params",
           "from_pretrained", "generate", "load_config", "materialize", "multimodal_preset", "preset",
           "SamplingParams", "save_pretrained"]
