"""minifastv: a minimal LLaVA-1.5 in PyTorch with native FastV visual-token pruning."""

from .cache import KVCache
from .checkpoint import CheckpointError, load, save
from .config import ConfigError, LlavaConfig, TextConfig, VisionConfig
from .fastv import FastV, theoretical_flops
from .image import ImageError, load_image, preprocess
from .llava import LlavaModel
from .tokenizer import Tokenizer, chat_prompt

__all__ = ["CheckpointError", "ConfigError", "FastV", "ImageError", "KVCache", "LlavaConfig", "LlavaModel", "TextConfig",
           "Tokenizer", "VisionConfig", "chat_prompt", "load", "load_image", "preprocess", "save",
           "theoretical_flops"]
