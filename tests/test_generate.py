"""Generation with the KV cache against recomputing the whole sequence at every step; sampling; EOS."""

import pytest
import torch
from helpers import random_pixels, random_prompt

from minifastv.inputs import left_pad
from minifastv.models.generate import generate, sample


@pytest.fixture(scope="module")
def model(twin):
    return twin(n_kv_heads=2, rms_eps=1e-4, seed=3)[1]


def recompute(model, ids, pixels, mask, steps):
    """Greedy decoding with no cache: a full forward over prompt + generated tokens for every new token."""
    out, logits = [], []
    for _ in range(steps):
        last = model(ids, pixels, attention_mask=mask)[:, -1]
        token = last.argmax(-1)
        out.append(token)
        logits.append(last)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(out, 1), torch.stack(logits, 1)


@torch.no_grad()
@pytest.mark.parametrize("batch", [False, True], ids=["single", "left-padded-batch"])
def test_cache_equals_recompute(model, batch):
    g = torch.Generator().manual_seed(2)
    prompts = [random_prompt(g, 9, [3])] + ([random_prompt(g, 4, [0, 2])] if batch else [])
    pixels = random_pixels(3 if batch else 1, seed=8)
    ids, mask, _ = left_pad(prompts, pad_id=0)
    ref_ids, ref_logits = recompute(model, ids, pixels, mask, steps=12)
    got_ids, got_logits = generate(model, ids, pixels, attention_mask=mask, max_new_tokens=12, return_logits=True)
    assert got_ids.tolist() == ref_ids.tolist()
    assert (got_logits - ref_logits).abs().max() <= 1e-4


@torch.no_grad()
def test_eos_stops_and_pads(model):
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(4), 6, [2])])
    px = random_pixels(1)
    free = generate(model, ids, px, max_new_tokens=8)[0].tolist()
    eos = free[3]  # pretend the fourth generated token is EOS
    stopped = generate(model, ids, px, max_new_tokens=8, eos_token_id=eos)[0].tolist()
    assert stopped == free[:free.index(eos) + 1]


@torch.no_grad()
def test_finished_sample_keeps_emitting_eos(model):
    g = torch.Generator().manual_seed(5)
    ids, mask, _ = left_pad([random_prompt(g, 6, [1]), random_prompt(g, 8, [5])], pad_id=0)
    px = random_pixels(2)
    free = generate(model, ids, px, attention_mask=mask, max_new_tokens=6).tolist()
    # EOS: the earliest token of sample 0 (past its first) that sample 1 never produces.
    j = next(j for j in range(1, 5) if free[0][j] not in free[1] and free[0][j] not in free[0][:j])
    eos = free[0][j]
    got = generate(model, ids, px, attention_mask=mask, max_new_tokens=6, eos_token_id=eos).tolist()
    assert got[0] == free[0][:j + 1] + [eos] * (5 - j)
    assert got[1] == free[1]


def test_sample_greedy_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample(logits).tolist() == [1]
    probs = torch.softmax(logits, -1)[0]  # 0.032, 0.644, 0.087, 0.237
    g = torch.Generator().manual_seed(0)
    # top_p 0.7: token 1 (0.644) alone is short of 0.7, so token 3 joins; tokens 0 and 2 never appear.
    draws = torch.stack([sample(logits, 1.0, 0.7, g) for _ in range(400)]).flatten()
    assert set(draws.tolist()) == {1, 3}
    share = (draws == 1).float().mean().item()
    assert abs(share - probs[1] / (probs[1] + probs[3])) < 0.07
    # top_p below the top token's mass keeps exactly that token.
    assert set(torch.stack([sample(logits, 1.0, 0.5, g) for _ in range(50)]).flatten().tolist()) == {1}


