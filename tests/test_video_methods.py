"""Every pruning method over video tokens (Video-LLaVA): the seam's guarantees hold for each (batch = samples
alone, cached generation = recompute with the keep set held fixed, keep-everything = unpruned, FLOPs as
scheduled), the per-frame reading of the per-image methods (uniform, pool: a frame's share goes to its class
token first, then to its patch grid) against the method written plainly here, the per-video reading of the
others, the methods that rank by the tower's class-token attention refusing videos by name, and what an answer
reports per frame (kept_patches, kept_class_tokens)."""

import pytest
import torch
from helpers import assert_batch_equals_alone, randomize
from test_methods import Replay, plain_uniform

from minifastv import generate, theoretical_flops
from minifastv.config import TextConfig, VisionConfig
from minifastv.models import VideoLlavaConfig, VideoLlavaModel
from minifastv.pipeline import Answer, visual_groups
from minifastv.pruning import METHODS, make

IMAGE, VIDEO, FRAMES, GRID = 64, 65, 4, 4        # placeholders outside the vocabulary: never generated
FRAME = GRID * GRID + 1                                  # a frame's tokens: its class token, then 16 patches
REFUSED = ("fastervlm", "visionzip", "cdpruner")   # they rank by the tower's class-token attention, by CLIP's text
VIDEO_METHODS = sorted(set(METHODS) - set(REFUSED))
PER_FRAME = ("uniform", "pool")


@pytest.fixture(scope="module")
def model():
    cfg = VideoLlavaConfig(
        vision=VisionConfig(image_size=16, patch_size=4, dim=32, n_layers=3, n_heads=4, intermediate_size=64),
        text=TextConfig(vocab_size=64, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=96,
                        max_seq_len=1024),
        image_token_id=IMAGE, video_token_id=VIDEO, n_frames=FRAMES, image_mode="crop")
    torch.manual_seed(0)
    return randomize(VideoLlavaModel(cfg), seed=21).eval()


def prompt(seed, n_text, videos=(), images=()):
    """BOS, random text, a video placeholder before the text indices `videos`, an image one before `images`."""
    text = torch.randint(4, 60, (n_text,), generator=torch.Generator().manual_seed(seed)).tolist()
    ids = [1]
    for i, t in enumerate(text):
        ids += [IMAGE] * list(images).count(i) + [VIDEO] * list(videos).count(i) + [t]
    return ids


