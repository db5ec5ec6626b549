"""CLIP's text tower and its two projections, from a full CLIP checkpoint in the transformers layout (a CLIPModel
save, e.g. openai/clip-vit-large-patch14-336), into a converted checkpoint: `convert --clip-text DIR`
(models/clip_text.py says what they are for). LLaVA checkpoints carry CLIP's vision half only."""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError, LlavaConfig
from .config_clip import ClipTextConfig
from .files import CheckpointError, read_json

# CLIP's encoder layer -> minifastv's block, the same in CLIP's vision and text towers.
CLIP_LAYER = [("self_attn.q_proj", "attn.q_proj"), ("self_attn.k_proj", "attn.k_proj"),
              ("self_attn.v_proj", "attn.v_proj"), ("self_attn.out_proj", "attn.o_proj"), ("layer_norm1", "norm1"),
              ("layer_norm2", "norm2"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")]
CLIP_TEXT = {
    "text_model.embeddings.token_embedding.weight": "clip_text.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "clip_text.position_embedding",
    "text_model.embeddings.position_ids": None,
    **{f"text_model.encoder.layers.{{}}.{src}.{p}": f"clip_text.blocks.{{}}.{dst}.{p}"
       for src, dst in CLIP_LAYER for p in ("weight", "bias")},
    **{f"text_model.final_layer_norm.{p}": f"clip_text.final_norm.{p}" for p in ("weight", "bias")},
    "text_projection.weight": "clip_text.text_projection.weight",
    "visual_projection.weight": "clip_text.visual_projection.weight",
    **{f"vision_model.post_layernorm.{p}": f"clip_text.post_norm.{p}" for p in ("weight", "bias")},
    "logit_scale": None,
}
# transformers' CLIPTextConfig defaults, for fields a config.json leaves out.
TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
                 "hidden_act": "quick_gelu", "eos_token_id": 49407}
CLIP_TOKENIZER_SOURCE = "tokenizer.json"


class ClipTextError(CheckpointError):
    """A --clip-text directory is not a full CLIP checkpoint that fits the model."""


def clip_text_config(directory: Path, config: LlavaConfig) -> ClipTextConfig:
    """The text tower's config from a CLIPModel's config.json; its vision half must be the model's tower."""
    file = directory / "config.json"
    source = read_json(file)
    if not isinstance(source.get("text_config"), dict):
        raise ClipTextError(f"{file}: not a full CLIP checkpoint (no text_config): --clip-text takes a CLIPModel "
                            "directory in the transformers layout, e.g. openai/clip-vit-large-patch14-336")
    text = {**TEXT_DEFAULTS, **source["text_config"]}
    vision = source.get("vision_config") or {}
    for key, ours in (("hidden_size", config.vision.dim), ("image_size", config.vision.image_size),
                      ("patch_size", config.vision.patch_size)):
        if key in vision and vision[key] != ours:
            raise ClipTextError(f"{file}: vision_config.{key} is {vision[key]}, but the model's vision tower has "
                                f"{ours}: this CLIP is not the one the checkpoint was built on")
    if text["hidden_act"] != "quick_gelu":
        raise ClipTextError(f"{file}: text_config.hidden_act {text['hidden_act']!r}; the tower runs quick_gelu")
    eos = text["eos_token_id"]
    try:
        return ClipTextConfig(vocab_size=text["vocab_size"], dim=text["hidden_size"],
                              n_layers=text["num_hidden_layers"], n_heads=text["num_attention_heads"],
                              intermediate_size=text["intermediate_size"], norm_eps=float(text["layer_norm_eps"]),
                              n_positions=text["max_position_embeddings"],
                              projection_dim=source.get("projection_dim", 512),
                              eos_token_id=None if eos == 2 else eos)   # 2: transformers' legacy pooling (argmax)
    except ConfigError as e:
        raise ClipTextError(f"{file}: {e}") from None


def clip_text_target(key: str) -> str | None:
    """minifastv name of a CLIP checkpoint tensor for the text tower part; None for the rest of CLIP (its vision
    tower is the model's own, converted from the LLaVA checkpoint or --vision-tower)."""
    template = ".".join("{}" if part.isdigit() else part for part in key.split("."))
    if template in CLIP_TEXT:
        target = CLIP_TEXT[template]
        return None if target is None else target.format(*(p for p in key.split(".") if p.isdigit()))
    if key.startswith("vision_model."):
        return None
    raise ClipTextError(f"unknown tensor {key!r}: not part of a CLIPModel checkpoint")


def clip_tokenizer_file(directory: Path) -> Path:
    file = directory / CLIP_TOKENIZER_SOURCE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found: --clip-text needs CLIP's tokenizer.json beside its weights (as "
                                "openai/clip-vit-large-patch14-336 has it)")
    return file
