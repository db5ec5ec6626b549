"""Qwen-VL's hub layout through the production converter (minifastv/convert_qwen.py), checked against references
built from the SAME hub tensors by this test's own reading of Qwen's code: the decoder as transformers' Qwen2
(c_attn's thirds as q, k, v with their bias, w2 the gate, w1 the up projection), the vision blocks as open_clip's
(each block's in_proj de-interleaved head by head into nn.MultiheadAttention's stacked q, k, v), the resampler's
attention as torch.nn.MultiheadAttention holding its in_proj as it is, and the tokenizer as tiktoken."""

import base64
import json
import unicodedata
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tiktoken._educational import bpe_train
from torch import nn

import minifastv
from minifastv.convert import ConversionError, convert
from minifastv.tiktoken_bpe import QWEN_PATTERN, qwen_special

WIDTH, LAYERS, HEADS, MLP, SIZE, PATCH = 64, 2, 4, 256, 56, 14        # vision: 4 x 4 patches
DIM, TEXT_LAYERS, TEXT_HEADS, FF = 256, 2, 4, 2 * 160                 # decoder: heads of 64; resampler: 2 of 128
QUERIES, POSITIONS = 4, 256                                           # 2 x 2 queries; Qwen's 16 x 16 table
TRAIN = "the cat sat on the mat. 图片里有什么？ def f(x): return x ** 2  # ok 😀 " * 8


def hub_config(n_ranks: int) -> dict:
    start = n_ranks + 214
    return {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": DIM,
            "intermediate_size": FF, "num_hidden_layers": TEXT_LAYERS, "num_attention_heads": TEXT_HEADS,
            "kv_channels": DIM // TEXT_HEADS, "layer_norm_epsilon": 1e-6, "max_position_embeddings": 8192,
            "no_bias": True, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 2048, "use_dynamic_ntk": True,
            "use_logn_attn": True, "vocab_size": start + 8, "tie_word_embeddings": False,
            "visual": {"heads": HEADS, "image_size": SIZE, "image_start_id": start, "layers": LAYERS,
                       "mlp_ratio": MLP / WIDTH, "output_dim": DIM, "patch_size": PATCH, "width": WIDTH,
                       "n_queries": QUERIES}}


