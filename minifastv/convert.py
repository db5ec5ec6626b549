"""From Hugging Face-style LLaVA configs and tensor names to minifastv's.

The weight-name map is data: source prefixes say which part of the model a tensor belongs to, and per-part
tables (with `{}` for the layer number) give the minifastv name, or None for tensors LLaVA never uses.
Anything not in the tables is an error, so a layout we do not know fails loudly instead of loading wrong.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from .checkpoint import CLIP_TOKENIZER, CONFIG, TOKENIZER, empty_model
from .config import ConfigError, LlavaConfig, QuantConfig, TextConfig, VisionConfig
from .convert_clip import CLIP_LAYER, ClipTextError, clip_text_config, clip_text_target, clip_tokenizer_file
from .convert_qwen import TIKTOKEN, is_qwen, qwen_config, qwen_tensors, qwen_tokenizer
from .files import (PICKLED, SAFETENSORS, CheckpointError, ShardWriter, read_json, read_tensors, source_dir, staged,
                    weight_files)
from .machine import parse_dtype
from .models import LlavaNextConfig, VideoLlavaConfig
from .models.llava_next import PINPOINTS
from .quant.linear import quantized_tensors


class ConversionError(CheckpointError):
    """A source checkpoint does not fit any known LLaVA layout."""


# Source prefix -> part. First match wins, so longer prefixes come first; "model." alone is the original
# LLaVA's language model and must stay last.
PREFIXES = [
    ("model.image_tower.image_tower.", "vision"),                 # original Video-LLaVA with its towers embedded
    ("model.video_tower.video_tower.", "video"),
    ("model.image_tower.vision_model.", "vision"),                # Video-LLaVA: transformers 4.x in memory
    ("model.image_tower.", "vision"),                             # transformers 5.x save_pretrained
    ("image_tower.vision_model.", "vision"),                      # LanguageBind's -hf
    ("model.video_tower.vision_model.", "video"),
    ("model.video_tower.", "video"),
    ("video_tower.vision_model.", "video"),
    ("model.vision_tower.vision_tower.vision_model.", "vision"),  # original LLaVA with the tower embedded
    ("model.vision_tower.vision_model.", "vision"),               # transformers >= 4.52, some saves
    ("model.vision_tower.", "vision"),                            # transformers >= 4.52 / 5.x
    ("vision_tower.vision_model.", "vision"),                     # llava-hf
    ("vision_tower.", "vision"),                                  # transformers 5.x save_pretrained
    ("vision_model.", "vision"),                                  # a CLIPModel / CLIPVisionModel checkpoint
    ("model.multi_modal_projector.", "hf_projector"),
    ("multi_modal_projector.", "hf_projector"),
    ("model.mm_projector.", "projector"),
    ("model.image_newline", "newline"),                            # LLaVA-NeXT: original, transformers 5.x
    ("image_newline", "newline"),                                  # llava-hf's llava-v1.6 (transformers 4.x)
    ("model.language_model.", "text"),
    ("language_model.model.", "text"),
    ("language_model.lm_head.", "lm_head"),
    ("lm_head.", "lm_head"),
    ("model.", "text"),
]
# CLIP's text half and contrastive heads, present in a full CLIPModel checkpoint.
IGNORED_PREFIXES = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")

TEXT = {
    "embed_tokens.weight": "llm.embed_tokens.weight",
    "layers.{}.self_attn.q_proj.weight": "llm.layers.{}.attn.q_proj.weight",
    "layers.{}.self_attn.k_proj.weight": "llm.layers.{}.attn.k_proj.weight",
    "layers.{}.self_attn.v_proj.weight": "llm.layers.{}.attn.v_proj.weight",
    "layers.{}.self_attn.o_proj.weight": "llm.layers.{}.attn.o_proj.weight",
    "layers.{}.self_attn.rotary_emb.inv_freq": None,  # recomputed from rope_theta
    "layers.{}.mlp.gate_proj.weight": "llm.layers.{}.mlp.gate_proj.weight",
    "layers.{}.mlp.up_proj.weight": "llm.layers.{}.mlp.up_proj.weight",
    "layers.{}.mlp.down_proj.weight": "llm.layers.{}.mlp.down_proj.weight",
    "layers.{}.input_layernorm.weight": "llm.layers.{}.attn_norm.weight",
    "layers.{}.post_attention_layernorm.weight": "llm.layers.{}.mlp_norm.weight",
    "norm.weight": "llm.norm.weight",
    "rotary_emb.inv_freq": None,
}
LM_HEAD = {"weight": "llm.lm_head.weight"}
VISION = {
    "embeddings.class_embedding": "vision.class_embedding",
    "embeddings.patch_embedding.weight": "vision.patch_embed.weight",
    "embeddings.position_embedding.weight": "vision.position_embedding",
    "embeddings.position_ids": None,  # a buffer of 0..N: positions are implicit
    "pre_layrnorm.weight": "vision.pre_norm.weight",
    "pre_layrnorm.bias": "vision.pre_norm.bias",
    "post_layernorm.weight": None,  # LLaVA reads an inner layer; the pooled output is never used
    "post_layernorm.bias": None,
    **{f"encoder.layers.{{}}.{src}.{p}": f"vision.blocks.{{}}.{dst}.{p}" for src, dst in CLIP_LAYER
       for p in ("weight", "bias")},
}
HF_PROJECTOR = {f"linear_{i}.{p}": f"projector.{j}.{p}" for i, j in ((1, 0), (2, 2)) for p in ("weight", "bias")}
PROJECTOR = {"{}.weight": "projector.{}.weight", "{}.bias": "projector.{}.bias",  # mlp2x_gelu: a Sequential
             "weight": "projector.0.weight", "bias": "projector.0.bias"}         # linear: a bare nn.Linear
VIDEO = {source: target and target.replace("vision.", "video.", 1) for source, target in VISION.items()}
VIDEO.update({  # LanguageBind_Video_merge's temporal attention (the -hf conversion drops it)
    "encoder.layers.{}.temporal_embedding": "video.blocks.{}.temporal_embedding",
    **{f"encoder.layers.{{}}.{src}.{p}": f"video.blocks.{{}}.{dst}.{p}"
       for src, dst in [("temporal_layer_norm1", "temporal_norm"),
                        *((f"temporal_attn.{x}_proj", f"temporal_attn.{x}_proj") for x in "qkv"),
                        ("temporal_attn.out_proj", "temporal_attn.o_proj")]
       for p in ("weight", "bias")}})
TABLES = {"text": TEXT, "lm_head": LM_HEAD, "vision": VISION, "video": VIDEO, "hf_projector": HF_PROJECTOR,
          "projector": PROJECTOR, "newline": {"": "image_newline"}}
FAMILY_PARTS = {"video": "video-llava", "newline": "llava-next"}   # parts only one family has


def map_key(key: str, config: LlavaConfig, default_part: str | None = None) -> str | None:
    """minifastv name for a source tensor name; None for a tensor to drop. Raises on an unknown name.
    `default_part` is the part a name without a known prefix belongs to (a bare CLIPVisionModel save)."""
    if key.startswith(IGNORED_PREFIXES):
        return None
    part, rest = next(((part, key[len(p):]) for p, part in PREFIXES if key.startswith(p)), (default_part, key))
    # Layer numbers sit between dots ("layers.3."); a leading number is a Sequential index ("0.weight").
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.)", rest)
    template = re.sub(r"(^|\.)\d+(?=\.)", r"\1{}", rest)
    table = TABLES.get(part, {})
    if template not in table or config.family != FAMILY_PARTS.get(part, config.family):
        raise ConversionError(f"unknown tensor {key!r}: not part of any known {config.family} checkpoint layout")
    target = table[template]
    if target is None:
        return None
    if part in ("vision", "video") and numbers and int(numbers[0]) >= config.vision.n_used_layers:
        return None  # CLIP blocks past the feature layer never run
    return target.format(*numbers)


# Defaults of transformers' LlamaConfig and CLIPVisionConfig, for fields a sparse config.json leaves out.
HF_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048,
                        bos_token_id=1, eos_token_id=2, pad_token_id=None, hidden_act="silu")
HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          image_size=224, patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu")
# What LlavaConfig itself puts in when text_config / vision_config is absent altogether.
HF_LLAVA_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768)


def text_config_from_hf(t: dict) -> TextConfig:
    t = {**HF_TEXT_DEFAULTS, **{k: v for k, v in t.items() if v is not None or k == "pad_token_id"}}
    if t.get("sliding_window") is not None and t["sliding_window"] < t["max_position_embeddings"]:
        raise ConversionError(f"sliding_window {t['sliding_window']} is not supported (attention sees the whole "
                              "context; Mistral-7B-Instruct-v0.2, LLaVA-NeXT's, has none)")
    if t["hidden_act"] != "silu":
        raise ConversionError(f"text hidden_act {t['hidden_act']!r} is not supported (LLaMA uses silu)")
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if t.get(flag):
            raise ConversionError(f"text config sets {flag}, which LLaMA-based LLaVA does not use")
    if (t.get("rope_scaling") or {}).get("rope_type", "default") != "default":
        raise ConversionError(f"rope scaling {t['rope_scaling']!r} is not supported")
    rope = t.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"rope_parameters {rope!r} are not supported (plain RoPE only)")
    n_heads = t["num_attention_heads"]
    if t.get("head_dim") not in (None, t["hidden_size"] // n_heads):
        raise ConversionError(f"head_dim {t['head_dim']} differs from hidden_size / num_attention_heads")
    eos = t["eos_token_id"][0] if isinstance(t["eos_token_id"], list) else t["eos_token_id"]
    return TextConfig(
        vocab_size=t["vocab_size"], dim=t["hidden_size"], n_layers=t["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=t.get("num_key_value_heads") or n_heads, intermediate_size=t["intermediate_size"],
        norm_eps=float(t["rms_norm_eps"]), rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
        max_seq_len=t["max_position_embeddings"], bos_token_id=t["bos_token_id"], eos_token_id=eos,
        pad_token_id=0 if t["pad_token_id"] is None else t["pad_token_id"])


def vision_config_from_hf(v: dict, feature_layer: int) -> VisionConfig:
    v = {**HF_VISION_DEFAULTS, **{k: val for k, val in v.items() if val is not None}}
    if v["hidden_act"] != "quick_gelu":
        raise ConversionError(f"vision hidden_act {v['hidden_act']!r} is not supported (CLIP uses quick_gelu)")
    return VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], dim=v["hidden_size"],
                        n_layers=v["num_hidden_layers"], n_heads=v["num_attention_heads"],
                        intermediate_size=v["intermediate_size"], norm_eps=float(v["layer_norm_eps"]),
                        feature_layer=feature_layer)


def config_from_hf(c: dict) -> LlavaConfig:
    """LlavaConfig from a transformers LlavaForConditionalGeneration config.json (llava-hf, 4.x or 5.x), a
    VideoLlavaConfig from a VideoLlavaForConditionalGeneration one (LanguageBind's -hf, or transformers' save), or
    a LlavaNextConfig from a LlavaNextForConditionalGeneration one (llava-hf's llava-v1.6)."""
    if c.get("vision_feature_select_strategy", "default") != "default":
        raise ConversionError(f"vision_feature_select_strategy {c['vision_feature_select_strategy']!r} is not "
                              "supported: LLaVA-1.5 drops the class token ('default')")
    layer = c.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConversionError(f"vision_feature_layer {layer!r}: only a single layer is supported")
    if c.get("projector_hidden_act", "gelu") != "gelu":
        raise ConversionError(f"projector_hidden_act {c['projector_hidden_act']!r} is not supported (exact gelu)")
    if c.get("multimodal_projector_bias", True) is not True:
        raise ConversionError("multimodal_projector_bias false is not supported")
    kind = (c.get("text_config") or {}).get("model_type", "llama")
    if kind not in ("llama", "mistral"):   # Mistral (LLaVA-NeXT's) is LLaMA-shaped
        raise ConversionError(f"text model_type {kind!r} is not supported (llama or mistral)")
    vision = c.get("vision_config")
    config = LlavaConfig(
        vision=vision_config_from_hf(HF_LLAVA_VISION if vision is None else vision, layer),
        text=text_config_from_hf(c.get("text_config") or {}),
        projector_type="mlp2x_gelu",
        image_token_id=c.get("image_token_id", c.get("image_token_index", 32000)),
    )
    architectures = c.get("architectures") or []
    if c.get("model_type") == "llava_next" or "LlavaNextForConditionalGeneration" in architectures:
        return next_config(config, c.get("image_grid_pinpoints", PINPOINTS), kind)
    video = c.get("model_type") == "video_llava" or "VideoLlavaForConditionalGeneration" in architectures
    if not video:
        return config
    per_frame = config.vision.n_patches + 1                        # a frame keeps its class token
    length = c.get("video_seq_length", 8 * per_frame)
    if length % per_frame:
        raise ConversionError(f"video_seq_length {length} is not a whole number of frames of {per_frame} tokens")
    return VideoLlavaConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
                            video_token_id=c.get("video_token_id", c.get("video_token_index", 32001)),
                            n_frames=length // per_frame, system="")  # transformers' prompt: "USER: <video>\n..."


def next_config(config: LlavaConfig, pinpoints, decoder: str) -> LlavaNextConfig:
    """LLaVA-NeXT's config: `config`'s fields, the canvases, and the conversation template its releases pair with
    the decoder: Mistral-7B-Instruct's [INST] (no system line); Nous-Hermes-2-Yi-34B's ChatML (told by Yi's
    64,000-word vocabulary); Vicuna's vicuna_v1. The template is a config.json field, to be edited if need be."""
    template, system = (("mistral_instruct", "") if decoder == "mistral" else
                        ("chatml", "Answer the questions.") if config.text.vocab_size >= 64000 else ("vicuna_v1", None))
    return LlavaNextConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
                           pinpoints=pinpoints, template=template, system=system)


