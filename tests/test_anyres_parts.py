"""The named treatments of LLaVA-NeXT's packed image tokens (pruning/anyres_parts.py): newlines kept, and the
base image and the tiles ranked apart, each checked against a selection made here by hand from FastV's own
criterion (the unpruned pass's layer K-1 attention of the last slot), in a left-padded batch as alone."""

import pytest
import torch
from helpers import write_hf_checkpoint
from test_anyres import noise
from test_llava_next import hf_llava_next

from minifastv import Pipeline, anyres
from minifastv.convert import convert
from minifastv.pruning import AnyresParts, DivPrune, FastV, Pool, Pruner, RandomDrop, Stage

QUESTION = "What colour is the square?"
IMAGES = [noise(90, 40, seed=1), noise(30, 70, seed=2)]   # wide and tall: different canvases and borders


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parts")
    return Pipeline.load(convert(write_hf_checkpoint(hf_llava_next(), tmp / "src"), tmp / "out", log=lambda _: None),
                         dtype="float32")


def batch_of(pipe, images):
    return pipe.questions([([image], QUESTION) for image in images])


def test_parts_label_the_tokens_as_pack_lays_them_out():
    """BASE for the base image's cells, then each unpadded grid row's TILE cells and its NEWLINE, as long as the
    image's token count, the NEWLINE labels exactly where pack writes the newline vector."""
    size, patch, pinpoints = 28, 7, ((28, 56), (56, 28), (56, 56))
    for height, width in ((40, 90), (70, 30), (56, 56), (10, 12)):
        labels = anyres.parts(height, width, size, patch, pinpoints)
        n_tiles = anyres.n_tiles(height, width, size, pinpoints)
        packed = anyres.pack(torch.rand(1 + n_tiles, 16, 3), height, width, size, pinpoints, torch.full((3,), 7.0))
        assert len(labels) == len(packed) == anyres.n_tokens(height, width, size, patch, pinpoints)
        assert torch.equal(labels == anyres.NEWLINE, (packed == 7.0).all(1))
        assert (labels[:16] == anyres.BASE).all() and (labels[16:] != anyres.BASE).all()


def fastv_scores(pipe, batch, k=2):
    """FastV's criterion by hand: the unpruned pass's head-mean attention of the last slot at layer k - 1."""
    out = pipe.model.prefill(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask,
                             attention_rows=1, **batch.visual_inputs())
    return out.attention[k - 1][:, 0], out.image_mask


def top(scores, mask, n):
    return set(torch.where(mask, scores, float("-inf")).topk(n).indices.tolist()) if n else set()


@pytest.mark.parametrize("keep_newlines, apart", [(True, False), (False, True), (True, True)])
def test_each_treatment_keeps_what_a_hand_made_selection_keeps(pipe, keep_newlines, apart):
    batch = batch_of(pipe, IMAGES)
    scores, image_mask = fastv_scores(pipe, batch)
    parts = pipe.model.parts(batch.input_ids, batch.image_sizes)
    method = AnyresParts(FastV(2, 0.5), keep_newlines=keep_newlines, apart=apart)
    got = pipe.model.prefill(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask, prune=method,
                             **batch.visual_inputs())
    for b, kept in enumerate(got.kept_image_slots()):
        n_keep = round(0.5 * int(image_mask[b].sum()))
        expected, budget = set(), n_keep
        newline = parts[b] == anyres.NEWLINE
        if keep_newlines:
            expected |= set(newline.nonzero()[:, 0].tolist())
            budget -= int(newline.sum())
        candidates = (parts[b] > 0) & ~(newline if keep_newlines else torch.zeros_like(newline))
        if apart:
            base = parts[b] == anyres.BASE
            n_base = round(budget * int(base.sum()) / int(candidates.sum()))
            expected |= top(scores[b], base, n_base) | top(scores[b], candidates & ~base, budget - n_base)
        else:
            expected |= top(scores[b], candidates, budget)
        assert set(kept) == expected and len(kept) == n_keep
        alone = batch_of(pipe, IMAGES[b:b + 1])
        single = pipe.model.prefill(alone.input_ids, alone.pixel_values, prune=method, **alone.visual_inputs())
        assert torch.allclose(single.logits[0, -1], got.logits[b, -1], atol=1e-5)   # batch = alone


