"""minifastv: a minimal LLaVA-1.5 in PyTorch with native FastV visual-token pruning."""

from .cache import KVCache
from .checkpoint import CheckpointError, load, load_tokenizer, save
from .config import ConfigError, LlavaConfig, TextConfig, VisionConfig
from .generate import generate, stream
from .image import ImageError, load_image, preprocess
from .llava import LlavaModel, Prefill
from .pipeline import Answer, Pipeline
from .pruning import (DART, METHODS, DivPrune, FasterVLM, FastV, Pruner, PyramidDrop, RandomDrop, Uniform,
                      theoretical_flops)
from .tokenizer import Tokenizer, chat_prompt

__all__ = ["DART", "METHODS", "DivPrune", "FasterVLM", "PyramidDrop", "Uniform", "Answer", "CheckpointError", "ConfigError", "FastV", "ImageError", "KVCache", "LlavaConfig",
           "LlavaModel", "Pipeline", "Prefill", "Pruner", "RandomDrop", "TextConfig", "Tokenizer", "VisionConfig",
           "chat_prompt", "generate", "load", "load_image", "load_tokenizer", "preprocess", "save", "stream",
           "theoretical_flops"]
