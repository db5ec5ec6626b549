"""Every pruning method on the seam: the seam's guarantees hold for each (batch = samples alone, cached
generation = recompute with the keep set held fixed, keep-everything = unpruned, two images in a prompt),
and each picks the same tokens as the method written plainly here, loop by loop, for several budgets."""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from helpers import IMAGE_TOKEN, assert_batch_equals_alone, random_pixels, random_prompt

from minifastv import generate, theoretical_flops
from minifastv.pruning import METHODS, Pruner, make

N_PATCHES, GRID = 16, 4
ALL = sorted(METHODS)


@pytest.fixture(scope="module")
def pair(twin):
    return twin(n_kv_heads=2, seed=13, text_layers=4, clip=True)   # with CLIP's text tower: cdpruner


def inputs(seed=0, image_at=(2, 7)):
    ids = random_prompt(torch.Generator().manual_seed(seed), 12, list(image_at))
    return torch.tensor([ids]), random_pixels(len(image_at), seed=seed)


def method(name, ratio):
    return make(name, ratio, k=1 if name in ("fastv", "random", "dart", "dart-official") else None)


@torch.no_grad()
@pytest.mark.parametrize("name", ALL)
def test_left_padded_batch_equals_samples_alone(pair, name):
    g = torch.Generator().manual_seed(5)
    prompts = [random_prompt(g, 13, [2, 8]), random_prompt(g, 6, [1])]   # two images, then one
    assert_batch_equals_alone(pair[1], prompts, [random_pixels(2, seed=3), random_pixels(1, seed=4)],
                              prune=method(name, 0.5), new_tokens=5)


@torch.no_grad()
@pytest.mark.parametrize("name", ALL)
def test_keeping_everything_is_the_unpruned_model(pair, name):
    ids, px = inputs(1)
    off = pair[1].prefill(ids, px)
    kept = pair[1].prefill(ids, px, prune=method(name, 0.0))
    assert kept.kept_image_slots() == off.kept_image_slots() and kept.flops == off.flops
    assert (kept.logits - off.logits).abs().max() <= 1e-6


@dataclass(frozen=True)
class Replay(Pruner):
    """`inner`'s schedule, and at each stage the image tokens it chose the first time (by rank among the image
    tokens present), so a recompute over a longer sequence keeps exactly the same set."""

    inner: Pruner
    memory: dict

    @property
    def needs_attention(self):
        return self.inner.needs_attention

    @property
    def vision_score(self):
        return self.inner.vision_score

    @property
    def renumber(self):
        return self.inner.renumber

    def stages(self, n_layers):
        return self.inner.stages(n_layers)

    def count(self, stage, n_image, n_first):
        return self.inner.count(stage, n_image, n_first)

    def select(self, ctx):
        if ctx.layer not in self.memory:
            choice = self.inner.select(ctx)
            if choice.dtype != torch.bool:
                top = choice.float().masked_fill(~ctx.image_mask, float("-inf")).topk(int(ctx.n_keep[0])).indices[0]
                choice = torch.zeros_like(ctx.image_mask).scatter(1, top[None], True)
            self.memory[ctx.layer] = ctx.image_index()[choice].tolist()
        index = ctx.image_index()
        return ctx.image_mask & torch.isin(index, torch.tensor(self.memory[ctx.layer]))

    def merge(self, ctx, chosen):
        return self.inner.merge(ctx, chosen)


@torch.no_grad()
@pytest.mark.parametrize("name", ALL)
def test_cached_generation_equals_recompute_with_the_keep_set_fixed(pair, name):
    ours = pair[1]
    ids, px = inputs(2)
    replay = Replay(method(name, 0.75), {})
    got = generate(ours, ids, px, max_new_tokens=6, prune=replay)[0].tolist()
    assert got == generate(ours, ids, px, max_new_tokens=6, prune=method(name, 0.75))[0].tolist()
    seq = ids[0].tolist()
    for token in got:
        assert int(ours(torch.tensor([seq]), px, prune=replay)[0, -1].argmax()) == token
        if token == IMAGE_TOKEN:   # the random model may generate the image id: fed back, it would be a placeholder
            break
        seq.append(token)