def hub_tensors(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s            
    norm = lambda n: (1 + r(n, s=0.1), r(n, s=0.1))                            
    t = {"transformer.wte.weight": r(vocab, DIM), "lm_head.weight": r(vocab, DIM), "transformer.ln_f.weight": norm(DIM)[0]}
    for i in range(TEXT_LAYERS):
        p = f"transformer.h.{i}."
        t |= {p + "ln_1.weight": norm(DIM)[0], p + "ln_2.weight": norm(DIM)[0], p + "attn.c_attn.weight": r(3 * DIM, DIM),
              p + "attn.c_attn.bias": r(3 * DIM), p + "attn.c_proj.weight": r(DIM, DIM),
              p + "mlp.w1.weight": r(FF // 2, DIM), p + "mlp.w2.weight": r(FF // 2, DIM),
              p + "mlp.c_proj.weight": r(DIM, FF // 2)}
    v = "transformer.visual."
    t |= {v + "conv1.weight": r(WIDTH, 3, PATCH, PATCH), v + "positional_embedding": r(POSITIONS, WIDTH),
          v + "ln_pre.weight": norm(WIDTH)[0], v + "ln_pre.bias": norm(WIDTH)[1]}
    for i in range(LAYERS):
        p = f"{v}transformer.resblocks.{i}."
        t |= {p + "attn.in_proj.weight": r(3 * WIDTH, WIDTH), p + "attn.in_proj.bias": r(3 * WIDTH),
              p + "attn.out_proj.weight": r(WIDTH, WIDTH), p + "attn.out_proj.bias": r(WIDTH),
              p + "mlp.c_fc.weight": r(MLP, WIDTH), p + "mlp.c_fc.bias": r(MLP),
              p + "mlp.c_proj.weight": r(WIDTH, MLP), p + "mlp.c_proj.bias": r(WIDTH)}
        for n in ("ln_1", "ln_2"):
            t[p + n + ".weight"], t[p + n + ".bias"] = norm(WIDTH)
    a = v + "attn_pool."
    t |= {a + "query": r(QUERIES, DIM), a + "pos_embed": r(QUERIES, DIM), a + "kv_proj.weight": r(DIM, WIDTH),
          a + "attn.in_proj_weight": r(3 * DIM, DIM), a + "attn.in_proj_bias": r(3 * DIM),
          a + "attn.out_proj.weight": r(DIM, DIM), a + "attn.out_proj.bias": r(DIM), v + "proj": r(DIM, DIM)}
    for n in ("attn_pool.ln_q", "attn_pool.ln_kv", "ln_post"):
        t[v + n + ".weight"], t[v + n + ".bias"] = norm(DIM)
    return t


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    src = tmp_path_factory.mktemp("hub")
    ranks = bpe_train(TRAIN, 300, QWEN_PATTERN, visualise=None)
    (src / "qwen.tiktoken").write_bytes(b"".join(base64.b64encode(k) + b" %d\n" % v for k, v in ranks.items()))
    config = hub_config(len(ranks))
    (src / "config.json").write_text(json.dumps(config))
    tensors = hub_tensors(config["vocab_size"])
    save_file(tensors, str(src / "model.safetensors"))
    out = convert(src, tmp_path_factory.mktemp("conv") / "out", dtype="float32", log=lambda _: None)
    return src, config, tensors, ranks, minifastv.load(out), out


def test_the_config_reads_qwens(hub):
    _, _, _, ranks, model, _ = hub
    c = model.config
    assert c.family == "qwen-vl" and c.image_mode == "squash" and (c.context, c.logn, c.dynamic_ntk) == (2048, True, True)
    assert (c.image_start_id, c.image_end_id, c.image_token_id) == (len(ranks) + 214, len(ranks) + 215, len(ranks) + 216)
    assert (c.text.eos_token_id, c.text.intermediate_size, c.vision.intermediate_size) == (len(ranks) + 2, FF // 2, MLP)
    assert c.n_queries == QUERIES and c.vision.n_used_layers == LAYERS


def test_the_decoder_equals_qwen2_holding_the_hub_tensors(hub):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, config, t, _, model, _ = hub
    hf = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=config["vocab_size"], hidden_size=DIM, intermediate_size=FF // 2, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_HEADS, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})).eval()
    state = {"model.embed_tokens.weight": t["transformer.wte.weight"], "model.norm.weight": t["transformer.ln_f.weight"],
             "lm_head.weight": t["lm_head.weight"]}
    for i in range(TEXT_LAYERS):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        for name, w, b in zip("qkv", t[p + "attn.c_attn.weight"].chunk(3), t[p + "attn.c_attn.bias"].chunk(3)):
            state[q + f"self_attn.{name}_proj.weight"], state[q + f"self_attn.{name}_proj.bias"] = w, b
        state |= {q + "self_attn.o_proj.weight": t[p + "attn.c_proj.weight"],
                  q + "mlp.gate_proj.weight": t[p + "mlp.w2.weight"], q + "mlp.up_proj.weight": t[p + "mlp.w1.weight"],
                  q + "mlp.down_proj.weight": t[p + "mlp.c_proj.weight"], q + "input_layernorm.weight": t[p + "ln_1.weight"],
                  q + "post_attention_layernorm.weight": t[p + "ln_2.weight"]}
    hf.load_state_dict(state, strict=True)
    ids = torch.randint(0, config["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.llm.lm_head(model.llm(model.llm.sequence(model.embed_tokens(ids), torch.arange(40)[None],
                                                              torch.ones(1, 40, dtype=torch.bool))).hidden)
        torch.testing.assert_close(ours, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_the_vision_blocks_equal_open_clips_with_in_proj_de_interleaved(hub, open_clip_modules):
    transformer, _ = open_clip_modules
    _, _, t, _, model, _ = hub
    ref = transformer.VisionTransformer(image_size=SIZE, patch_size=PATCH, width=WIDTH, layers=LAYERS, heads=HEADS,
                                        mlp_ratio=MLP / WIDTH, act_layer=nn.GELU,
                                        norm_layer=partial(transformer.LayerNorm, eps=1e-6)).eval()
    v = "transformer.visual."
    state = {"conv1.weight": t[v + "conv1.weight"], "ln_pre.weight": t[v + "ln_pre.weight"],
             "ln_pre.bias": t[v + "ln_pre.bias"]}
    d = WIDTH // HEADS
    for i in range(LAYERS):
        p, q = f"{v}transformer.resblocks.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            fused = t[p + f"attn.in_proj.{part}"]                 # rows: head 0's q, k, v, head 1's q, k, v, ...
            rows = [[fused[(h * 3 + j) * d:(h * 3 + j + 1) * d] for h in range(HEADS)] for j in range(3)]
            state[q + f"attn.in_proj_{part}"] = torch.cat([torch.cat(r) for r in rows])   # all q, all k, all v
            for src in ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj"):
                state[q + f"{src}.{part}"] = t[p + f"{src}.{part}"]
    ref.load_state_dict(state, strict=False)
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    table = F.interpolate(t[v + "positional_embedding"].reshape(1, 16, 16, WIDTH).permute(0, 3, 1, 2), size=(4, 4),
                          mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(16, WIDTH)
    with torch.no_grad():
        want = ref.transformer(ref.ln_pre(ref.conv1(pixels).flatten(2).transpose(1, 2) + table))
        torch.testing.assert_close(model.vision(pixels)[0], want, atol=1e-5, rtol=1e-5)


def test_the_resampler_equals_multihead_attention_holding_the_hub_in_proj(hub):
    _, _, t, _, model, _ = hub
    a = "transformer.visual.attn_pool."
    mha = nn.MultiheadAttention(DIM, DIM // 128)
    mha.load_state_dict({"in_proj_weight": t[a + "attn.in_proj_weight"], "in_proj_bias": t[a + "attn.in_proj_bias"],
                         "out_proj.weight": t[a + "attn.out_proj.weight"], "out_proj.bias": t[a + "attn.out_proj.bias"]})
    ln = lambda x, n: F.layer_norm(x, (DIM,), t[a + n + ".weight"], t[a + n + ".bias"], 1e-6) 
    features = torch.randn(2, 16, WIDTH, generator=torch.Generator().manual_seed(2))
    pos = t[a + "pos_embed"]
    key_pos = F.interpolate(pos.reshape(1, 2, 2, DIM).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                            align_corners=False).permute(0, 2, 3, 1).reshape(16, DIM)
    with torch.no_grad():
        x = ln(features @ t[a + "kv_proj.weight"].T, "ln_kv").permute(1, 0, 2)
        q = ln(t[a + "query"], "ln_q").unsqueeze(1).repeat(1, 2, 1)
        out = mha(q + pos.unsqueeze(1), x + key_pos.unsqueeze(1), x)[0].permute(1, 0, 2)
        post = "transformer.visual.ln_post."
        want = F.layer_norm(out, (DIM,), t[post + "weight"], t[post + "bias"], 1e-6) @ t["transformer.visual.proj"]
        torch.testing.assert_close(model.projector(features), want, atol=1e-4, rtol=1e-4)


def test_the_tokenizer_equals_tiktoken(hub):
    import tiktoken

    _, _, _, ranks, _, out = hub
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tiktoken.Encoding("q", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=qwen_special(len(ranks)))
    text = "<|im_start|>user\nPicture 1: <img>cat.png</img>\n图片里有什么？ the mat 😀<|im_end|>\n"
    assert tok.encode(text, add_special_tokens=False).ids == enc.encode(unicodedata.normalize("NFC", text),
                                                                        allowed_special="all")


def test_quantized_conversion_and_the_refusals(hub, tmp_path):
    from minifastv.config import QuantConfig

    src, config, t, *_ = hub
    q = minifastv.load(convert(src, tmp_path / "int8", quant=QuantConfig("int8"), log=lambda _: None), dtype="float32")
    attn, mlp, p = q.llm.layers[1].attn, q.llm.layers[1].mlp, "transformer.h.1."
    for linear, want in [(attn.k_proj, t[p + "attn.c_attn.weight"].chunk(3)[1]), (mlp.gate_proj, t[p + "mlp.w2.weight"]),
                         (mlp.up_proj, t[p + "mlp.w1.weight"])]:      # each weight rounded to its row's int8 grid
        assert ((linear.dequantize() - want).abs() <= linear.scale.float()[:, None] / 2 + 1e-6).all()
    torch.testing.assert_close(attn.k_proj.bias, t[p + "attn.c_attn.bias"].chunk(3)[1])    # the bias stays float
    for change, message in [({"quantization_config": {"quant_method": "gptq", "bits": 4}},
                             "gptq-quantized Qwen-VL .* Download the float checkpoint \\(Qwen/Qwen-VL-Chat\\)"),
                            ({"rotary_pct": 0.5}, "rotary_pct 0.5"), ({"visual": None}, "visual")]:
        bad = tmp_path / f"bad{len(message)}"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({k: v for k, v in {**config, **change}.items() if v is not None}))
        (bad / "qwen.tiktoken").write_bytes((src / "qwen.tiktoken").read_bytes())
        save_file({"x": torch.zeros(1)}, str(bad / "model.safetensors"))
        with pytest.raises(ConversionError, match=message):
            convert(bad, tmp_path / "never", log=lambda _: None)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text(json.dumps(config))
    (extra / "qwen.tiktoken").write_bytes((src / "qwen.tiktoken").read_bytes())
    save_file({**t, "transformer.visual.mystery": torch.zeros(2)}, str(extra / "model.safetensors"))
    with pytest.raises(ConversionError, match="unknown tensor 'transformer.visual.mystery'"):
        convert(extra, tmp_path / "never", log=lambda _: None)
    (extra / "qwen.tiktoken").unlink()
    with pytest.raises(FileNotFoundError, match="qwen.tiktoken: not found. Pass --tokenizer FILE: Qwen-VL-Chat's"):
        convert(extra, tmp_path / "never", log=lambda _: None)
    assert not (tmp_path / "never").exists()


def test_the_chat_prompt_is_qwens_make_context(hub):
    """Qwen-VL-Chat's first turn as its qwen_generation_utils.make_context builds it with tiktoken (role and content
    encoded apart, the image as 'Picture 1: <img>path</img>' whose content Qwen turns into 256 slots), with the
    image's content replaced by the one placeholder here; no BOS. A later turn follows the answer's <|im_end|>."""
    import tiktoken

    from minifastv.checkpoint import load_tokenizer

    _, _, _, ranks, model, out = hub
    special = qwen_special(len(ranks))
    enc = tiktoken.Encoding("q", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    nl, start, end = enc.encode("\n"), [special["<|im_start|>"]], [special["<|im_end|>"]]
    role = lambda name, content: enc.encode(name) + nl + content
    query = (enc.encode("Picture 1: ") + [special["<img>"], model.config.image_token_id, special["</img>"]]
             + enc.encode("\nWhat is on the mat?"))
    want = (start + role("system", enc.encode("You are a helpful assistant.")) + end + nl
            + start + role("user", query) + end + nl + start + enc.encode("assistant") + nl)
    tok = load_tokenizer(out)
    assert tok.first_turn("What is on the mat?", 1, model.config.system) == want
    later = nl + start + role("user", enc.encode("And now?")) + end + nl + start + enc.encode("assistant") + nl
    assert tok.encode_turn("And now?") == later and tok.bos_token_id is None


# Qwen/Qwen-VL-Chat-Int4's published config.json (x1ngzai/Qwen-VL-Chat-Int4), as it is; the float Qwen-VL-Chat's is
# the same without quantization_config.
PUBLISHED = {
    "architectures": ["QWenLMHeadModel"], "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0,
    "fp16": True, "fp32": False, "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 22016,
    "kv_channels": 128, "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "model_type": "qwen",
    "no_bias": True, "num_attention_heads": 32, "num_hidden_layers": 32, "onnx_safe": None,
    "quantization_config": {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False,
                            "static_groups": False, "sym": True, "true_sequential": True,
                            "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq"},
    "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 2048,
    "tie_word_embeddings": False, "tokenizer_type": "QWenTokenizer", "torch_dtype": "float16",
    "transformers_version": "4.32.0", "use_cache": True, "use_dynamic_ntk": True, "use_flash_attn": "auto",
    "use_logn_attn": True, "vocab_size": 151936,
    "visual": {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48, "mlp_ratio": 4.9231,
               "output_dim": 4096, "patch_size": 14, "width": 1664}}


def test_the_published_config_reads_as_the_qwen_vl_chat_preset_and_gptq_is_refused():
    from minifastv.convert_qwen import qwen_config
    from minifastv.models.qwen_vl import QWEN_VL_CHAT

    float_config = {k: v for k, v in PUBLISHED.items() if k != "quantization_config"}
    assert qwen_config(float_config) == QWEN_VL_CHAT
    assert QWEN_VL_CHAT.vision.intermediate_size == 8192 and QWEN_VL_CHAT.text.intermediate_size == 11008
    with pytest.raises(ValueError, match="gptq-quantized Qwen-VL"):
        qwen_config(PUBLISHED)
