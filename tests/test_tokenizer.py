"""Prompt tokenization: LLaVA's split-on-<image> rule, checked against a direct transcription of it."""

import pytest
from tokenizers import Tokenizer as HFTokenizer

from minifastv.tokenizer import Tokenizer, chat_prompt

IMAGE_ID = 7000  # outside the vocabulary on purpose, like the original LLaVA's -200


def reference_tokenizer_image_token(tok: HFTokenizer, prompt: str, image_id: int, bos_id: int):
    """LLaVA's tokenizer_image_token: tokenize each chunk WITH special tokens, then drop the repeated BOS of
    every chunk but the first, joining with the image id."""
    chunks = [tok.encode(c).ids for c in prompt.split("<image>")]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == bos_id else 0
    ids = chunks[0][:offset]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_id)
        ids.extend(chunk[offset:])
    return ids


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return Tokenizer.from_file(tokenizer_json, bos_token_id=1, eos_token_id=2, image_token_id=IMAGE_ID)


@pytest.mark.parametrize("prompt", [
    chat_prompt("What colour is the square?"),
    chat_prompt("how many triangles are there", n_images=2),
    "<image>\nIs there a circle?",
    "USER: compare <image> and <image>",
    "no image at all",
    "",
])
def test_prompt_ids_follow_llava_rule(tok, tokenizer_json, prompt):
    ids = tok.encode_prompt(prompt)
    assert ids == reference_tokenizer_image_token(HFTokenizer.from_file(str(tokenizer_json)), prompt, IMAGE_ID, 1)
    assert ids[0] == 1 and ids.count(1) == 1
    assert ids.count(IMAGE_ID) == prompt.count("<image>")


def test_chunk_after_image_is_tokenized_afresh(tok):
    # "\nIs" after an image starts a new chunk, so the Metaspace "first" scheme adds its leading marker again.
    ids = tok.encode_prompt("USER: what<image>\nIs")
    tail = ids[ids.index(IMAGE_ID) + 1:]
    assert tail == tok.tok.encode("\nIs", add_special_tokens=False).ids
    assert [tok.tok.id_to_token(i) for i in tail] == ["\u2581", "\n", "Is"]


def test_chat_prompt_is_vicuna_v1():
    assert chat_prompt("Q?") == ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                                 "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
                                 "Q? ASSISTANT:")


def test_decode_skips_special_and_image_ids(tok):
    ids = tok.encode_prompt("USER: <image>\nwhat colour") + [2]
    # Two spaces: "USER: " ends in one, and the chunk after the image starts with its own.
    assert tok.decode(ids) == "USER:  \nwhat colour"


def test_malformed_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.from_file(bad, bos_token_id=1, eos_token_id=2, image_token_id=3)