@torch.no_grad()
@pytest.mark.parametrize("name", ALL)
def test_reported_flops_follow_the_schedule(pair, name):
    """Methods that prune before the decoder save its first layers too: every layer runs on fewer tokens."""
    ours = pair[1]
    ids, px = inputs(3)
    pre = ours.prefill(ids, px, prune=method(name, 0.75))
    n = pre.n_prompt_tokens()[0]
    assert (pre.flops[0], pre.flops_unpruned[0]) == theoretical_flops(ours.config.text, n, 32, method(name, 0.75))
    if name in ("uniform", "fastervlm", "divprune", "pool", "visionzip"):
        assert pre.layer_tokens[0].tolist() == [n - 24] * 4


# --- the methods written plainly, one sample, one token at a time ------------------------------------------

def plain_uniform(k_per_image, side=GRID):
    rows = min(side, max(1, round(math.sqrt(k_per_image))))
    cols = min(side, math.ceil(k_per_image / rows))
    rows = math.ceil(k_per_image / cols)
    cells = []
    for r in range(rows):
        for c in range(cols):
            cells.append((int((r + 0.5) * side / rows), int((c + 0.5) * side / cols)))
    return sorted(cells[i * len(cells) // k_per_image][0] * side + cells[i * len(cells) // k_per_image][1]
                  for i in range(k_per_image))


def cosine_distance(a, b):
    return 1 - float(F.normalize(a.float(), dim=0) @ F.normalize(b.float(), dim=0))


def plain_divprune(features, k):
    n = len(features)
    d = [[cosine_distance(features[i], features[j]) for j in range(n)] for i in range(n)]
    nearest = [min(d[i][j] for j in range(n) if j != i) for i in range(n)]
    picked = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picked) < k:
        rest = [i for i in range(n) if i not in picked]
        picked.append(max(rest, key=lambda i: (min(d[i][p] for p in picked), -i)))
    return picked


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.5, 0.65625, 0.75, 0.875])  # 11 of 32: the images' shares differ
def test_uniform_matches_the_plain_grid(pair, ratio):
    ids, px = inputs(4)
    pre = pair[1].prefill(ids, px, prune=make("uniform", ratio))
    slots = pre.image_mask[0].nonzero()[:, 0].view(2, N_PATCHES)
    k = round((1 - ratio) * 32)
    expected = [int(slots[j, p]) for j in range(2) for p in plain_uniform(k // 2 + (j < k % 2))]
    assert pre.kept_image_slots()[0] == sorted(expected)


@torch.no_grad()
@pytest.mark.parametrize("ratio,rows", [(0.5, 2), (0.6875, 2), (0.75, 2), (0.875, 1)])  # per image 8, 5, 4, 2
def test_pool_averages_even_bins_into_their_centre_patches(pair, ratio, rows):
    """Per image, `rows` bands of the 4 x 4 grid (2 x 4 bins for 8; 3 + 2 for 5, which no grid fits), each
    band's bins the means torch's adaptive average pooling takes; a mean sits at its bin's centre patch."""
    ours = pair[1]
    ids, px = inputs(6)
    features = ours.encode_images(px)                                                   # 2, 16, C
    slots = ours.prefill(ids, px).image_mask[0].nonzero()[:, 0].view(2, N_PATCHES)
    k = round((1 - ratio) * 32)
    centres, means = [], []
    for j in range(2):
        grid, n = features[j].T.reshape(-1, GRID, GRID), k // 2 + (j < k % 2)
        for band in range(rows):
            r0, r1 = band * GRID // rows, -(-(band + 1) * GRID // rows)
            cols = n // rows + (band < n % rows)
            pooled = F.adaptive_avg_pool2d(grid[:, r0:r1, :], (1, cols))[:, 0]          # C, cols
            for c in range(cols):
                c0, c1 = c * GRID // cols, -(-(c + 1) * GRID // cols)
                centres.append(int(slots[j, (r0 + r1 - 1) // 2 * GRID + (c0 + c1 - 1) // 2]))
                means.append(pooled[:, c])
    pre = ours.prefill(ids, px, prune=make("pool", ratio))
    assert pre.kept_image_slots()[0] == sorted(centres)
    torch.testing.assert_close(pre.logits, gather_and_rerun(ours, ids, px, centres, means), rtol=1e-5, atol=1e-5)


def gather_and_rerun(model, ids, px, slots, rows):
    """The decoder run by hand on the text and the image slots `slots`, each carrying its row of `rows`, at
    the slots' own positions: the logits of a method that keeps and merges exactly that."""
    x, valid, image_mask, _ = model.embed(ids, px)
    x[0, slots] = torch.stack(rows).to(x.dtype)
    keep = sorted(set(valid[0].nonzero()[:, 0].tolist()) - set(image_mask[0].nonzero()[:, 0].tolist()) | set(slots))
    positions = (valid.cumsum(1) - 1)[:, keep]
    return model.llm.lm_head(model.llm(model.llm.sequence(x[:, keep], positions, valid[:, keep])).hidden)


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.84375])  # per image 12 = 10 + 2 contextual, 7 + 1, 3 + 1, 3 + 0
def test_visionzip_keeps_dominant_tokens_and_merges_the_rest(pair, ratio):
    """Dominant tokens by transformers' own CLIP class-token attention at the feature layer; contextual
    targets every n-th of the rest, each the mean of itself and the tokens most similar to it; written out."""
    hf, ours = pair
    ids, px = inputs(9)
    cls = hf.model.vision_tower(px, output_attentions=True).attentions[-2][:, :, 0, 1:].mean(1)  # 2, 16
    features = ours.encode_images(px)                                                        # 2, 16, C
    slots = ours.prefill(ids, px).image_mask[0].nonzero()[:, 0].view(2, N_PATCHES)
    k = round((1 - ratio) * 32)
    kept, rows = [], []
    for j in range(2):
        n = k // 2 + (j < k % 2)
        n_context = round(n * 10 / 64)
        dominant = sorted(range(N_PATCHES), key=lambda i: -float(cls[j, i]))[:n - n_context]
        rest = [i for i in range(N_PATCHES) if i not in dominant]
        targets = rest[::max(1, len(rest) // n_context)][:n_context] if n_context else []
        groups = {t: [t] for t in targets}
        for i in rest:
            if targets and i not in targets:
                groups[max(targets, key=lambda t: 1 - cosine_distance(features[j, i], features[j, t]))].append(i)
        for i in dominant + targets:
            kept.append(int(slots[j, i]))
            rows.append(features[j, groups.get(i, [i])].mean(0))
    pre = ours.prefill(ids, px, prune=make("visionzip", ratio))
    assert pre.kept_image_slots()[0] == sorted(kept)
    torch.testing.assert_close(pre.logits, gather_and_rerun(ours, ids, px, kept, rows), rtol=1e-5, atol=1e-5)


def test_pool_bins_cover_the_grid_as_evenly_as_the_budget_allows():
    from minifastv.pruning.pool import bins

    layout = {k: [sum(1 for b in bins(24, k) if b[0] == r0) for r0 in sorted({b[0] for b in bins(24, k)})]
              for k in (64, 128, 192, 67)}
    assert layout[64] == [8] * 8 and layout[128] == [16] * 8 and layout[192] == [16] * 12  # LLaVA's budgets
    assert layout[67] == [9] * 3 + [8] * 5                       # 67 is prime: 8 bands of 9 or 8 bins
    for side, k in ((24, 64), (24, 128), (24, 67), (4, 5), (4, 16), (3, 1)):
        cells = [(r, c) for r0, r1, c0, c1 in bins(side, k) for r in range(r0, r1) for c in range(c0, c1)]
        assert len(bins(side, k)) == k and set(cells) == {(r, c) for r in range(side) for c in range(side)}


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.875])
def test_fastervlm_keeps_the_class_tokens_favourites(pair, ratio):
    hf, ours = pair
    ids, px = inputs(5)
    cls = hf.model.vision_tower(px, output_attentions=True).attentions[-2][:, :, 0, 1:].mean(1).flatten()
    k = round((1 - ratio) * 32)
    ranked = sorted(range(32), key=lambda i: -float(cls[i]))[:k]
    pre = ours.prefill(ids, px, prune=make("fastervlm", ratio))
    slots = pre.image_mask[0].nonzero()[:, 0]
    assert pre.kept_image_slots()[0] == sorted(int(slots[i]) for i in ranked)


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.875])
def test_divprune_matches_the_plain_greedy(pair, ratio):
    hf, ours = pair
    ids, px = inputs(6)
    features = torch.cat(list(ours.encode_images(px)))                         # 32 projected image features
    k = round((1 - ratio) * 32)
    pre = ours.prefill(ids, px, prune=make("divprune", ratio))
    slots = pre.image_mask[0].nonzero()[:, 0]
    assert pre.kept_image_slots()[0] == sorted(int(slots[i]) for i in plain_divprune(features, k))


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.875])
def test_dart_matches_the_plain_pivots_and_shares(pair, ratio):
    """Keys and hidden states from transformers' own model at the pruning layer (K=2)."""
    hf, ours = pair
    ids, px = inputs(7)
    pre = ours.prefill(ids, px, prune=make("dart", ratio, k=2))
    slots = pre.image_mask[0].nonzero()[:, 0].tolist()
    from helpers import expand_images

    expanded = torch.tensor([expand_images(ids[0].tolist(), N_PATCHES)])
    h = hf(input_ids=expanded, pixel_values=px, output_hidden_states=True).hidden_states[2][0]  # input of layer 2
    layer = hf.model.language_model.layers[2]
    key_norm = layer.self_attn.k_proj(layer.input_layernorm(h)).abs().sum(-1)
    text = [s for s in range(len(h)) if s not in slots]
    k = round((1 - ratio) * 32)
    image_pivots = sorted(slots, key=lambda s: -float(key_norm[s]))[:min(4, k)]
    pivots = image_pivots + sorted(text, key=lambda s: -float(key_norm[s]))[:4]
    kept = list(image_pivots)
    left = k - len(kept)
    for p, pivot in enumerate(pivots):
        share = left // len(pivots) + (p < left % len(pivots))
        by_similarity = sorted(slots, key=lambda s: 1 - cosine_distance(h[pivot], h[s]))
        kept += [s for s in by_similarity if s not in kept][:share]
    assert pre.kept_image_slots()[0] == sorted(kept)


