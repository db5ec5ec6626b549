"""minifastv against transformers' LlavaForConditionalGeneration holding the same weight tensors (shared, not
copied): prefill latency, decode tokens/s and whether both produce the same greedy tokens. transformers is the
tests' reference, not a dependency of minifastv; this module is imported only when it is installed."""

from __future__ import annotations

import torch

from ..convert import map_key
from ..models.generate import generate
from ..models.llava import LlavaModel
from .timing import minifastv_generate, rate, spread_ms, timed


def to_transformers(model: LlavaModel, image_token: int):
    """transformers' LlavaForConditionalGeneration over the SAME tensors (no copy), with `image_token` as its
    image placeholder (transformers embeds the placeholder, so it must be a vocabulary id; one the prompt does
    not use). Tensors minifastv does not hold (the tower's last block and post-LayerNorm, which transformers
    computes but LLaVA ignores) get random values."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration
    from transformers import LlavaConfig as HFLlavaConfig

    c = model.config
    text = LlamaConfig(vocab_size=c.text.vocab_size, hidden_size=c.text.dim, intermediate_size=c.text.intermediate_size,
                       num_hidden_layers=c.text.n_layers, num_attention_heads=c.text.n_heads,
                       num_key_value_heads=c.text.n_kv_heads, rms_norm_eps=c.text.norm_eps,
                       max_position_embeddings=c.text.max_seq_len, pad_token_id=c.text.pad_token_id,
                       rope_parameters={"rope_type": "default", "rope_theta": c.text.rope_theta})
    vision = CLIPVisionConfig(hidden_size=c.vision.dim, intermediate_size=c.vision.intermediate_size,
                              num_hidden_layers=c.vision.n_layers, num_attention_heads=c.vision.n_heads,
                              image_size=c.vision.image_size, patch_size=c.vision.patch_size,
                              layer_norm_eps=c.vision.norm_eps)
    cfg = HFLlavaConfig(text_config=text, vision_config=vision, image_token_index=image_token,
                        vision_feature_layer=c.vision.feature_layer, image_seq_length=c.vision.n_patches)
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=model.dtype)
    ours = model.state_dict()
    shared = {k: ours[t] for k in hf.state_dict() if (t := map_key(k, c)) is not None}
    hf.load_state_dict(shared, assign=True, strict=False)
    for name, p in list(hf.named_parameters()):
        if p.is_meta:
            module, attr = hf.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            setattr(module, attr, torch.nn.Parameter(torch.randn(p.shape, dtype=model.dtype) * 0.02))
    # Non-persistent buffers were created on the meta device too: rebuild them as transformers' __init__ does.
    for name, module in hf.named_modules():
        if hasattr(module, "inv_freq"):  # the rotary embedding
            inv_freq, _ = module.compute_default_rope_parameters(module.config)
            module.inv_freq, module.original_inv_freq = inv_freq, inv_freq.clone()
        if hasattr(module, "position_ids") and module.position_ids.is_meta:  # CLIP's patch positions
            module.position_ids = torch.arange(module.position_ids.shape[-1])[None]
    leftover = [name for name, b in hf.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"transformers buffers left unset: {leftover}")
    return hf.eval()


def bench_transformers(model, ids, pixels, repeats: int, decode_tokens: int):
    image_token = max(set(range(model.config.text.vocab_size)) - set(ids[0].tolist()))
    hf = to_transformers(model, image_token)
    n_image = model.config.vision.n_patches
    expanded = torch.tensor([[x for t in ids[0].tolist()
                              for x in ([image_token] * n_image if t == model.config.image_token_id else [t])]])

    class Stamps:  # a transformers streamer: put() gets the prompt first, then each new token
        def __init__(self, on_token):
            self.on_token, self.calls = on_token, 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:
                self.on_token()

        def end(self):
            pass

    def hf_generate(n, on_token=None):
        with torch.inference_mode():
            return hf.generate(input_ids=expanded, pixel_values=pixels.to(model.dtype), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0,
                               streamer=Stamps(on_token) if on_token else None)

    print(f"\nminifastv vs transformers {__import__('transformers').__version__} (sdpa), same tensors, "
          f"{str(model.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
          f"prompt of {expanded.shape[1]} tokens, {decode_tokens} new token{'' if decode_tokens == 1 else 's'}")
    print("| | prefill ms (spread) | decode tok/s |\n|---|---|---|")
    results = {
        "minifastv": timed(minifastv_generate(model, ids, pixels, decode_tokens), repeats),
        "transformers": timed(lambda on_token: hf_generate(decode_tokens, on_token), repeats),
    }
    for name, t in results.items():
        print(f"| {name} | {t.prefill_s * 1e3:.1f} ({spread_ms(t.prefills)}) | {rate(t.decode_tok_s)} |")
    (p_ours, d_ours, *_), (p_hf, d_hf, *_) = results["minifastv"], results["transformers"]
    print(f"| minifastv speedup | {p_hf / p_ours:.2f}x | {'-' if d_ours is None else f'{d_ours / d_hf:.2f}x'} |")
    ours = generate(model, ids, pixels, max_new_tokens=8)[0].tolist()
    same = ours == hf_generate(8)[0, expanded.shape[1]:].tolist()
    print(f"greedy tokens identical over 8 steps: {same}")
