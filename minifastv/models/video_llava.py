"""Video-LLaVA (Lin et al., arXiv 2311.10122): LLaVA's glue with two CLIP towers of one architecture, an image
tower and a video tower, and one projector for both. An image placeholder widens into the image's patches
(class token dropped, as LLaVA-1.5); a video placeholder into n_frames frames of patches, each frame KEEPING its
class token (8 x 257 = 2,056 slots for the 7B model at 224 px). Every pruning method sees a video's slots as
visual tokens; FastV ranks them all together, as the paper's video setting prunes a video's tokens as one set.

With `temporal` False this is the -hf model as transformers runs it (VideoLlavaForConditionalGeneration). The
original video tower (LanguageBind_Video_merge) also has temporal attention in every block, which the -hf
conversion drops: before each block's spatial attention, a learned embedding per frame is added to every token,
and each token position attends across the frames (a LayerNorm of its own, then attention, with a residual).
`temporal` True builds that tower.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import rearrange
from torch import nn

from ..config import ConfigError, LlavaConfig, TextConfig, VisionConfig
from .clip import VisionAttention, VisionBlock, VisionTower
from .clip_text import SCORES
from .llava import LlavaModel


@dataclass(frozen=True)
class VideoLlavaConfig(LlavaConfig):
    """LlavaConfig (its `vision` describes both towers) with the video placeholder, the frames a video has and
    the prompt's layout.

    frame_token_id: None for the -hf layout (one video placeholder widens into all the frames); set, the
    original's layout: a video is written as n_frames placeholders of this id joined by spaces (the original
    writes its image placeholder once per frame), each widened into one frame. system: the line the prompt
    starts with (None: LLaVA-1.5's vicuna_v1 line; "" none, as the -hf model's documented prompt)."""

    video_token_id: int = 32001
    n_frames: int = 8
    temporal: bool = False  # the original video tower's temporal attention in every block
    frame_token_id: int | None = None
    system: str | None = None
    family: ClassVar[str] = "video-llava"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.n_frames, bool) or not isinstance(self.n_frames, int) or not 0 < self.n_frames <= 1024:
            raise ConfigError(f"n_frames must be an integer in [1, 1024], got {self.n_frames!r}")
        special = (self.image_token_id, self.text.bos_token_id, self.text.eos_token_id, self.text.pad_token_id)
        for name in ("video_token_id", "frame_token_id"):
            if getattr(self, name) in special or name == "frame_token_id" and self.frame_token_id == self.video_token_id:
                raise ConfigError(f"{name} {getattr(self, name)} collides with the image, video or a special token id")
        if self.system is not None and not isinstance(self.system, str):
            raise ConfigError(f"system must be text, got {self.system!r}")


# LanguageBind/Video-LLaVA-7B-hf: CLIP ViT-L/14 at 224 px (256 patches), Vicuna-7B with a 32064-row vocabulary;
# the prompt transformers documents for it: "USER: <video>\n{question} ASSISTANT:", no system line.
VIDEO_LLAVA_7B = VideoLlavaConfig(vision=VisionConfig(image_size=224), text=TextConfig(vocab_size=32064),
                                  image_token_id=32000, video_token_id=32001, image_mode="crop", system="")
_TINY = LlavaConfig.from_name("tiny")
VIDEO_PRESETS = {
    # The tiny model's tower on 32 px frames (4 x 4 patches + the class token: 136 tokens a video), the video
    # tower with the original's temporal attention, and the decoder with 6 layers, so that FastV's K=5 (the
    # paper's second video setting) prunes before a layer.
    "tiny-video": VideoLlavaConfig(vision=dataclasses.replace(_TINY.vision, image_size=32),
                                   text=dataclasses.replace(_TINY.text, n_layers=6),
                                   image_token_id=3, video_token_id=4, image_mode="crop", temporal=True),
    "video-llava-7b": VIDEO_LLAVA_7B,
}
VideoLlavaConfig.presets = VIDEO_PRESETS


LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")


class TemporalBlock(VisionBlock):
    """A CLIP block that first mixes each token position across the n_frames frames of its video (LanguageBind's
    video tower): + a learned embedding per frame, then temporal attention with a residual, then the block."""

    def __init__(self, cfg: VisionConfig, n_frames: int):
        super().__init__(cfg)
        self.n_frames = n_frames
        self.temporal_embedding = nn.Parameter(torch.zeros(1, n_frames, cfg.dim))  # stored as the original stores it
        self.temporal_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.temporal_attn = VisionAttention(cfg)

    def forward(self, x, need_cls_row: bool = False):
        n = x.shape[1]                                                 # token positions per frame
        x = rearrange(x, "(v t) n c -> (v n) t c", t=self.n_frames)    # each position's frames, in order
        if self.n_frames > 1:
            x = x + self.temporal_embedding
        x = x + self.temporal_attn(self.temporal_norm(x))[0]           # every frame sees every frame
        return super().forward(rearrange(x, "(v n) t c -> (v t) n c", n=n), need_cls_row)


class VideoLlavaModel(LlavaModel):
    """pixel_values [n_images, 3, H, W] for the image placeholders and video_values [n_videos, n_frames, 3, H, W]
    for the video placeholders, each in placeholder order."""

    def __init__(self, config: VideoLlavaConfig):
        super().__init__(config)
        self.video = VisionTower(config.vision, keep_class_token=True)
        if config.temporal:
            self.video.blocks = nn.ModuleList(TemporalBlock(config.vision, config.n_frames)
                                              for _ in range(config.vision.n_used_layers))

    def spans(self) -> dict[int, int]:
        cfg = self.config
        if cfg.frame_token_id is not None:  # the original's layout: a placeholder per frame
            return {**super().spans(), cfg.frame_token_id: cfg.vision.n_patches + 1}
        return {**super().spans(), cfg.video_token_id: cfg.n_frames * (cfg.vision.n_patches + 1)}

    def groups(self) -> dict[int, int]:
        """A video's frames are its groups for the per-image methods: each its class token and its patches."""
        return {**super().groups(), self.video_placeholder: self.config.vision.n_patches + 1}

    @property
    def video_placeholder(self) -> int:
        """The id videos are written with: the video placeholder, or in the original's layout the frame one."""
        cfg = self.config
        return cfg.video_token_id if cfg.frame_token_id is None else cfg.frame_token_id

    def encode_videos(self, video_values: torch.Tensor) -> torch.Tensor:
        """[V, n_frames, 3, H, W] preprocessed frames -> [V, n_frames * (n_patches + 1), text dim] decoder inputs,
        frame by frame, each frame's class token first."""
        cfg = self.config
        size = cfg.vision.image_size
        if video_values.ndim != 5 or tuple(video_values.shape[1:]) != (cfg.n_frames, 3, size, size):
            raise ValueError(f"video_values must have shape [num_videos, {cfg.n_frames}, 3, {size}, {size}], "
                             f"got {list(video_values.shape)}")
        if not video_values.isfinite().all():
            raise ValueError("video_values contains NaN or infinite values")
        features, _ = self.video(video_values.flatten(0, 1))                 # V * F, n_patches + 1, C
        return self.projector(features).reshape(len(video_values), -1, cfg.text.dim)

    def visual_features(self, input_ids, pixel_values, score: str | None, video_values=None,
                        **visual) -> list[tuple]:
        out = super().visual_features(input_ids, pixel_values, score, **visual)
        cfg, token = self.config, self.video_placeholder
        per_video = 1 if cfg.frame_token_id is None else cfg.n_frames
        n_placeholders = int((input_ids == token).sum())
        n_given = 0 if video_values is None else len(video_values)
        if n_placeholders != n_given * per_video:
            what = "video placeholder(s)" if per_video == 1 else f"frame placeholder(s), {per_video} a video,"
            raise ValueError(f"the prompt has {n_placeholders} {what} (id {token}) but {n_given} video(s) were given")
        if n_placeholders and score:
            raise ValueError(f"the methods that rank by the vision tower's {SCORES[score]} do not take videos yet")
        if not n_placeholders:
            return out
        features = self.encode_videos(video_values)                              # V, F * (n_patches + 1), C
        return out + [(token, features.reshape(n_given * per_video, -1, features.shape[-1]), None)]