def official_run(hf, ids, px):
    """transformers' decoder layers and inputs for a plain run: (layers, their rotary, expanded ids, the
    hidden states entering each layer, the image slots)."""
    from helpers import IMAGE_TOKEN, expand_images

    expanded = torch.tensor([expand_images(ids[0].tolist(), N_PATCHES)])
    states = hf(input_ids=expanded, pixel_values=px, output_hidden_states=True).hidden_states
    image = [s for s, t in enumerate(expanded[0].tolist()) if t == IMAGE_TOKEN]
    return hf.model.language_model, expanded, [h[0] for h in states], image


def rotated(layer, lm, h, which):
    """Layer's queries or keys [H, T, D] of its input h [T, C], rotary at positions 0..T-1, as the layer computes
    them."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn, T = layer.self_attn, len(h)
    proj = attn.q_proj if which == "q" else attn.k_proj
    t = proj(layer.input_layernorm(h)).view(1, T, -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(h[None], torch.arange(T)[None])
    return apply_rotary_pos_emb(t, t, cos, sin)[0][0]


@torch.no_grad()
@pytest.mark.parametrize("ratio, kept", [(0.5, 20), (0.75, 12), (0.875, 4)])  # budgets 16, 8, 4
def test_dart_official_matches_the_official_pivots_and_shares(pair, ratio, kept):
    """K=2: pivots by the L1 norm of layer 1's rotated keys (4 image, 4 text after the image), floor(budget/8)
    tokens per pivot on top of the image pivots, least cosine-similar after the final norm, the pivots
    visited in the order of a Python set of their indices; all from transformers' model."""
    hf, ours = pair
    ids, px = inputs(7)
    lm, expanded, states, image = official_run(hf, ids, px)
    key_norm = rotated(lm.layers[1], lm, states[1], "k").abs().sum((0, 2))          # T
    hidden = lm.norm(states[2])
    after = [s for s in range(len(hidden)) if s > max(image)]
    image_pivots = sorted(image, key=lambda s: -float(key_norm[s]))[:4]
    text_pivots = sorted(after, key=lambda s: -float(key_norm[s]))[:4]
    per_pivot = round((1 - ratio) * 32) // 8
    left, taken = [s for s in image if s not in image_pivots], []
    for pivot in set(image_pivots + text_pivots):
        similar = F.cosine_similarity(hidden[pivot][None], hidden[left], dim=-1)
        chosen = [left[i] for i in (-similar).topk(per_pivot).indices.tolist()]
        taken += chosen
        left = [s for s in left if s not in chosen]
    pre = ours.prefill(ids, px, prune=make("dart-official", ratio, k=2))
    assert pre.kept_image_slots()[0] == sorted(image_pivots + taken) and len(image_pivots + taken) == kept


