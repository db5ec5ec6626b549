"""minifastv: a minimal LLaVA-1.5 in PyTorch with native FastV visual-token pruning."""

from .checkpoint import CheckpointError, load, load_tokenizer, save
from .config import ConfigError, LlavaConfig, TextConfig, VisionConfig
from .image import ImageError, load_image, preprocess
from .models.cache import KVCache
from .models.generate import generate, stream
from .models.llava import LlavaModel, Prefill
from .pipeline import Answer, Chat, Pipeline
from .pruning import (DART, METHODS, CDPruner, DARTOfficial, DivPrune, FasterVLM, FastV, Pool, Pruner, PyramidDrop,
                      PyramidDropOfficial, RandomDrop, Uniform, VisionZip, theoretical_flops)
from .tokenizer import Tokenizer, chat_prompt

__all__ = ["Answer", "CDPruner", "Chat", "chat_prompt", "CheckpointError", "ConfigError", "DART", "DARTOfficial",
           "DivPrune", "FasterVLM", "FastV", "generate", "ImageError", "KVCache", "LlavaConfig", "LlavaModel", "load",
           "load_image", "load_tokenizer", "METHODS", "Pipeline", "Pool", "Prefill", "preprocess", "Pruner",
           "PyramidDrop", "PyramidDropOfficial", "RandomDrop", "save", "stream", "TextConfig", "theoretical_flops",
           "Tokenizer", "Uniform", "VisionConfig", "VisionZip"]
