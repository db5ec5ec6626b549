"""Model hyperparameters: small dataclasses and named presets. A config.json is read, strictly, by the loader
(checkpoint.config_from_dict); every config, however made, is checked on construction (config_checks.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from .config_checks import ConfigError, check_llava, check_quant, check_text, check_vision
from .config_clip import ClipTextConfig

# CLIP's normalisation constants; LLaVA-1.5 pads images with the mean colour.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower."""

    image_size: int = 336
    patch_size: int = 14
    dim: int = 1024
    n_layers: int = 24  # depth of the source tower; only the layers up to feature_layer are built
    n_heads: int = 16
    intermediate_size: int = 4096
    norm_eps: float = 1e-5
    feature_layer: int = -2  # index into the hidden-state list [embeddings, block 1, ..., block L]

    def __post_init__(self):
        check_vision(self)

    @property
    def grid(self) -> int:
        """Patches along each side of the image."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid ** 2

    @property
    def n_used_layers(self) -> int:
        """Blocks that run: hidden state i is the output of block i, hidden state 0 the embeddings."""
        return self.feature_layer % (self.n_layers + 1)


@dataclass(frozen=True)
class TextConfig:
    """LLaMA decoder."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        check_text(self)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of the decoder's linears (minifastv/quant/). int8: one scale per output channel.
    int4: a scale and a zero point per group of `group_size` inputs."""

    method: str
    group_size: int | None = None  # int4 only

    def __post_init__(self):
        check_quant(self)


@dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"
    # The id that marks an image in input_ids. It need not be a vocabulary entry: the original LLaVA uses -200.
    image_token_id: int = -200
    image_mode: str = "pad"  # LLaVA-1.5 pads to a square; "crop" is llava-hf's processor default
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    quant: QuantConfig | None = None  # None: every weight is floating point
    clip_text: ClipTextConfig | None = None  # CLIP's text tower, for the methods that rank by relevance (CDPruner)
    family: ClassVar[str] = "llava"   # the model family (models/__init__.py, FAMILIES); config.json says it

    def __post_init__(self):
        # JSON gives lists; keep tuples so configs compare and hash the same way after a round trip.
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ConfigError(f"{name} needs 3 values (RGB), got {len(value)}")
            object.__setattr__(self, name, value)
        check_llava(self)

    @classmethod
    def from_name(cls, name: str) -> LlavaConfig:
        if name not in cls.presets:   # PRESETS below; each family's config class has its own
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(cls.presets)}")
        return cls.presets[name]

    def to_dict(self) -> dict:
        return {"family": self.family, **dataclasses.asdict(self)}


_LLAVA_VISION = VisionConfig()  # CLIP ViT-L/14 at 336 px: 576 patches
PRESETS: dict[str, LlavaConfig] = {
    # Small enough to train on a laptop CPU in minutes; 64 px images in 8 px patches: 64 image tokens.
    "tiny": LlavaConfig(
        vision=VisionConfig(image_size=64, patch_size=8, dim=96, n_layers=4, n_heads=4, intermediate_size=384),
        text=TextConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=352,
                        max_seq_len=512),
        image_token_id=3,
    ),
    "llava-1.5-7b": LlavaConfig(vision=_LLAVA_VISION, text=TextConfig()),
    "llava-1.5-13b": LlavaConfig(
        vision=_LLAVA_VISION,
        text=TextConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, intermediate_size=13824),
    ),
}
LlavaConfig.presets = PRESETS
