"""Qwen-VL's hub layout (Qwen/Qwen-VL-Chat: modeling_qwen.py, visual.py; model_type "qwen") to minifastv's.

Most tensors are renamed by the tables below. Three are split: the decoder's fused `c_attn` (q, k, v one after
another), the resampler's `in_proj_weight` (the same, nn.MultiheadAttention's layout) and each vision block's
`in_proj`, which Qwen lays out head by head: its rows are q, k, v of head 0, then q, k, v of head 1, and so on.
The MLP's `w2` is the gate and `w1` the up projection (modeling_qwen.py: c_proj(w1(x) * silu(w2(x)))). The
tokenizer is qwen.tiktoken, rewritten as a tokenizer.json (tiktoken_bpe.py).
"""

from __future__ import annotations

import re

import torch

from .config import TextConfig, VisionConfig
from .models.qwen_vl import QwenVLConfig
from .tiktoken_bpe import QWEN_PATTERN, qwen_special, read_ranks, tokenizer_from_ranks

TIKTOKEN = "qwen.tiktoken"
DECODER = {
    "transformer.wte.weight": "llm.embed_tokens.weight",
    "transformer.ln_f.weight": "llm.norm.weight",
    "lm_head.weight": "llm.lm_head.weight",
    "transformer.h.{}.ln_1.weight": "llm.layers.{}.attn_norm.weight",
    "transformer.h.{}.ln_2.weight": "llm.layers.{}.mlp_norm.weight",
    "transformer.h.{}.attn.c_proj.weight": "llm.layers.{}.attn.o_proj.weight",
    "transformer.h.{}.mlp.w1.weight": "llm.layers.{}.mlp.up_proj.weight",
    "transformer.h.{}.mlp.w2.weight": "llm.layers.{}.mlp.gate_proj.weight",
    "transformer.h.{}.mlp.c_proj.weight": "llm.layers.{}.mlp.down_proj.weight",
    "transformer.h.{}.attn.rotary_emb.inv_freq": None,        # recomputed
    "transformer.rotary_emb.inv_freq": None,
}
VISUAL = {
    "conv1.weight": "vision.patch_embed.weight",
    "positional_embedding": "vision.position_embedding",
    **{f"ln_pre.{p}": f"vision.pre_norm.{p}" for p in ("weight", "bias")},
    **{f"transformer.resblocks.{{}}.{src}.{p}": f"vision.blocks.{{}}.{dst}.{p}"
       for src, dst in (("ln_1", "norm1"), ("ln_2", "norm2"), ("attn.out_proj", "attn.o_proj"), ("mlp.c_fc", "fc1"),
                        ("mlp.c_proj", "fc2")) for p in ("weight", "bias")},
    "attn_pool.query": "projector.query",
    "attn_pool.pos_embed": "projector.pos_embed",
    "attn_pool.kv_proj.weight": "projector.kv_proj.weight",
    **{f"attn_pool.{src}.{p}": f"projector.{dst}.{p}"
       for src, dst in (("ln_q", "q_norm"), ("ln_kv", "kv_norm"), ("attn.out_proj", "o_proj")) for p in ("weight", "bias")},
    **{f"ln_post.{p}": f"projector.post_norm.{p}" for p in ("weight", "bias")},
    "proj": "projector.proj",
}
# Fused q, k, v -> the three projections: (source template, target prefix template, laid out head by head).
SPLITS = {
    "transformer.h.{}.attn.c_attn.{}": ("llm.layers.{}.attn.{}_proj.{}", False),
    "transformer.visual.transformer.resblocks.{}.attn.in_proj.{}": ("vision.blocks.{}.attn.{}_proj.{}", True),
    "transformer.visual.attn_pool.attn.in_proj_{}": ("projector.{}_proj.{}", False),
}


def is_qwen(c: dict) -> bool:
    return c.get("model_type") == "qwen" or "QWenLMHeadModel" in (c.get("architectures") or [])