def test_dart_officials_budget_of_128_keeps_132():
    from minifastv.pruning import Stage
    from minifastv.pruning.dart import DARTOfficial

    counts = {budget: DARTOfficial().count(Stage(2, budget / 576), 576, 576) for budget in (64, 128, 192, 3)}
    assert counts == {64: 68, 128: 132, 192: 196, 3: 4}


def test_pyramiddrop_officials_counts_floor_the_exact_share():
    """floor(n lambda^s) as the official int() of exact arithmetic: 100 tokens at lambda 0.7 keep 49 at stage 2,
    though 0.7 ** 2 * 100 comes out 48.99999999999999 in floating point."""
    from minifastv.pruning import PyramidDropOfficial

    method = PyramidDropOfficial(ratio=0.3)
    assert [method.count(stage, 100, 100) for stage in method.stages(16)] == [70, 49, 34]


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_pyramiddrop_official_matches_the_official_loop(pair, ratio):
    """transformers' decoder layers run by hand as the official code runs them: before layers 1, 2, 3 the next
    layer's q and k rank the image tokens by the last token's head-mean attention, floor(32 lambda^s) of them
    stay, and the survivors are renumbered 0, 1, ..."""
    hf, ours = pair
    ids, px = inputs(8)
    lm, expanded, states, image = official_run(hf, ids, px)
    h, slots, lam, tokens = states[0], list(range(len(states[0]))), 1 - ratio, []
    for i, layer in enumerate(lm.layers):
        if i in (1, 2, 3):
            q, k = rotated(layer, lm, h, "q"), rotated(layer, lm, h, "k")
            k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
            row = ((q[:, -1:] @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])).softmax(-1).mean(0)[0]
            present = [j for j, s in enumerate(slots) if s in image]
            top = sorted(present, key=lambda j: -float(row[j]))[:int(32 * [lam, lam ** 2, lam ** 3][i - 1] + 1e-9)]
            keep = sorted(set(range(len(slots))) - set(present) | set(top))
            h, slots = h[keep], [slots[j] for j in keep]
        T = len(h)
        cos, sin = lm.rotary_emb(h[None], torch.arange(T)[None])
        causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
        h = layer(h[None], attention_mask=causal, position_embeddings=(cos, sin))[0]
        tokens.append(T)
    pre = ours.prefill(ids, px, prune=make("pyramiddrop-official", ratio))
    assert pre.kept_image_slots()[0] == [s for s in slots if s in image]
    assert pre.layer_tokens[0].tolist() == tokens
    torch.testing.assert_close(pre.logits[0, -1], hf.lm_head(lm.norm(h))[-1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_pyramiddrop_follows_the_last_tokens_attention_at_each_stage(pair, ratio):
    """Stages before layers 1, 2 and 3 of the 4-layer decoder; the rows are the model's own (checked against
    transformers in test_fastv), the stage-by-stage choice is written out here."""
    ours = pair[1]
    ids, px = inputs(8)
    pre = ours.prefill(ids, px, prune=make("pyramiddrop", ratio), attention_rows=1)
    present = pre.image_mask[0].nonzero()[:, 0].tolist()                       # merged slots still there
    slots = list(range(pre.image_mask.shape[1]))                               # merged slot of each current slot
    n_text, tokens = len(slots) - len(present), [len(slots)]
    for layer in (1, 2, 3):
        row = pre.attention[layer - 1][0, -1]                                  # over the slots layer - 1 saw
        k = round((1 - ratio) * len(present))
        ranked = sorted((i for i, s in enumerate(slots) if s in present), key=lambda i: -float(row[i]))[:k]
        present = [slots[i] for i in sorted(ranked)]
        slots = [s for s in slots if s in present or not pre.image_mask[0, s]]
        tokens.append(n_text + len(present))
    assert pre.kept_image_slots()[0] == present
    assert pre.layer_tokens[0].tolist() == tokens


@pytest.mark.parametrize("kept", [0.5, 0.25, 0.125, 1 / 27])
def test_pyramiddrop_keeping_sets_each_stages_lambda_to_the_cube_root(kept):
    """keeping(kept): three stages, each keeping lambda = kept^(1/3) of the image tokens present, leave `kept`
    after the last one (on the tiny model's 64 tokens, within the rounding of each stage)."""
    from minifastv import load
    from minifastv.data import TINY_MODEL
    from minifastv.pruning import PyramidDrop

    method = PyramidDrop.keeping(kept)
    stages = method.stages(32)
    assert [s.layer for s in stages] == [8, 16, 24]
    assert all(s.keep == pytest.approx(kept ** (1 / 3), abs=1e-12) for s in stages)
    model = load(TINY_MODEL, dtype="float32")
    ids = torch.tensor([[1, 5, 6, model.config.image_token_id, 7, 8]])
    with torch.no_grad():
        pre = model.prefill(ids, torch.zeros(1, 3, 64, 64), prune=method)
    n = 64
    for _ in range(3):
        n = round(n * kept ** (1 / 3))
    assert len(pre.kept_image_slots()[0]) == n and abs(n - 64 * kept) <= 1.5
