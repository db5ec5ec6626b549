"""Qwen-VL's vision side (minifastv/models/qwen_visual.py) against references no one here wrote: the encoder's
blocks against open_clip's (a test-only dependency; its VisionTransformer always adds a class token, which Qwen's
has not, so its own convolution, ln_pre and Transformer are run in Qwen's order), the resampler's attention against
torch.nn.MultiheadAttention run as Qwen's Resampler runs it, the sin-cos table against open_clip's MAE function."""

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from minifastv.config import VisionConfig
from minifastv.models.qwen_visual import QwenVisionTower, Resampler, resized, sincos_2d


def randomise(module: nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.1) + (1 if "norm" in name else 0))


def test_sincos_table_equals_open_clips(open_clip_modules):
    _, pos_embed = open_clip_modules
    for dim, grid in ((256, 4), (4096, 16)):
        want = torch.from_numpy(pos_embed.get_2d_sincos_pos_embed(dim, grid)).float()
        torch.testing.assert_close(sincos_2d(dim, grid), want, atol=2e-6, rtol=0)


def test_encoder_equals_open_clips_blocks(open_clip_modules):
    transformer, _ = open_clip_modules
    cfg = VisionConfig(image_size=56, patch_size=14, dim=64, n_layers=2, n_heads=4, intermediate_size=256,
                       norm_eps=1e-6, feature_layer=-1)
    ours = QwenVisionTower(cfg, n_positions=9)      # a 3 x 3 table resized to the 4 x 4 patch grid
    randomise(ours, 0)
    ref = transformer.VisionTransformer(image_size=56, patch_size=14, width=64, layers=2, heads=4, mlp_ratio=4.0,
                                        act_layer=nn.GELU, norm_layer=partial(transformer.LayerNorm, eps=1e-6))
    state = {"conv1.weight": ours.patch_embed.weight, "ln_pre.weight": ours.pre_norm.weight,
             "ln_pre.bias": ours.pre_norm.bias}
    for i, b in enumerate(ours.blocks):
        a, r = b.attn, f"transformer.resblocks.{i}."
        state |= {r + "attn.in_proj_weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                  r + "attn.in_proj_bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                  r + "attn.out_proj.weight": a.o_proj.weight, r + "attn.out_proj.bias": a.o_proj.bias,
                  **{r + f"{x}.{p}": getattr(getattr(b, y), p) for x, y in (("ln_1", "norm1"), ("ln_2", "norm2"),
                                                                          ("mlp.c_fc", "fc1"), ("mlp.c_proj", "fc2"))
                     for p in ("weight", "bias")}}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and sorted(missing) == ["class_embedding", "ln_post.bias", "ln_post.weight",
                                                  "positional_embedding", "proj"]     # never run here
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = ref.conv1(pixels).flatten(2).transpose(1, 2)                          # N, 16, 64, row-major
        table = F.interpolate(ours.position_embedding.reshape(1, 3, 3, 64).permute(0, 3, 1, 2), size=(4, 4),
                              mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(16, 64)
        want = ref.transformer(ref.ln_pre(x + table))
        got, _ = ours(pixels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_resampler_equals_multihead_attention_as_qwen_runs_it():
    dim, width, n_queries, patches = 256, 48, 16, 64           # 2 heads of 128; a 4 x 4 table keys an 8 x 8 grid
    ours = Resampler(width, dim, n_queries)
    randomise(ours, 2)
    mha = nn.MultiheadAttention(dim, dim // 128)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        mha.out_proj.weight.copy_(ours.o_proj.weight), mha.out_proj.bias.copy_(ours.o_proj.bias)
    features = torch.randn(3, patches, width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pos = ours.pos_embed
        key_pos = F.interpolate(pos.reshape(1, 4, 4, dim).permute(0, 3, 1, 2), size=(8, 8), mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)
        x = ours.kv_norm(ours.kv_proj(features)).permute(1, 0, 2)             # sequence first, as Qwen's
        q = ours.q_norm(ours.query).unsqueeze(1).repeat(1, len(features), 1)
        out = mha(q + pos.unsqueeze(1), x + key_pos.unsqueeze(1), x)[0].permute(1, 0, 2)
        want = ours.post_norm(out) @ ours.proj
        got = ours(features)
    assert got.shape == (3, n_queries, dim)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_resized_keeps_a_table_of_the_right_size_and_refuses_nothing_else():
    table = torch.randn(256, 8)
    assert resized(table, 256) is table and resized(table, 1024).shape == (1024, 8)
    assert math.isclose(float(resized(torch.ones(16, 2), 64).mean()), 1.0, rel_tol=1e-6)   # bicubic keeps a constant
