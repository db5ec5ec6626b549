"""Inputs in one place (prompt ids, pixels, left padding, training labels) and the training loss the model
computes from them."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_tiny
from minifastv.inputs import IGNORE, conversations, encode_conversation, left_pad, questions
from minifastv.pipeline import Pipeline
from shapes import conversation, draw


@pytest.fixture(scope="module")
def pipe():
    tok = train_tiny.build_tokenizer()
    return Pipeline(train_tiny.build_model(tok, seed=3).eval(), tok)


def test_left_pad_right_aligns_rows_and_labels():
    ids, mask, labels = left_pad([[5, 6, 7], [8]], pad_id=0, labels=[[IGNORE, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert labels.tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, 8]]


def test_questions_put_images_in_prompt_order(pipe):
    size = pipe.model.config.vision.image_size
    red, blue, green = (Image.new("RGB", (size, size), c) for c in ("red", "blue", "green"))
    batch = questions(pipe.tokenizer, pipe.model.config, [([red, blue], "what colour is the circle?"),
                                                        ([green], "which shape is in row one column one?")])
    image_id = pipe.tokenizer.image_token_id
    assert (batch.input_ids == image_id).sum(1).tolist() == [2, 1]
    assert batch.attention_mask[:, -1].all() and batch.pixel_values.shape[0] == 3
    # sample 0's images first, each in prompt order: red has the largest first channel, green the second
    assert batch.pixel_values[:, 0].mean((1, 2)).argmax() == 0 and batch.pixel_values[:, 2].mean((1, 2)).argmax() == 1
    assert batch.pixel_values[:, 1].mean((1, 2)).argmax() == 2


def test_conversation_labels_are_the_answers_only(pipe):
    tok = pipe.tokenizer
    ids, labels = encode_conversation(tok, [("what colour is the circle?", "red"),
                                            ("how many shapes are in row one?", "two")])
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert trained == [tok.tok.token_to_id("red"), tok.eos_token_id, tok.tok.token_to_id("two"), tok.eos_token_id]
    assert all(lab in (IGNORE, t) for t, lab in zip(ids, labels))


@torch.no_grad()
def test_loss_ignores_prompt_tokens_and_counts_answers(pipe):
    """The model's loss equals cross-entropy over the answer tokens only, computed here from its logits
    at the merged positions; changing a prompt token's label changes nothing, an answer's label does."""
    size = pipe.model.config.vision.image_size
    dialogues = [([draw(conversation("train", i)[0], size)], conversation("train", i)[1][:2]) for i in range(3)]
    batch = conversations(pipe.tokenizer, pipe.model.config, dialogues)
    loss = pipe.model.loss(batch.input_ids, batch.pixel_values, batch.labels, attention_mask=batch.attention_mask)

    logits = pipe.model(**batch.model_inputs())
    n_patches = pipe.model.config.vision.n_patches
    terms = []
    for b in range(3):
        image_at = int((batch.input_ids[b] == pipe.tokenizer.image_token_id).nonzero())
        for t in range(batch.input_ids.shape[1]):
            if batch.labels[b, t] != IGNORE:
                merged = t + (n_patches - 1 if t > image_at else 0)   # every row holds one image
                terms.append(F.cross_entropy(logits[b, merged - 1].float(), batch.labels[b, t]))
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)

    prompt_changed = batch.labels.clone()
    prompt_changed[batch.labels == IGNORE] = 5      # labels on prompt tokens would now be trained on
    prompt_changed[batch.attention_mask == 0] = IGNORE
    assert not torch.allclose(pipe.model.loss(batch.input_ids, batch.pixel_values, prompt_changed,
                                              attention_mask=batch.attention_mask), loss)
    answer_changed = batch.labels.clone()
    answer_changed[0, int((batch.labels[0] != IGNORE).nonzero()[0])] = 5
    assert not torch.allclose(pipe.model.loss(batch.input_ids, batch.pixel_values, answer_changed,
                                              attention_mask=batch.attention_mask), loss)


@torch.no_grad()
def test_two_images_in_a_training_sample_keep_their_order(pipe):
    """A dialogue about two images: the pixels go in prompt order, the loss places each answer after both
    images' patches (merged positions), and swapping the images changes the loss."""
    size = pipe.model.config.vision.image_size
    a, b = (draw(conversation("train", i)[0], size) for i in (1, 2))
    turns = conversation("train", 1)[1][:2]
    batch = conversations(pipe.tokenizer, pipe.model.config, [([a, b], turns)])
    swapped = conversations(pipe.tokenizer, pipe.model.config, [([b, a], turns)])
    assert torch.equal(batch.pixel_values[0], swapped.pixel_values[1])
    loss = pipe.model.loss(batch.input_ids, batch.pixel_values, batch.labels, attention_mask=batch.attention_mask)
    logits = pipe.model(**batch.model_inputs())[0]
    n_patches = pipe.model.config.vision.n_patches
    images_before = (batch.input_ids[0] == pipe.tokenizer.image_token_id).cumsum(0)
    terms = [F.cross_entropy(logits[t + int(images_before[t]) * (n_patches - 1) - 1].float(), batch.labels[0, t])
             for t in range(batch.input_ids.shape[1]) if batch.labels[0, t] != IGNORE]
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)
    other = pipe.model.loss(swapped.input_ids, swapped.pixel_values, swapped.labels,
                            attention_mask=swapped.attention_mask)
    assert not torch.allclose(loss, other)