# ---------------------------------------------------------------------------------------------------------
# Whole checkpoints on disk.

CLIP_L_336 = "clip-vit-large-patch14-336"


def config_from_original(c: dict, vision: VisionConfig | None) -> LlavaConfig:
    """LlavaConfig from the original LLaVA config.json (LlavaLlamaForCausalLM, with mm_* fields)."""
    if c.get("mm_vision_select_feature", "patch") != "patch":
        raise ConversionError(f"mm_vision_select_feature {c['mm_vision_select_feature']!r} is not supported "
                              "(LLaVA-1.5 uses 'patch': the class token is dropped)")
    projector = c.get("mm_projector_type", "linear")
    if projector not in ("mlp2x_gelu", "linear"):
        raise ConversionError(f"mm_projector_type {projector!r} is not supported (mlp2x_gelu or linear)")
    if vision is None:
        raise ConversionError("the checkpoint has no vision tower: pass --vision-tower DIR "
                              f"(a CLIP checkpoint such as {c.get('mm_vision_tower', 'openai/' + CLIP_L_336)})")
    if "mm_hidden_size" in c and c["mm_hidden_size"] != vision.dim:
        raise ConversionError(f"mm_hidden_size {c['mm_hidden_size']} differs from the vision tower's width {vision.dim}")
    layer = c.get("mm_vision_select_layer", -2)
    vision = VisionConfig(**{**vision.__dict__, "feature_layer": layer})
    config = LlavaConfig(vision=vision, text=text_config_from_hf(c), projector_type=projector, image_token_id=-200,
                         image_mode="pad" if c.get("image_aspect_ratio", "pad") == "pad" else "crop")
    if c.get("image_aspect_ratio") != "anyres":
        return config
    # LLaVA-NeXT (liuhaotian/llava-v1.6-*): tiles packed with a newline per row ("spatial_unpad")
    if c.get("mm_patch_merge_type", "flat") != "spatial_unpad":
        raise ConversionError(f"mm_patch_merge_type {c.get('mm_patch_merge_type', 'flat')!r} with anyres is not "
                              "supported (LLaVA-NeXT's is 'spatial_unpad')")
    # The original lists its canvases as (width, height) and tries them in that order; minifastv's are (height,
    # width), as transformers', so they are swapped here: the same canvases, tried in the original's order.
    pinpoints = [(h, w) for w, h in c.get("image_grid_pinpoints") or []]
    return next_config(config, pinpoints, "mistral" if c.get("model_type") == "llava_mistral" else "llama")