def test_the_default_ranks_one_set_and_the_options_differ_from_it(pipe):
    """FastV alone drops newline tokens on this image; with newlines kept none is dropped, at the same count."""
    batch = batch_of(pipe, IMAGES[:1])
    run = lambda m: set(pipe.model.prefill(batch.input_ids, batch.pixel_values, prune=m,
                                           **batch.visual_inputs()).kept_image_slots()[0])
    parts = pipe.model.parts(batch.input_ids, batch.image_sizes)[0]
    newlines = set((parts == anyres.NEWLINE).nonzero()[:, 0].tolist())
    plain, kept = run(FastV(2, 0.75)), run(AnyresParts(FastV(2, 0.75), keep_newlines=True))
    assert not newlines <= plain and newlines <= kept and len(plain) == len(kept)


class TwoStages(Pruner):
    """Scores by the hidden state's norm, before layers 1 and 2 (a stand-in for PyramidDrop on 3 layers)."""

    def stages(self, n_layers):
        return [Stage(1, 0.7), Stage(2, 0.7, 1)]

    def select(self, ctx):
        return ctx.hidden.float().norm(dim=-1)


def test_multi_stage_and_before_decoder_methods_keep_the_newlines_at_every_stage(pipe):
    """A later stage sees the slots left by the earlier one (the parts follow them); DivPrune selects before
    the decoder with a mask."""
    batch = batch_of(pipe, IMAGES)
    parts = pipe.model.parts(batch.input_ids, batch.image_sizes)
    for method in (TwoStages(), DivPrune(ratio=0.6)):
        got = pipe.model.prefill(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask,
                                 prune=AnyresParts(method, keep_newlines=True), **batch.visual_inputs())
        for b, kept in enumerate(got.kept_image_slots()):
            assert set((parts[b] == anyres.NEWLINE).nonzero()[:, 0].tolist()) <= set(kept)


def test_the_options_refuse_what_they_cannot_do(pipe, tiny_pipe):
    with pytest.raises(ValueError, match="needs keep_newlines or apart"):
        AnyresParts(FastV())
    with pytest.raises(ValueError, match="Pool merges the tokens it drops"):
        AnyresParts(Pool(ratio=0.5), apart=True)
    with pytest.raises(ValueError, match="takes a pruning method"):
        AnyresParts("fastv", apart=True)
    with pytest.raises(ValueError, match="views-apart option applies to LLaVA-NeXT's images"):
        tiny_pipe.answer(["minifastv/data/samples/heldout_0.png"], "what?", prune=AnyresParts(FastV(), apart=True))
    batch = batch_of(pipe, IMAGES[:1])
    with pytest.raises(ValueError, match=r"newlines-kept: a sample keeps \[\d+\] image tokens, fewer than its"):
        pipe.model.prefill(batch.input_ids, batch.pixel_values, prune=AnyresParts(FastV(2, 0.95), keep_newlines=True),
                           **batch.visual_inputs())


def test_the_command_line_names_the_treatment_and_needs_a_method(tmp_path, capsys):
    """--anyres wraps the method the other flags give (analyze's default, FastV, too); without a method it is
    an error, and on a model without tiles a one-line one."""
    import argparse

    from minifastv.cli import main
    from minifastv.options import describe, model_arguments, pruner_from_args

    p = argparse.ArgumentParser()
    model_arguments(p, anyres=True)
    method = pruner_from_args(p.parse_args(["--prune", "random", "--prune-ratio", "0.3", "--anyres",
                                            "newlines-kept+views-apart"]))
    assert method == AnyresParts(RandomDrop(ratio=0.3), keep_newlines=True, apart=True)
    assert describe(method) == "RandomDrop K=2 R=0.3 seed=0, newlines-kept+views-apart"
    assert pruner_from_args(p.parse_args(["--anyres", "views-apart"]), default=FastV()) == AnyresParts(FastV(),
                                                                                                       apart=True)
    with pytest.raises(ValueError, match="--anyres views-apart treats a pruning method's choice: give one"):
        pruner_from_args(p.parse_args(["--anyres", "views-apart"]))
    assert main(["generate", "--image", "minifastv/data/samples/heldout_0.png", "--prompt", "what?", "--prune", "fastv",
                 "--anyres", "newlines-kept"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the newlines-kept option applies to LLaVA-NeXT's images, and this model has no tiles")



@pytest.mark.parametrize("sizes", [[[0, 40]], [[40, 90, 1]], [40, 90]])
def test_bad_image_sizes_get_the_models_own_error_not_the_parts(pipe, sizes):
    batch = batch_of(pipe, IMAGES[:1])
    with pytest.raises(ValueError, match="image_sizes must be"):
        pipe.model.prefill(batch.input_ids, batch.pixel_values, image_sizes=torch.tensor(sizes),
                           prune=AnyresParts(FastV(), apart=True))