def video(n, seed):
    return torch.randn(n, FRAMES, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def method(name, ratio):
    return make(name, ratio, k=1 if name in ("fastv", "random", "dart", "dart-official") else None)


@pytest.mark.parametrize("name", VIDEO_METHODS)
def test_left_padded_batch_of_videos_equals_samples_alone(model, name):
    prompts = [prompt(1, 10, videos=(2, 6)), prompt(2, 5, videos=(1,))]  # two videos, then one
    assert_batch_equals_alone(model, prompts, [None, None], prune=method(name, 0.5), new_tokens=4,
                              videos=[video(2, 1), video(1, 2)])


@pytest.mark.parametrize("name", sorted(set(VIDEO_METHODS) - set(PER_FRAME)))
def test_a_batch_mixing_images_and_videos_equals_samples_alone(model, name):
    """The methods that rank a sample's visual tokens as one set take images and videos together."""
    prompts = [prompt(3, 9, videos=(4,), images=(1,)), prompt(4, 6, images=(2,)), prompt(5, 7, videos=(0,))]
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    assert_batch_equals_alone(model, prompts, [px[:1], px[1:], None], prune=method(name, 0.5), new_tokens=4,
                              videos=[video(1, 3), None, video(1, 5)])


@torch.no_grad()
@pytest.mark.parametrize("name", VIDEO_METHODS)
def test_keeping_everything_is_the_unpruned_model(model, name):
    ids, vids = torch.tensor([prompt(6, 8, videos=(3,))]), video(1, 6)
    off = model.prefill(ids, video_values=vids)
    kept = model.prefill(ids, prune=method(name, 0.0), video_values=vids)
    assert kept.kept_image_slots() == off.kept_image_slots() and kept.flops == off.flops
    assert (kept.logits - off.logits).abs().max() <= 1e-6


@torch.no_grad()
@pytest.mark.parametrize("name", VIDEO_METHODS)
def test_cached_generation_equals_recompute_with_the_keep_set_fixed(model, name):
    ids, vids = torch.tensor([prompt(7, 8, videos=(2,))]), video(1, 7)
    replay = Replay(method(name, 0.75), {})
    got = generate(model, ids, max_new_tokens=5, prune=replay, video_values=vids)[0].tolist()
    assert got == generate(model, ids, max_new_tokens=5, prune=method(name, 0.75), video_values=vids)[0].tolist()
    seq = ids[0].tolist()
    for token in got:
        assert int(model(torch.tensor([seq]), prune=replay, video_values=vids)[0, -1].argmax()) == token
        seq.append(token)


@torch.no_grad()
@pytest.mark.parametrize("name", VIDEO_METHODS)
def test_reported_flops_follow_the_schedule(model, name):
    ids, vids = torch.tensor([prompt(8, 8, videos=(2,))]), video(1, 8)
    pre = model.prefill(ids, prune=method(name, 0.75), video_values=vids)
    n = pre.n_prompt_tokens()[0]
    assert pre.n_image_tokens()[0] == FRAMES * FRAME
    assert (pre.flops[0], pre.flops_unpruned[0]) == theoretical_flops(model.config.text, n, FRAMES * FRAME,
                                                                      method(name, 0.75))


def test_the_flops_at_2056_video_tokens_are_the_papers_formula():
    """Video-LLaVA-7B: 8 frames x 257 tokens and a prompt of 40; FastV K=2 R=50% against the paper's
    per-layer 4nd^2 + 2n^2d + 2ndm, written out here."""
    from minifastv.models.video_llava import VIDEO_LLAVA_7B

    text, n_video, n_text = VIDEO_LLAVA_7B.text, 2056, 40
    d, m, n = text.dim, text.intermediate_size, n_video + n_text

    def layer(tokens):
        return 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * m

    pruned = n - n_video // 2
    expected = (2 * layer(n) + 30 * layer(pruned), 32 * layer(n))
    assert theoretical_flops(text, n, n_video, make("fastv", 0.5, k=2)) == expected
    assert 0.5 < expected[0] / expected[1] < 0.6  # the paper's Table 6 reads ~52% (K=2, R=50%)


@torch.no_grad()
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_uniform_divides_a_video_per_frame(model, ratio):
    """Each frame's share of the budget (equal shares, the first frames taking the remainder) keeps its class
    token first, then the plain uniform grid over its patches."""
    ids, vids = torch.tensor([prompt(9, 6, videos=(2,))]), video(1, 9)
    pre = model.prefill(ids, prune=make("uniform", ratio), video_values=vids)
    first = int(pre.image_mask[0].nonzero()[0])
    budget = round((1 - ratio) * FRAMES * FRAME)
    expected = []
    for f in range(FRAMES):
        share = budget // FRAMES + (f < budget % FRAMES)
        start = first + f * FRAME
        expected += [start] if share else []
        expected += [start + 1 + p for p in plain_uniform(share - 1)] if share > 1 else []
    assert pre.kept_image_slots()[0] == sorted(expected)


@torch.no_grad()
def test_pool_keeps_each_frames_class_token_and_pools_its_patches(model):
    """At R=0.5 (34 of 68: shares 9, 9, 8, 8) each frame keeps its class token and averages its patch grid into
    8 or 7 bins."""
    ids, vids = torch.tensor([prompt(10, 6, videos=(2,))]), video(1, 10)
    pre = model.prefill(ids, prune=make("pool", 0.5), video_values=vids)
    first = int(pre.image_mask[0].nonzero()[0])
    kept = pre.kept_image_slots()[0]
    assert len(kept) == 34
    for f, share in enumerate((9, 9, 8, 8)):
        mine = [s - first - f * FRAME for s in kept if 0 <= s - first - f * FRAME < FRAME]
        assert mine[0] == 0 and len(mine) == share   # the class token, then share - 1 pooled bins


@pytest.mark.parametrize("name", REFUSED)
def test_the_class_token_attention_methods_refuse_videos_by_name(model, name):
    ids, vids = torch.tensor([prompt(11, 6, videos=(2,))]), video(1, 11)
    with pytest.raises(ValueError, match="do not take videos"):
        model.prefill(ids, prune=make(name, 0.5), video_values=vids)


@pytest.mark.parametrize("name", PER_FRAME)
def test_the_per_frame_methods_refuse_a_batch_mixing_images_and_videos_by_name(model, name):
    ids = torch.tensor([prompt(12, 6, videos=(2,), images=(4,))])
    px = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="images beside videos"):
        model.prefill(ids, px, prune=make(name, 0.5), video_values=video(1, 12))