def test_sampling_is_reproducible_with_a_generator(model):
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(6), 6, [2])])
    px = random_pixels(1)
    runs = [generate(model, ids, px, max_new_tokens=10, temperature=1.5, top_p=0.9,
                           generator=torch.Generator().manual_seed(42)) for _ in range(2)]
    assert runs[0].tolist() == runs[1].tolist()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature must be >= 0"),
    (dict(max_new_tokens=4, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=600), "exceeds the context of 512"),
])
def test_bad_generate_arguments(model, kwargs, message):
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(6), 6, [2])])
    with pytest.raises(ValueError, match=message):
        generate(model, ids, random_pixels(1), **kwargs)


def test_right_padding_is_refused(model):
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(6), 6, [2]) + [0]])
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, random_pixels(1), attention_mask=mask, max_new_tokens=2)


def test_temperature_divides_the_logits_and_lower_is_sharper():
    """Sampling at temperature T draws from softmax(logits / T): the empirical frequencies over many draws
    match that distribution, and a lower temperature puts more mass on the best token."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, -1)
    for temperature in (0.5, 1.0, 2.0):
        drawn = sample(logits, temperature, generator=torch.Generator().manual_seed(0))
        freq = torch.bincount(drawn, minlength=4).float() / len(drawn)
        expected = torch.softmax(logits[0] / temperature, dim=-1)
        assert (freq - expected).abs().max() < 0.015, (temperature, freq, expected)
    sharp, flat = (torch.bincount(sample(logits, t, generator=torch.Generator().manual_seed(1)), minlength=4)[0]
                   for t in (0.5, 2.0))
    assert sharp > flat


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(5000, -1)
    drawn = sample(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}                                  # 0.5 + 0.3 reaches 0.7
    freq = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert abs(float(freq[0]) - 0.5 / 0.8) < 0.03
    drawn = sample(logits, 1.0, top_p=0.85, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1, 2}


def test_a_padding_query_sees_its_own_slot_only():
    """Left padding: a padding query attends to itself alone (else SDPA returns NaN for it, and 0 * NaN leaks
    into later layers); real queries never see padding, and see every earlier real slot."""
    from minifastv.models.llama import attention_mask

    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    mask = attention_mask(valid, 4)[:, 0]
    assert mask[0, 0].tolist() == [True, False, False, False]
    assert mask[0, 1].tolist() == [False, True, False, False]
    assert mask[0, 3].tolist() == [False, False, True, True]
    assert mask[1, 2].tolist() == [True, True, True, False]
    assert attention_mask(valid[1:], 1) is None and attention_mask(valid[:1], 1)[0, 0, 0].tolist() == [False, False,
                                                                                                      True, True]


def test_a_prompt_that_fills_the_context_exactly_runs(model):
    """The context holds prompt + max_new_tokens slots: exactly full runs every step, one more is refused."""
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(6), 6, [2])])
    _, length = model.merged_slots(ids)
    room = model.config.text.max_seq_len - length
    out = generate(model, ids, random_pixels(1), max_new_tokens=room)
    assert out.shape[1] == room  # no EOS given: every step runs
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(model, ids, random_pixels(1), max_new_tokens=room + 1)


@torch.inference_mode()
def test_a_last_only_prefill_gives_lm_head_a_matrix(model):
    """torch's matmul does not fold a [B, 1, C] slice of the hidden states into one matrix when lm_head's weight
    does not require grad (a model loaded under inference_mode, as bench loads it): it copies the weight into a
    batch of one, 5.3 s for Qwen-VL's 151,936 x 4,096 at 2 threads against 0.06 s. So last_only hands lm_head the
    [B, C] rows, and its logits are the full prefill's last ones."""
    g = torch.Generator().manual_seed(2)
    ids, mask, _ = left_pad([random_prompt(g, 9, [3]), random_prompt(g, 4, [0, 2])], pad_id=0)
    batch = {"input_ids": ids, "pixel_values": random_pixels(3, seed=8), "attention_mask": mask}
    seen = []
    hook = model.llm.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].dim()))
    try:
        last = model.prefill(**batch, last_only=True).logits
        full = model.prefill(**batch).logits
    finally:
        hook.remove()
    assert seen == [2, 3] and last.shape == (full.shape[0], 1, full.shape[2])
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
