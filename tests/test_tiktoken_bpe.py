"""tiktoken ranks as a `tokenizers` BPE (minifastv/tiktoken_bpe.py) against tiktoken itself (a test-only
reference), on a vocabulary trained here with Qwen's split pattern and special tokens: the same ids on text with
Chinese, emoji, code, whitespace runs and every special token, and the text back from the ids."""

import base64
import unicodedata

import pytest
import tiktoken
from tiktoken._educational import bpe_train

from minifastv.tiktoken_bpe import (
    QWEN_PATTERN,
    byte_chars,
    merges,
    qwen_special,
    read_ranks,
    split_before,
    tokenizer_from_ranks,
)

TRAIN = ("The quick brown fox jumps over the lazy dog. It's what they'd say; we've seen it, I'm sure.\n"
         "def area(radius):\n    return 3.14159 * radius ** 2  # 圆的面积\n\n\tprint(area(2))\r\n"
         "这张图片里有一只猫和一只狗。你好，世界！请描述这张图片。图片里有什么？\n"
         "emoji 😀🎉👍🏽 👨‍👩‍👧 café naïve Ñandú 1234567890   spaces\u00a0and\u3000more\n") * 4
HELD_OUT = [
    "The lazy fox said: it's 42, isn't it?  Really?!\n\n",
    "def radius(area):\r\n\treturn (area / 3.14159) ** 0.5\n    # 面积 -> 半径",
    "图片里有一只猫吗？有，一只黑猫。你好！",
    "😀😀😀 👍🏽👍🏿 👨‍👩‍👧‍👦 🇨🇳 ✨",
    "e\u0301 cafe\u0301 Å (composed by NFC) 12345678901234567890",
    "   leading\t\ttabs and trailing spaces   \n \n\n",
    ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1: <img>cat.png</img>\n"
     "What is in it?<|im_end|>\n<|im_start|>assistant\n"),
    "".join(qwen_special(0)),                     # every special token, back to back
    "words<|endoftext|>glued<|extra_204|>to<imgpad>specials",
    "zzzz qqqq xxxx ÿÿÿ \x00\x01\x7f",             # bytes the training text never had
]


@pytest.fixture(scope="module")
def vocabulary():
    ranks = bpe_train(TRAIN, 420, QWEN_PATTERN, visualise=None)
    special = qwen_special(len(ranks))
    reference = tiktoken.Encoding("qwen-test", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    return ranks, special, reference


@pytest.mark.parametrize("text", HELD_OUT)
def test_ids_equal_tiktokens_and_decode_back(vocabulary, text):
    ranks, special, reference = vocabulary
    tok = tokenizer_from_ranks(ranks, QWEN_PATTERN, special)
    ids = tok.encode(text, add_special_tokens=False).ids
    normalised = unicodedata.normalize("NFC", text)   # as Qwen's tokenizer does before tiktoken
    assert ids == reference.encode(normalised, allowed_special="all")
    assert tok.decode(ids, skip_special_tokens=False) == normalised
    if text == HELD_OUT[3]:
        assert len(ids) > len(text.encode()) // 4    # emoji are mostly bytes here: the test reaches byte pieces


def test_the_same_after_a_save_and_load(vocabulary, tmp_path):
    ranks, special, reference = vocabulary
    tokenizer_from_ranks(ranks, QWEN_PATTERN, special).save(str(tmp_path / "tokenizer.json"))
    from tokenizers import Tokenizer
    loaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "\n".join(HELD_OUT)
    assert loaded.encode(text, add_special_tokens=False).ids == reference.encode(
        unicodedata.normalize("NFC", text), allowed_special="all")
    assert loaded.token_to_id("<img>") == len(ranks) + 214 and loaded.token_to_id("<|endoftext|>") == len(ranks)


def test_merges_are_the_pairs_tiktoken_reaches_in_rank_order(vocabulary):
    ranks, _, _ = vocabulary
    pairs = merges(ranks)
    assert len(pairs) == len(ranks) - 256
    assert [ranks[a + b] for a, b in pairs] == sorted(ranks[a + b] for a, b in pairs)
    # A token whose bytes could be split two ways is split as tiktoken merges it: lower ranks first.
    toy = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"bc": 257, b"abc": 258}
    assert split_before(b"abc", toy) == (b"ab", b"c")
    toy = {bytes([b]): b for b in range(256)} | {b"bc": 256, b"ab": 257, b"abc": 258}
    assert split_before(b"abc", toy) == (b"a", b"bc")


def test_byte_chars_are_gpt2s():
    chars = byte_chars()
    assert len(set(chars)) == 256 and chars[ord("a")] == "a" and chars[ord(" ")] == "Ġ" and chars[ord("\n")] == "Ċ"


def test_a_bad_tiktoken_file_is_one_line_naming_it(tmp_path):
    good = b"\n".join(base64.b64encode(bytes([b])) + b" %d" % b for b in range(256))
    path = tmp_path / "qwen.tiktoken"
    path.write_bytes(good + b"\nnot-base64!! 256\n")
    with pytest.raises(ValueError, match=r"qwen.tiktoken: line 257 is not 'base64-token rank'"):
        read_ranks(path)
    path.write_bytes(good + b"\n" + base64.b64encode(b"ab") + b" 300\n")
    with pytest.raises(ValueError, match=r"ranks are not 0..256, each once"):
        read_ranks(path)
    path.write_bytes(good + b"\n" + base64.b64encode(b"abc") + b" 256\n")
    with pytest.raises(ValueError, match=r"b'abc' \(rank 256\) is not one merge of two lower-ranked tokens"):
        merges(read_ranks(path))
    with pytest.raises(ValueError, match="special token '<img>' has id 9; the next free id is 256"):
        tokenizer_from_ranks({bytes([b]): b for b in range(256)}, QWEN_PATTERN, {"<img>": 9})
