"""The model's parts, one component per file, in the order data passes through them:

    clip.py       the CLIP ViT vision tower (patch features at a chosen layer)
    projector.py  vision features -> the decoder's width
    llava.py      the LVLM glue: image placeholders widened into features, prefill and decode steps
    llama.py      the LLaMA decoder; a Sequence is what each layer runs on, and what pruning shortens
    cache.py      the KV cache (each layer its own length: pruned layers cache fewer slots); cache_int8.py an
                  int8 one, whose decode steps read a quarter of the bytes
    generate.py   sampling, and generation as one prefill then one-token decode steps
    video_llava.py  Video-LLaVA: a video tower beside the image tower, video placeholders
    llava_next.py   LLaVA-NeXT: an image as tiles (../anyres.py), packed with newline tokens
    qwen.py, qwen_visual.py, qwen_vl.py  Qwen-VL: Qwen-7B (bias, long-context rules), a bigG-style encoder and
                    a resampler to 256 tokens an image

A new model family adds its own files here (its towers, resampler, how it lays features into the sequence);
the decoder, the cache and generation serve every family.
"""

from ..config import LlavaConfig
from .cache import KVCache, LayerCache
from .cache_int8 import Int8KVCache, set_kv_cache
from .generate import Stream, generate, sample, stream
from .llama import Llama, Sequence
from .llava import LlavaModel, Prefill
from .llava_next import LlavaNextConfig, LlavaNextModel
from .qwen_vl import QwenVLConfig, QwenVLModel
from .video_llava import VideoLlavaConfig, VideoLlavaModel

# A config.json's "family" -> its config class and model class (no "family": LLaVA-1.5, as before families).
FAMILIES = {"llava": (LlavaConfig, LlavaModel), "video-llava": (VideoLlavaConfig, VideoLlavaModel),
            "llava-next": (LlavaNextConfig, LlavaNextModel), "qwen-vl": (QwenVLConfig, QwenVLModel)}

__all__ = ["FAMILIES", "Int8KVCache", "KVCache", "LayerCache", "Llama", "LlavaModel", "LlavaNextConfig",
           "LlavaNextModel", "Prefill", "QwenVLConfig", "QwenVLModel", "Sequence", "Stream", "VideoLlavaConfig",
           "VideoLlavaModel", "generate", "sample", "set_kv_cache", "stream"]
