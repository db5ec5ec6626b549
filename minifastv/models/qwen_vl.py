"""Qwen-VL (Bai et al., arXiv 2308.12966; Qwen/Qwen-VL-Chat): the vision encoder and resampler of qwen_visual.py,
256 tokens an image, on the Qwen-7B decoder of qwen.py. In the prompt an image is `<img>`, its 256 features,
`</img>`; here the input ids hold `<img>`, ONE image placeholder (image_token_id, Qwen's `<imgpad>`) that widens
into the 256 features, and `</img>`, so the merged sequence is the one Qwen's decoder runs on.

Every pruning method sees the 256 resampled tokens as one image (a 16 x 16 grid of queries, row by row). They are
not patches: each query attends to the whole image, so a kept token's "place" is its query's place in the grid,
and the vision tower has no class token for fastervlm or visionzip to read (they refuse).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..config import ConfigError, LlavaConfig, TextConfig, VisionConfig
from .llava import LlavaModel
from .qwen import QwenDecoder
from .qwen_visual import QwenVisionTower, Resampler


@dataclass(frozen=True)
class QwenVLConfig(LlavaConfig):
    """LlavaConfig (vision: the encoder, every block used; text: the decoder) with the resampler's queries, the
    encoder's position table and the decoder's long-context settings (qwen.py), and the ids around an image."""

    n_queries: int = 256            # decoder tokens per image, a square number
    n_positions: int = 256          # rows of the encoder's learned position table, a square number
    context: int = 2048             # the decoder's training length: log-n and dynamic NTK act past it
    logn: bool = True
    dynamic_ntk: bool = True
    image_start_id: int = 151857    # <img>
    image_end_id: int = 151858      # </img>
    system: str = "You are a helpful assistant."
    family: ClassVar[str] = "qwen-vl"
    template: ClassVar[str] = "qwen"   # tokenizer.TEMPLATES: ChatML, "Picture i: <img>...</img>", no BOS

    def __post_init__(self):
        super().__post_init__()
        for name in ("n_queries", "n_positions", "context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or \
                    name != "context" and math.isqrt(value) ** 2 != value:
                raise ConfigError(f"{name} must be a positive integer{'' if name == 'context' else ' and a square'}, "
                                  f"got {value!r}")
        if self.clip_text is not None:
            raise ConfigError("clip_text: Qwen-VL's vision tower is not CLIP ViT-L: CLIP's text tower does not fit")
        if self.projector_type != LlavaConfig.projector_type:
            raise ConfigError(f"projector_type {self.projector_type!r} does not apply to Qwen-VL: its projector is "
                              f"the resampler")
        if self.text.dim % 128:
            raise ConfigError(f"text dim {self.text.dim} must be a multiple of 128 (the resampler's heads are 128 wide)")
        ids = {"image_token_id": self.image_token_id, "image_start_id": self.image_start_id,
               "image_end_id": self.image_end_id}
        for name, value in ids.items():
            if not 0 <= value < self.text.vocab_size or list(ids.values()).count(value) > 1:
                raise ConfigError(f"{name} {value} must be a vocabulary id of its own (vocabulary {self.text.vocab_size})")

    @property
    def token_grid(self) -> int:
        """The queries' grid, on which the entry points draw the kept tokens (image.token_grid)."""
        return math.isqrt(self.n_queries)

    def to_dict(self) -> dict:
        """As LlavaConfig's, without LLaVA's projector_type (a config.json that has it still loads)."""
        return {name: value for name, value in super().to_dict().items() if name != "projector_type"}


# Qwen/Qwen-VL-Chat: ViT-bigG-style at 448 px (1,024 patches), Qwen-7B (vocabulary 151,936; <|endoftext|> 151643
# pads, <|im_end|> 151645 ends an answer); the special ids follow its 151,643 BPE ranks (tiktoken_bpe.qwen_special).
QWEN_VL_CHAT = QwenVLConfig(
    vision=VisionConfig(image_size=448, patch_size=14, dim=1664, n_layers=48, n_heads=16, intermediate_size=8192,
                        norm_eps=1e-6, feature_layer=-1),
    text=TextConfig(vocab_size=151936, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008,
                    norm_eps=1e-6, max_seq_len=8192, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
    image_token_id=151859, image_mode="squash")
_TINY = LlavaConfig.from_name("tiny")
QWEN_PRESETS = {
    # The tiny model's tower widths at 64 px in 8 px patches (64 patches), every block, resampled to 16 tokens; a
    # decoder 128 wide (one resampler head).
    "tiny-qwen": QwenVLConfig(vision=dataclasses.replace(_TINY.vision, norm_eps=1e-6, feature_layer=-1),
                              text=dataclasses.replace(_TINY.text, norm_eps=1e-6, n_kv_heads=4),
                              n_queries=16, n_positions=16, image_token_id=3, image_start_id=4, image_end_id=5,
                              image_mode="squash"),
    "qwen-vl-chat": QWEN_VL_CHAT,
}
QwenVLConfig.presets = QWEN_PRESETS


class QwenVLModel(LlavaModel):
    no_clip_text = ("cdpruner ranks by CLIP's text tower, which does not fit Qwen-VL: its vision tower is OpenCLIP's "
                    "ViT-bigG, whose text half Qwen-VL does not ship")
    def __init__(self, config: QwenVLConfig):
        nn.Module.__init__(self)    # Qwen-VL's own parts, not LLaVA's CLIP tower, projector and LLaMA
        self.config = config
        self.vision = QwenVisionTower(config.vision, config.n_positions)
        self.projector = Resampler(config.vision.dim, config.text.dim, config.n_queries, config.vision.norm_eps)
        self.llm = QwenDecoder(config.text, config.context, config.logn, config.dynamic_ntk)
        self.clip_text = None   # see no_clip_text

    def spans(self) -> dict[int, int]:
        return {self.config.image_token_id: self.config.n_queries}