@torch.no_grad()
def test_an_answer_reports_kept_patches_per_frame_and_kept_class_tokens(model):
    """kept_patches: one list per image and per video frame in prompt order (row-major patch indices);
    kept_class_tokens: per video, the frames whose class token survived; both rebuilt from the kept slots."""
    ids = prompt(13, 8, videos=(5,), images=(1,))
    px = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(13))
    pre = model.prefill(torch.tensor([ids]), px, prune=make("fastv", 0.6, k=1), video_values=video(1, 13))
    answer = Answer.of(_Tok(), pre, 0, [], 0.0, 0.0, 0, True, model, ids)
    groups = visual_groups(model, ids)
    assert [(n, f) for _, n, f in groups] == [(16, -1)] + [(FRAME, f) for f in range(FRAMES)]
    image_start = ids.index(IMAGE)
    assert groups[0][0] == image_start and groups[1][0] == ids.index(VIDEO) + 15   # the image's 16 slots before it
    slots = set(pre.kept_image_slots()[0])
    assert answer.kept_patches[0] == [p for p in range(16) if image_start + p in slots]
    for f in range(FRAMES):
        start = groups[1 + f][0]
        assert answer.kept_patches[1 + f] == [p for p in range(16) if start + 1 + p in slots]
    assert answer.kept_class_tokens == [[f for f in range(FRAMES) if groups[1 + f][0] in slots]]
    assert sum(map(len, answer.kept_patches)) + len(answer.kept_class_tokens[0]) == answer.kept
    assert answer.as_json()["kept_class_tokens"] == answer.kept_class_tokens


class _Tok:
    def decode(self, ids):
        return ""


def test_the_sequence_reads_a_video_frame_as_a_group(model):
    """Pruning's per-image methods see a video-only batch in groups of a frame (class token + patches)."""
    assert model.groups() == {IMAGE: GRID * GRID, VIDEO: FRAME}
    assert model.spans() == {IMAGE: GRID * GRID, VIDEO: FRAMES * FRAME}


@pytest.mark.parametrize("token", [IMAGE, VIDEO])
def test_a_placeholder_under_padding_is_a_named_error(model, token):
    """An image or video placeholder where attention_mask is 0 cannot be widened; the ids outside the vocabulary
    that the placeholders are here do not pass as text either."""
    ids = torch.tensor([prompt(14, 6, videos=(2,) if token == VIDEO else (), images=(2,) if token == IMAGE else ())])
    mask = torch.ones_like(ids)
    mask[0, ids[0].tolist().index(token)] = 0
    visual = {"video_values": video(1, 14)} if token == VIDEO else {}
    px = torch.randn(1, 3, 16, 16) if token == IMAGE else None
    with pytest.raises(ValueError, match="an image or video placeholder lies under attention_mask == 0"):
        model.prefill(ids, px, attention_mask=mask, **visual)
    with pytest.raises(ValueError, match="token id 66 is outside the vocabulary"):
        model.prefill(torch.tensor([[1, 66, 5]]))
