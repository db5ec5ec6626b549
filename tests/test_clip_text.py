"""CLIP's text tower and its joint space (models/clip_text.py), converted by the production converter from a
transformers CLIPModel (convert --clip-text): the text embeddings against CLIPTextModelWithProjection, the patch
embeddings against the CLIP vision model's post_layernorm and visual_projection, the instruction read back from
the prompt and chunked as the official CDPruner does, and the relevance a method receives."""

from __future__ import annotations

import json
import shutil
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CLIP_END,
    CLIP_START,
    IMAGE_TOKEN,
    build_tokenizer,
    hf_clip,
    hf_llava,
    random_pixels,
    to_minifastv,
    write_clip_checkpoint,
    write_hf_checkpoint,
)
from safetensors.torch import load_file, save_file

from minifastv import load
from minifastv.checkpoint import CLIP_TOKENIZER, load_tokenizer, quantize_checkpoint, save
from minifastv.config import QuantConfig
from minifastv.convert import convert
from minifastv.files import CheckpointError
from minifastv.pruning import BeforeDecoder
from minifastv.tokenizer import Tokenizer

QUESTION = "Which shape is in row two, column three? Is there a circle at the top left of the image, or a square?"


@pytest.fixture(scope="module", params=[2, CLIP_END], ids=["pooled-at-largest-id", "pooled-at-eos"])
def clip_pair(request):
    """(transformers LLaVA, its CLIPModel, the minifastv twin with the text tower) for both pooling rules."""
    hf = hf_llava(n_kv_heads=2, seed=21)
    clip = hf_clip(hf, seed=22, eos_token_id=request.param)
    return hf, clip, to_minifastv(hf, clip)


def hf_text_embeds(clip, ids, mask):
    from transformers import CLIPTextModelWithProjection

    text = CLIPTextModelWithProjection._from_config(clip.config.text_config, attn_implementation="eager").eval()
    text.load_state_dict({k: v for k, v in clip.state_dict().items() if k.startswith(("text_model.",
                                                                                       "text_projection."))})
    return text(input_ids=ids, attention_mask=mask).text_embeds


def official_chunks(tokenizer_file, text, n):
    """The official layout (its clip_encoder.py): ids padded with zeros to a whole number of chunks of n, and the
    attention mask padded likewise, through transformers' tokenizer."""
    from transformers import CLIPTokenizerFast

    enc = CLIPTokenizerFast(tokenizer_file=str(tokenizer_file))(text=[text], return_tensors="pt")
    segments = (enc.input_ids.shape[1] - 1) // n + 1
    pad = n * segments - enc.input_ids.shape[1]
    return [torch.cat([v, v.new_zeros(1, pad)], 1).reshape(-1, n) for v in (enc.input_ids, enc.attention_mask)]


@torch.no_grad()
def test_text_tower_matches_transformers(clip_pair):
    _, clip, ours = clip_pair
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CLIP_START, (4, 16), generator=g)
    ids[:, 0] = CLIP_START
    mask = torch.ones_like(ids)
    for row, end in enumerate((16, 9, 5)):              # the end of text, then zero padding
        ids[row, end - 1] = CLIP_END
        ids[row, end:] = 0
        mask[row, end:] = 0
    ids[3, 0] = 7   # the last row has no start or end of text, as a middle chunk of a long instruction: the
    # pooling rules differ there (the largest id's place, or the first place)
    torch.testing.assert_close(ours.clip_text.encode_text(ids), hf_text_embeds(clip, ids, mask), atol=1e-5, rtol=0)


@torch.no_grad()
def test_patch_embeddings_are_clips_projection_of_the_feature_layer(clip_pair):
    hf, clip, ours = clip_pair
    px = random_pixels(2, seed=3)
    features = hf.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
    ref = clip.visual_projection(clip.vision_model.post_layernorm(features))
    got = ours.clip_text.visual_projection(ours.clip_text.post_norm(ours.vision(px)[0]))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


class RelevanceProbe(BeforeDecoder):
    """Keeps everything and records the relevance the model hands a method."""

    vision_score = "relevance"
    seen: ClassVar[list] = []

    def select(self, ctx):
        self.seen.append(ctx.vision_scores.clone())
        return ctx.image_mask.clone()


@torch.no_grad()
def test_relevance_is_the_mean_cosine_to_the_instructions_chunks(clip_pair, tmp_path):
    """A long question (two chunks of 16) read back from the prompt: each patch's relevance is minus its mean
    cosine similarity to the chunks' text embeddings (the official sign), computed here with transformers."""
    hf, clip, ours = clip_pair
    tok = Tokenizer.from_file(build_tokenizer(tmp_path / "tok.json"), bos_token_id=1, eos_token_id=2,
                              image_token_id=IMAGE_TOKEN)
    ids = torch.tensor([tok.first_turn(QUESTION, n_images=2)])
    px = random_pixels(2, seed=4)
    assert ours.clip_text.instruction(ids[0].tolist()) == tok.decode(tok.encode_text(QUESTION)).strip()
    RelevanceProbe.seen.clear()
    slots = ours.prefill(ids, px, prune=RelevanceProbe(ratio=0.0)).image_mask                    # both images
    (scores,) = RelevanceProbe.seen
    chunk_ids, chunk_mask = official_chunks(write_clip_checkpoint(clip, tmp_path / "clip") / "tokenizer.json",
                                            ours.clip_text.instruction(ids[0].tolist()), 16)
    assert len(chunk_ids) == 2
    text = F.normalize(hf_text_embeds(clip, chunk_ids, chunk_mask), dim=-1)
    features = hf.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
    image = F.normalize(clip.visual_projection(clip.vision_model.post_layernorm(features)), dim=-1)
    ref = -(image @ text.T).mean(-1)                                               # images, patches
    torch.testing.assert_close(scores[slots], ref.flatten(), atol=1e-5, rtol=0)
    assert (scores[~slots] == 0).all()