def config_from_video_original(c: dict, image_tower: Path | None, video_tower: Path | None) -> VideoLlavaConfig:
    """VideoLlavaConfig of the original Video-LLaVA (LlavaLlamaForCausalLM with mm_image_tower and mm_video_tower)
    with the towers' own configs (LanguageBind_Image, LanguageBind_Video_merge): the original's prompt layout
    (a frame placeholder per frame, joined by spaces) and its llava_v1 system line; temporal attention as the
    video tower's config says."""
    from .models.video_llava import LLAVA_V1_SYSTEM

    for flag, directory, name in (("--image-tower", image_tower, "mm_image_tower"),
                                  ("--video-tower", video_tower, "mm_video_tower")):
        if directory is None:
            raise ConversionError(f"an original Video-LLaVA checkpoint needs {flag} DIR (the {c.get(name, name)} "
                                  "directory: its config.json and weights)")
    image_cfg, video_cfg = (read_json(d / CONFIG).get("vision_config", read_json(d / CONFIG))
                            for d in (image_tower, video_tower))
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
    differ = [k for k in shape if image_cfg.get(k) != video_cfg.get(k)]
    if differ:
        raise ConversionError(f"{video_tower / CONFIG}: the video tower differs from the image tower in {differ}; "
                              "minifastv's Video-LLaVA has one tower architecture for both")
    base = config_from_original({**c, "mm_vision_tower": str(image_tower)},
                                vision_config_from_hf(image_cfg, feature_layer=-2))
    return VideoLlavaConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                            video_token_id=-201, frame_token_id=-202, n_frames=int(video_cfg.get("num_frames", 8)),
                            temporal=bool(video_cfg.get("add_time_attn", False)), system=LLAVA_V1_SYSTEM)


