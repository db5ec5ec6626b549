"""A tiktoken vocabulary (a `.tiktoken` file: one base64 token and its rank per line) as a `tokenizers` byte-level
BPE, so that a model whose tokenizer is tiktoken's (Qwen-VL) runs on the core dependency, offline.

tiktoken encodes a piece of text (one match of its split pattern) by merging, again and again, the adjacent pair
whose concatenation has the lowest rank. A `tokenizers` BPE merges by a list of pairs instead. The two agree when
each token's pair is the one tiktoken's own merging reaches just before that token's rank, listed in rank order;
`merges` finds that pair by running tiktoken's merging on the token's bytes with the later ranks held back.
A piece that is itself a token is that token (ignore_merges), as in tiktoken. Bytes are written as GPT-2's
printable characters (`byte_chars`), as every byte-level BPE in `tokenizers` writes them.

Qwen's tokenizer NFC-normalises the text with Python's unicodedata first; here the `tokenizers` library's NFC does
it. They differ only where the two follow different Unicode versions (e.g. U+07FD, a combining mark since Unicode
11 that the library does not reorder), so ids may differ on such characters, and only there.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# Qwen's split pattern and its special tokens, which follow its 151,643 ranks in this order (tokenization_qwen.py):
# the end of text, the chat markers, 205 spares, then the grounding and image tags.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)),
                "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")


def qwen_special(n_ranks: int) -> dict[str, int]:
    """Qwen's special tokens -> their ids, after a vocabulary of n_ranks ranks (151,643: <img> is 151,857)."""
    return {name: n_ranks + i for i, name in enumerate(QWEN_SPECIAL)}


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """token bytes -> rank, from a .tiktoken file; a malformed line is a one-line error naming it."""
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{path}: line {n} is not 'base64-token rank' ({line[:60]!r})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def byte_chars() -> list[str]:
    """GPT-2's map from a byte to a printable character: printable Latin-1 bytes stand for themselves, the others
    (controls, space, ...) take the characters from 256 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def split_before(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The last pair tiktoken merges into `token`: its merging of the token's bytes with only lower ranks."""
    parts, limit = [token[i:i + 1] for i in range(len(token))], ranks[token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], limit))
        if ranks.get(parts[best] + parts[best + 1], limit) >= limit:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not one merge of two lower-ranked tokens")
    return parts[0], parts[1]


def merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every token longer than a byte as the pair it is merged from, in rank order."""
    return [split_before(token, ranks) for token in sorted(ranks, key=ranks.get) if len(token) > 1]


def tokenizer_from_ranks(ranks: dict[bytes, int], pattern: str, special: dict[str, int],
                         nfc: bool = True) -> Tokenizer:
    """A `tokenizers` Tokenizer that encodes as tiktoken.Encoding(pat_str=pattern, mergeable_ranks=ranks,
    special_tokens=special) does with every special token allowed in the text (and, with nfc, after Unicode NFC
    normalisation, as Qwen's tokenizer does before tiktoken)."""
    chars = byte_chars()
    text = lambda token: "".join(chars[b] for b in token)
    vocab = {text(token): rank for token, rank in ranks.items()}
    bpe = models.BPE(vocab, [(text(a), text(b)) for a, b in merges(ranks)], ignore_merges=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC() if nfc else None
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    for name, token_id in sorted(special.items(), key=lambda item: item[1]):
        if token_id != tok.get_vocab_size(with_added_tokens=True):
            raise ValueError(f"special token {name!r} has id {token_id}; the next free id is "
                             f"{tok.get_vocab_size(with_added_tokens=True)} (special ids follow the ranks, in order)")
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    return tok