def qwen_config(c: dict) -> QwenVLConfig:
    """QwenVLConfig from Qwen-VL's config.json; what this decoder does not implement is refused by name."""
    if "quantization_config" in c:
        method = c["quantization_config"].get("quant_method", "?")
        raise ValueError(f"a {method}-quantized Qwen-VL (e.g. Qwen-VL-Chat-Int4) cannot be converted: its weights "
                         "are packed for GPU kernels. Download the float checkpoint (Qwen/Qwen-VL-Chat) and use "
                         "--quantize int8 or int4")
    if c.get("rotary_pct", 1.0) != 1.0 or c.get("no_bias", True) is not True:
        raise ValueError(f"rotary_pct {c.get('rotary_pct')} / no_bias {c.get('no_bias')} are not Qwen-VL's "
                         "(1.0 / true): not supported")
    if "visual" not in c:
        raise ValueError("no 'visual' section: a text-only Qwen is not a Qwen-VL checkpoint")
    v, heads = c["visual"], c["num_attention_heads"]
    if c.get("kv_channels", c["hidden_size"] // heads) * heads != c["hidden_size"]:
        raise ValueError(f"kv_channels {c['kv_channels']} x {heads} heads differs from hidden_size {c['hidden_size']}")
    if v.get("output_dim", c["hidden_size"]) != c["hidden_size"]:
        raise ValueError(f"visual output_dim {v['output_dim']} differs from hidden_size {c['hidden_size']}")
    width = v["width"]
    vision = VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], dim=width, n_layers=v["layers"],
                          n_heads=v["heads"], intermediate_size=int(width * v["mlp_ratio"]), norm_eps=1e-6,
                          feature_layer=-1)
    start = v.get("image_start_id", 151857)
    text = TextConfig(vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
                      n_heads=heads, n_kv_heads=heads, intermediate_size=c["intermediate_size"] // 2,
                      norm_eps=float(c.get("layer_norm_epsilon", 1e-6)), rope_theta=float(c.get("rotary_emb_base", 1e4)),
                      max_seq_len=c.get("max_position_embeddings", 8192), bos_token_id=start - 214,
                      eos_token_id=start - 212, pad_token_id=start - 214)    # <|endoftext|>, <|im_end|>
    return QwenVLConfig(vision=vision, text=text, n_queries=v.get("n_queries", 256), context=c.get("seq_length", 2048),
                        logn=bool(c.get("use_logn_attn", True)), dynamic_ntk=bool(c.get("use_dynamic_ntk", True)),
                        image_start_id=start, image_end_id=start + 1, image_token_id=start + 2, image_mode="squash")


def qwen_tensors(key: str, tensor: torch.Tensor, config: QwenVLConfig) -> list[tuple[str, torch.Tensor]] | None:
    """The minifastv (name, tensor) pairs for one hub tensor ([] to drop it); None for a name no table knows."""
    numbers = re.findall(r"\.(\d+)\.", key)
    template = re.sub(r"\.\d+\.", ".{}.", key)
    for source, (target, by_head) in SPLITS.items():
        for part in ("weight", "bias"):
            if template == _fill(source, part):
                q, k, v = split_qkv(tensor, config.vision.n_heads if by_head else None)
                return [(_fill(target, x, part).format(*numbers), t) for x, t in zip("qkv", (q, k, v))]
    visual = template.startswith("transformer.visual.")
    name = VISUAL.get(template.removeprefix("transformer.visual."), ...) if visual else DECODER.get(template, ...)
    if name is ...:
        return None
    return [] if name is None else [(name.format(*numbers), tensor)]


def _fill(template: str, *last: str) -> str:
    """The template with its last `{}` slots filled by `last` and the others left as `{}`."""
    n = template.count("{}")
    return template.format(*(["{}"] * (n - len(last))), *last)


def split_qkv(fused: torch.Tensor, heads: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[3 * D, ...] -> q, k, v [D, ...] each: thirds one after another, or (heads) interleaved head by head."""
    if heads is None:
        return fused.chunk(3)
    per_head = fused.unflatten(0, (heads, 3, -1))                       # heads, (q, k, v), head dim, ...
    return tuple(per_head[:, i].flatten(0, 1) for i in range(3))


def qwen_tokenizer(path):
    """qwen.tiktoken -> a tokenizers Tokenizer with Qwen's pattern and special tokens after the ranks."""
    ranks = read_ranks(path)
    return tokenizer_from_ranks(ranks, QWEN_PATTERN, qwen_special(len(ranks)))