def clip_vision_config(directory: Path) -> VisionConfig:
    """Vision config from a CLIPModel (nested vision_config) or CLIPVisionModel (flat) config.json."""
    c = read_json(directory / CONFIG)
    return vision_config_from_hf(c.get("vision_config", c), feature_layer=-2)


def is_video_original(c: dict) -> bool:
    return not is_hf_layout(c) and ("mm_video_tower" in c or "mm_image_tower" in c)


def is_hf_layout(c: dict) -> bool:
    return "text_config" in c or bool({"LlavaForConditionalGeneration", "VideoLlavaForConditionalGeneration",
                                       "LlavaNextForConditionalGeneration"} & set(c.get("architectures") or []))


def files_or_none(directory: Path) -> list[Path] | None:
    try:
        return weight_files(directory, (SAFETENSORS, PICKLED))
    except FileNotFoundError:
        return None


def source_dtype(c: dict) -> torch.dtype:
    name = c.get("dtype") or c.get("torch_dtype") or (c.get("text_config") or {}).get("dtype") \
        or (c.get("text_config") or {}).get("torch_dtype") or "float32"
    return parse_dtype(name)


def convert(src, out, *, vision_tower=None, image_tower=None, video_tower=None, dtype=None, tokenizer=None,
            force=False, quant: QuantConfig | None = None, max_shard_bytes: int = 2 << 30, clip_text=None,
            log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Convert a LLaVA, Video-LLaVA, LLaVA-NeXT (original, -hf, or transformers 5.x names) or Qwen-VL (hub layout,
    convert_qwen.py; its qwen.tiktoken becomes the tokenizer.json) checkpoint directory into a minifastv checkpoint
    at `out`, streaming tensor by tensor, optionally with the decoder's linears quantized
    (`quant`; `dtype` is then the float parts' dtype). An original Video-LLaVA takes its towers from
    `image_tower` and `video_tower` (LanguageBind_Image, LanguageBind_Video_merge). `clip_text`: a full CLIP
    checkpoint whose text tower and projections join the model (convert_clip.py; CDPruner reads them). Every
    tensor is checked for NaN and infinity on the way. Nothing appears at `out` unless conversion succeeds."""
    src, out = source_dir(Path(src), "source checkpoint"), Path(out)
    source = read_json(src / CONFIG)
    if "text" in source and "vision" in source:
        raise ConversionError(f"{src}: already a minifastv checkpoint (its config.json has 'text' and 'vision'); "
                              f"use it as it is (--model {src}), or `python -m minifastv quantize` to quantize it")
    tower = Path(vision_tower) if vision_tower is not None else None
    named = source.get("mm_vision_tower")
    if tower is None and not is_hf_layout(source) and isinstance(named, str) and named:
        local = next((d for d in (Path(named), src / named) if (d / CONFIG).is_file()), None)
        if local is not None:  # the original config names a CLIP directory that is here: use it
            tower = local
            log(f"vision tower: {tower} (mm_vision_tower in {src / CONFIG}; --vision-tower overrides it)")
    towers = {"vision": image_tower, "video": video_tower}
    towers = {part: source_dir(Path(d), f"--{'image' if part == 'vision' else 'video'}-tower directory")
              for part, d in towers.items() if d is not None}
    qwen = is_qwen(source)
    if qwen and (towers or vision_tower is not None):
        raise ConversionError(f"{src / CONFIG}: a Qwen-VL checkpoint carries its own vision tower: drop "
                              "--vision-tower, --image-tower and --video-tower")
    if towers and not is_video_original(source):
        raise ConversionError(f"{src / CONFIG}: --image-tower and --video-tower are for an original Video-LLaVA "
                              "checkpoint (mm_image_tower, mm_video_tower); this one is not")
    try:
        if qwen:
            config = qwen_config(source)
        elif is_video_original(source):
            config = config_from_video_original(source, towers.get("vision"), towers.get("video"))
        elif is_hf_layout(source):
            config = config_from_hf(source)
        else:
            vision = clip_vision_config(tower) if tower is not None else None
            if vision is None and CLIP_L_336 in str(source.get("mm_vision_tower", "")):
                vision = VisionConfig()  # CLIP ViT-L/14-336, embedded in the checkpoint or reported missing below
            config = config_from_original(source, vision)
    except (ConfigError, ValueError, KeyError) as e:
        raise ConversionError(f"{src / CONFIG}: {e if not isinstance(e, KeyError) else f'no field {e}'}") from None
    clip_dir = None if clip_text is None else source_dir(Path(clip_text), "--clip-text directory")
    if clip_dir is not None:
        if qwen:
            raise ConversionError(f"{src / CONFIG}: a Qwen-VL checkpoint: its vision tower is not CLIP ViT-L, so "
                                  "--clip-text does not apply")
        config = dataclasses.replace(config, clip_text=clip_text_config(clip_dir, config))
        clip_tokenizer = clip_tokenizer_file(clip_dir)
    output_config = config if quant is None else dataclasses.replace(config, quant=quant)
    dtype = parse_dtype(dtype) or source_dtype(source)
    tokenizer_file = Path(tokenizer) if tokenizer is not None else src / (TIKTOKEN if qwen else TOKENIZER)
    if not tokenizer_file.is_file():
        hint = " (only a SentencePiece tokenizer.model is there)" if (src / "tokenizer.model").is_file() else ""
        wanted = "Qwen-VL-Chat's qwen.tiktoken" if qwen else \
            "llava-hf's tokenizer.json (llava-hf/llava-1.5-7b-hf) serves both LLaVA-1.5 families"
        raise FileNotFoundError(f"{tokenizer_file}: not found{hint}. Pass --tokenizer FILE: {wanted}")

    expected = {k: v.shape for k, v in empty_model(config).state_dict().items()}
    files = weight_files(src, (SAFETENSORS, PICKLED))
    tower_files = (files_or_none(tower) or []) if tower is not None else []  # a tower dir may hold only a config
    parts = {file: "vision" for file in tower_files}
    for part, directory in towers.items():  # LanguageBind's towers: a whole LanguageBind model each
        parts.update({file: part for file in weight_files(directory, (SAFETENSORS, PICKLED))})
    files += [file for file in parts if file not in files]
    clip_files = [] if clip_dir is None else weight_files(clip_dir, (SAFETENSORS, PICKLED))
    files += [file for file in clip_files if file not in files]
    with staged(out, force) as tmp:
        writer, seen = ShardWriter(tmp, max_shard_bytes), {}

        def write(target: str, tensor: torch.Tensor, key: str) -> int:
            """Check one tensor against the model's and store it (quantized if asked); 1 for the count."""
            if target not in expected:  # the temporal attention's weights, for a config without it
                raise ConversionError(f"{file}: {key!r} has no place in the model {src / CONFIG} describes "
                                      f"({target}; temporal attention: {getattr(config, 'temporal', False)})")
            if target in seen:
                raise ConversionError(f"{file}: {key!r} and {seen[target]!r} both map to {target!r}")
            if tensor.shape != expected[target]:
                raise ConversionError(f"{file}: {key} has shape {list(tensor.shape)}, but {src / CONFIG} "
                                      f"implies {list(expected[target])} for {target}")
            if tensor.is_floating_point() and not tensor.isfinite().all():
                raise ConversionError(f"{file}: {key} contains NaN or infinite values")
            seen[target] = key
            for name, stored in quantized_tensors(target, tensor, quant, dtype):
                writer.add(name, stored)
            return 1

        for i, file in enumerate(files, 1):
            start, count = time.perf_counter(), 0
            for key, tensor in read_tensors(file):
                try:
                    name = f"video_tower.{key}" if parts.get(file) == "video" and key.startswith("vision_model.") \
                        else key  # the video tower's vision_model is minifastv's video tower
                    if file in clip_files and file not in parts:   # a CLIPModel save: its text half only
                        pairs = []
                    elif qwen:
                        pairs = qwen_tensors(key, tensor, config)
                    else:
                        pairs = [(map_key(name, config, parts.get(file)), tensor)]
                    if pairs is None:
                        raise ConversionError(f"unknown tensor {key!r}: not part of any known qwen-vl checkpoint "
                                              "layout")
                    if file in clip_files:   # the same CLIP may be the vision tower too (--vision-tower)
                        pairs.append((clip_text_target(key), tensor))
                except (ConversionError, ClipTextError) as e:
                    raise ConversionError(f"{file}: {e}") from None
                for target, value in pairs:
                    if target is not None:
                        count += write(target, value, key)
            log(f"[{i}/{len(files)}] {file.name}: {count} tensors in {time.perf_counter() - start:.1f}s")
        missing = sorted(set(expected) - set(seen))
        if missing:
            raise ConversionError(f"{src}: no source tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                                  + ("; the vision tower is missing: pass --vision-tower DIR"
                                     if any(m.startswith("vision.") for m in missing) and tower is None
                                     and not towers else ""))
        writer.close()
        (tmp / CONFIG).write_text(json.dumps(output_config.to_dict(), indent=2) + "\n")
        if tokenizer_file.name.endswith(".tiktoken"):   # Qwen-VL's: rewritten as a tokenizer.json
            qwen_tokenizer(tokenizer_file).save(str(tmp / TOKENIZER))
        else:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
        if clip_dir is not None:
            shutil.copyfile(clip_tokenizer, tmp / CLIP_TOKENIZER)
    quantized = "" if quant is None else f", decoder linears {quant.method}"
    log(f"wrote {out} ({len(seen)} tensors, {str(dtype).removeprefix('torch.')}{quantized})")
    return out
