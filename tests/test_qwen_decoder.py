"""Qwen-VL's decoder (minifastv/models/qwen.py) against transformers' Qwen2ForCausalLM holding the same weights:
the q/k/v bias and the LLaMA shape on short prompts; past the 2,048-token context, Qwen's log-n query scaling and
dynamic NTK rotary base, which Qwen2 lacks, are put into the reference by hand (the NTK base as its rope_theta,
log-n as a hook that scales each query row: a per-position scale commutes with the rotation), from Qwen's formulas
written out plainly here. Then the cache: decode steps equal a recomputation with the alpha of the prefill, a batch
with padding equals each sample alone."""

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from minifastv.config import TextConfig
from minifastv.models.cache import KVCache
from minifastv.models.qwen import QwenDecoder, logn_scale, ntk_alpha

CONTEXT = 2048
CFG = TextConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=96, norm_eps=1e-6,
                 max_seq_len=4608, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def plain_alpha(n: int) -> float:
    """modeling_qwen.py's rule, as it reads: context_value = log2(n / seq_length) + 1, alpha = 2^ceil(.) - 1, >= 1."""
    return max(2 ** math.ceil(math.log(n / CONTEXT, 2) + 1) - 1, 1)  # noqa: FURB163 (Qwen's own expression)


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    dec = QwenDecoder(CFG, context=CONTEXT).eval()
    with torch.no_grad():
        for p in dec.parameters():
            p.normal_(0, 0.3 if p.ndim > 1 else 0.1)       # biases and norms far from their initial values
        for layer in dec.layers:
            layer.attn_norm.weight.add_(1), layer.mlp_norm.weight.add_(1)
        dec.norm.weight.add_(1)
    return dec


