"""herd: the Llama 4 system in PyTorch - model, checkpoints, training, inference and serving."""

from herd.checkpoint import CheckpointError, from_pretrained, load_config, save_pretrained
from herd.config import PRESETS, ConfigError, TextConfig, count_params, preset
from herd.infer.generate import generate
from herd.model.cache import KVCache
from herd.model.text import Llama4ForCausalLM, build_model, materialize

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "KVCache", "Llama4ForCausalLM", "PRESETS", "TextConfig", "build_model",
           "count_params", "from_pretrained", "generate", "load_config", "materialize", "preset", "save_pretrained"]