def test_the_short_answer_line_of_llavas_evaluation_is_left_out(clip_pair, tmp_path):
    _, _, ours = clip_pair
    tok = Tokenizer.from_file(build_tokenizer(tmp_path / "tok.json"), bos_token_id=1, eos_token_id=2,
                              image_token_id=IMAGE_TOKEN)
    ids = tok.first_turn("What colour is the square?\nAnswer the question using a single word or phrase.")
    assert ours.clip_text.instruction(ids) == ours.clip_text.instruction(tok.first_turn("What colour is the square?"))


@pytest.mark.parametrize("template", ["vicuna_v1", "mistral_instruct", "chatml"])
def test_the_instruction_is_the_last_turns_question(tmp_path, template):
    from tokenizers import Tokenizer as Raw

    raw = Raw.from_file(str(build_tokenizer(tmp_path / "tok.json")))
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(raw, bos_token_id=1, eos_token_id=2, image_token_id=IMAGE_TOKEN, template=template)
    question = "What colour is the square?"
    first = tok.first_turn(question, system="A chat.")
    assert tok.instruction(first) == question
    later = first + tok.encode_text("red") + [2] + tok.encode_turn("how many triangles are there")
    assert tok.instruction(later) == "how many triangles are there"


def test_save_quantize_and_load_keep_the_text_tower(clip_pair, tmp_path):
    hf, clip, ours = clip_pair
    src = tmp_path / "src"
    convert(write_hf_checkpoint(hf, src), tmp_path / "out", clip_text=write_clip_checkpoint(clip, tmp_path / "clip"),
            log=lambda _: None)
    quantize_checkpoint(tmp_path / "out", tmp_path / "int8", QuantConfig("int8"), log=lambda _: None)
    for path in (tmp_path / "out", tmp_path / "int8"):
        assert json.loads((path / "config.json").read_text())["clip_text"]["projection_dim"] == 24
        model = load(path, dtype=None)
        ids = torch.tensor([model.clip_text.tokenizers[0].first_turn(QUESTION)])
        torch.testing.assert_close(model.clip_text.directions(ids), ours.clip_text.directions(ids), atol=1e-6,
                                   rtol=0)
    (tmp_path / "int8" / CLIP_TOKENIZER).unlink()
    with pytest.raises(FileNotFoundError, match="clip_tokenizer.json: file not found"):
        load(tmp_path / "int8")
    model.clip_text.tokenizers = None   # a tower built in memory, its tokenizers never set: one line, no directory
    with pytest.raises(ValueError, match="save: the model's CLIP text tower has no CLIP tokenizer to write"):
        save(model, load_tokenizer(path), tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_conversion_refuses_a_clip_that_does_not_fit(clip_pair, tmp_path):
    hf, clip, _ = clip_pair
    src = write_hf_checkpoint(hf, tmp_path / "src")
    good = write_clip_checkpoint(clip, tmp_path / "clip")

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        return d

    def config_edit(change):
        def edit(d):
            c = json.loads((d / "config.json").read_text())
            change(c)
            (d / "config.json").write_text(json.dumps(c))
        return edit

    cases = {
        "no text_config": variant("vision-only", config_edit(lambda c: c.pop("text_config"))),
        "vision_config.hidden_size is 64": variant("wider", config_edit(
            lambda c: c["vision_config"].update(hidden_size=64))),
        "tokenizer.json: not found": variant("no-tok", lambda d: (d / "tokenizer.json").unlink()),
        "unknown tensor 'extra.weight'": variant("extra", lambda d: save_file(
            {**load_file(str(d / "model.safetensors")), "extra.weight": torch.zeros(2)}, str(d / "model.safetensors"))),
    }
    for i, (message, clip_dir) in enumerate(cases.items()):
        with pytest.raises(CheckpointError, match=message) if "not found" not in message else \
                pytest.raises(FileNotFoundError, match=message):
            convert(src, tmp_path / f"out{i}", clip_text=clip_dir, log=lambda _: None)
        assert not (tmp_path / f"out{i}").exists()


def test_a_model_without_the_tower_refuses_relevance(twin):
    _, ours = twin(n_kv_heads=2, seed=21)
    ids = torch.tensor([[1, 5, IMAGE_TOKEN, 6, 7]])
    with pytest.raises(ValueError, match="no CLIP text tower.*--clip-text DIR"):
        ours.prefill(ids, random_pixels(1), prune=RelevanceProbe(ratio=0.5))