def reference(dec: QwenDecoder, n_tokens: int, logn: bool) -> Qwen2ForCausalLM:
    """Qwen2 with dec's weights, its rotary base Qwen's NTK base for an n_tokens prompt, and (logn) each query
    row scaled by log_2048(position + 1) past 2,048."""
    d = CFG.head_dim
    theta = CFG.rope_theta * plain_alpha(n_tokens) ** (d / (d - 2))
    hf = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=CFG.vocab_size, hidden_size=CFG.dim, intermediate_size=CFG.intermediate_size,
        num_hidden_layers=CFG.n_layers, num_attention_heads=CFG.n_heads, num_key_value_heads=CFG.n_kv_heads,
        rms_norm_eps=CFG.norm_eps, max_position_embeddings=8192, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": theta})).eval()
    names = {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head", "layers": "model.layers",
             "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn": "self_attn"}
    state = {".".join(names.get(part, part) for part in k.split(".")): v for k, v in dec.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    if logn:
        def scale_rows(module, args, out):
            positions = torch.arange(out.shape[1])
            factor = torch.tensor([math.log(p + 1, CONTEXT) if p + 1 > CONTEXT else 1.0 for p in positions.tolist()])
            return out * factor[None, :, None].to(out.dtype)
        for layer in hf.model.layers:
            layer.self_attn.q_proj.register_forward_hook(scale_rows)
    return hf


def ours(dec, ids, valid=None, cache=None, positions=None):
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
    positions = (valid.cumsum(1) - 1).clamp(min=0) if positions is None else positions
    out = dec(dec.sequence(dec.embed_tokens(ids), positions, valid, cache), cache)
    return dec.lm_head(out.hidden)


def test_the_rules_as_qwen_writes_them():
    n = torch.tensor([1, 1000, 2048, 2049, 4096, 4097, 8192, 8193])
    assert ntk_alpha(n, CONTEXT).tolist() == [plain_alpha(int(i)) for i in n] == [1, 1, 1, 3, 3, 7, 7, 15]
    scale = logn_scale(torch.tensor([[0, 2046, 2047, 2048, 4095]]), CONTEXT)[0]
    assert scale[:3].tolist() == [1, 1, 1] and scale[3] == pytest.approx(math.log(2049, 2048))
    assert scale[4] == pytest.approx(12 / 11)   # log_2048(4096) = 12 / 11


@pytest.mark.parametrize("length", [37, 2100])
def test_logits_equal_qwen2_with_qwens_long_context_rules(decoder, length):
    ids = torch.randint(3, CFG.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = reference(decoder, length, logn=True)(ids).logits
        got = ours(decoder, ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if length > CONTEXT:   # both rules matter here: without them Qwen2 answers otherwise
        with torch.no_grad():
            plain = reference(decoder, 1, logn=False)(ids).logits
        assert (plain[0, -1] - expected[0, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("prompt", [2040, 2100])
def test_decode_keeps_the_prefills_alpha_and_equals_a_recomputation(decoder, prompt):
    """Decoding on from a 2,040-token prompt (alpha 1) past 2,048, and from a 2,100-token one (alpha 3): Qwen keeps
    the prefill's alpha, and log-n starts at the context; each step's logits equal Qwen2's over the whole sequence
    with that alpha and log-n."""
    ids = torch.randint(3, CFG.vocab_size, (1, prompt + 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(decoder, prompt, logn=True)(ids).logits
        cache = KVCache(CFG.n_layers, extra=16)
        steps = [ours(decoder, ids[:, :prompt], cache=cache)[:, -1]]
        for t in range(prompt, ids.shape[1]):
            steps.append(ours(decoder, ids[:, t:t + 1], cache=cache, positions=torch.tensor([[t]]))[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), expected[:, prompt - 1:], atol=1e-4, rtol=1e-4)


def test_each_sample_takes_its_own_alpha_in_a_padded_batch(decoder):
    """A 2,100-token prompt (alpha 3) beside a 30-token one (alpha 1), left-padded, prefilled and decoded together,
    equals each alone."""
    gen = torch.Generator().manual_seed(2)
    long, short = (torch.randint(3, CFG.vocab_size, (1, n), generator=gen) for n in (2100, 30))
    ids = torch.cat([long, torch.cat([torch.full((1, 2070), CFG.pad_token_id), short], 1)])
    valid = ids != CFG.pad_token_id
    nxt = torch.randint(3, CFG.vocab_size, (2, 1), generator=gen)
    with torch.no_grad():
        cache = KVCache(CFG.n_layers, extra=4)
        batch = ours(decoder, ids, valid, cache)[:, -1]
        step = ours(decoder, nxt, cache=cache, positions=valid.sum(1, keepdim=True))[:, -1]
        for row, alone in enumerate((long, short)):
            cache = KVCache(CFG.n_layers, extra=4)
            torch.testing.assert_close(batch[row], ours(decoder, alone, cache=cache)[0, -1], atol=1e-4, rtol=1e-4)
            positions = torch.tensor([[alone.shape[1]]])
            torch.testing.assert_close(step[row], ours(decoder, nxt[row:row + 1], cache=cache, positions=positions)[0, -1],
                                       atol=1e-4, rtol=1e-4)


def test_the_prefills_alpha_survives_pruning_and_the_servers_cache_surgery(decoder):
    """FastV keeping every image token (R=0) must answer as the unpruned pass, and its layers past K must decode
    with the prefill's alpha; the server's keep_rows and concat carry each row's alpha with its keys."""
    from minifastv.pruning import FastV
    from minifastv.serve.batching import concat, keep_rows

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, CFG.vocab_size, (1, n), generator=gen) for n in (2100, 40)]
    nxt = torch.randint(3, CFG.vocab_size, (1, 1), generator=gen)

    def prefill(ids, prune):
        valid = torch.ones_like(ids, dtype=torch.bool)
        image = torch.zeros_like(valid)
        image[:, 5:21] = True                                      # 16 visual slots
        seq = decoder.sequence(decoder.embed_tokens(ids), (valid.cumsum(1) - 1), valid, image=image, n_patches=16)
        cache = KVCache(CFG.n_layers, extra=4)
        decoder(seq, cache, prune)
        return cache

    def step(cache, positions):
        return ours(decoder, nxt.expand(len(positions), 1), cache=cache, positions=positions)[:, -1]

    with torch.no_grad():
        alone = [step(prefill(p, None), torch.tensor([[p.shape[1]]])) for p in prompts]
        pruned = [prefill(p, FastV(k=1, ratio=0.0)) for p in prompts]
        both = concat(pruned, extra=4)                            # new buffers: the pruned caches stay as they are
        torch.testing.assert_close(step(both, torch.tensor([[2100], [40]])), torch.cat(alone), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step(pruned[0], torch.tensor([[2100]])), alone[0], atol=1e-4, rtol=1e-4)
        keep_rows(both, torch.tensor([0]))                        # the long row, one token on, as pruned[0] is now
        torch.testing.assert_close(step(both, torch.tensor([[2101]]))[0], step(pruned[0], torch.tensor([[2101]]))[0])
