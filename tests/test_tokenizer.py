"""Prompt tokenization: LLaVA's split-on-<image> rule, checked against a direct transcription of it."""

import pytest
from tokenizers import Tokenizer as HFTokenizer

from minifastv.data import SAMPLES
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


def test_later_turn_is_vicuna_v1(tok):
    """LLaVA's vicuna_v1 template (roles USER and ASSISTANT, sep " ", sep2 "</s>") writes a later turn, after
    the previous answer's </s>, as "USER: q ASSISTANT:"."""
    roles, sep = ("USER", "ASSISTANT"), " "
    assert tok.encode_turn("Is it red?") == tok.encode_text(f"{roles[0]}: Is it red?{sep}{roles[1]}:")
    # With images (a server's later user message may carry them): each first, on its own line, split as LLaVA
    # splits a prompt at "<image>"
    assert tok.encode_turn("Is it red?", 2) == (tok.encode_text(f"{roles[0]}: ") + [IMAGE_ID]
                                               + tok.encode_text("\n") + [IMAGE_ID]
                                               + tok.encode_text(f"\nIs it red?{sep}{roles[1]}:"))


def test_decode_skips_special_and_image_ids(tok):
    ids = tok.encode_prompt("USER: <image>\nwhat colour") + [2]
    # Two spaces: "USER: " ends in one, and the chunk after the image starts with its own.
    assert tok.decode(ids) == "USER:  \nwhat colour"


def test_malformed_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.from_file(bad, bos_token_id=1, eos_token_id=2, image_token_id=3)


def llama_style_tokenizer() -> HFTokenizer:
    """A SentencePiece-style BPE like LLaMA's: "▁" marks spaces, 256 byte-fallback tokens <0x00>..<0xFF> for
    characters outside the vocabulary, and a decoder that turns bytes back into UTF-8 and strips the first space."""
    from tokenizers import decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for c in "\u2581abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("\u2581", "hello"), ("\u2581", "w"), ("o", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


def test_streamed_text_is_the_full_decode():
    """Subwords ("w" + "or" + "l" + "d") join without spaces; "ö" (2 bytes) and "日" (3 bytes) arrive as
    byte-fallback tokens and appear once complete; the leading space is stripped as decode() strips it."""
    tok = Tokenizer(llama_style_tokenizer(), bos_token_id=1, eos_token_id=2, image_token_id=IMAGE_ID)
    ids = tok.tok.encode("hello world wörld 日 hello", add_special_tokens=False).ids + [2]
    pieces = [tok.tok.id_to_token(i) for i in ids]
    assert "<0xC3>" in pieces and "<0xE6>" in pieces and "or" in pieces  # bytes and subwords are there
    text = tok.text_stream()
    streamed = [text.push(i) for i in ids]
    assert "".join(streamed) == tok.decode(ids) == "hello world wörld 日 hello"
    assert "" in streamed  # an incomplete character waits
    assert " ".join(tok.decode([i]) for i in ids) != tok.decode(ids)  # what decoding token by token gave


def test_streamed_text_never_decodes_an_image_placeholder():
    """An image id among the generated ids (a model may emit it: it is a vocabulary entry in llava-hf) is not
    text: the stream skips it as decode() does, and the text around it is unchanged."""
    inner = llama_style_tokenizer()
    image = inner.token_to_id("hello")  # a vocabulary entry whose text would show if it were decoded
    tok = Tokenizer(inner, bos_token_id=1, eos_token_id=2, image_token_id=image)
    words = tok.tok.encode("world wide", add_special_tokens=False).ids
    ids = words[:1] + [image] + words[1:] + [image]
    text = tok.text_stream()
    streamed = [text.push(i) for i in ids]
    assert streamed[1] == streamed[-1] == ""
    assert "".join(streamed) == tok.decode(ids) == tok.decode(words) == "world wide"


def test_cli_streams_the_full_decode(monkeypatch):
    """The generate command's streamed pieces join to the text it reports, on the same tokenizer."""
    import torch

    import minifastv.pipeline
    import train_tiny
    from minifastv.pipeline import Pipeline

    model = train_tiny.build_model(train_tiny.build_tokenizer(), seed=0)
    tok = Tokenizer(llama_style_tokenizer(), bos_token_id=1, eos_token_id=2,
                    image_token_id=model.config.image_token_id)
    ids = tok.tok.encode("wörld 日本 hello", add_special_tokens=False).ids

    class FakeStream:  # the "generation": these ids, then EOS, and the real model's report of its prefill
        def __init__(self, model, *args, **kwargs):  # (the prompt's ids belong to the other tokenizer)
            self.prefill = model.prefill(torch.tensor([[1, model.config.image_token_id]]), kwargs["pixel_values"])

        def __iter__(self):
            return ((torch.tensor([i]), None) for i in ids + [2])

    monkeypatch.setattr(minifastv.pipeline, "stream", FakeStream)
    pieces = []
    image = SAMPLES / "heldout_0.png"
    r = Pipeline(model, tok).answer([image], "what is it?", on_text=pieces.append)
    assert "".join(pieces) == r.text == tok.decode(ids) == "wörld 日本 hello"
