"""Tokenizer: a thin layer over the `tokenizers` library that knows about images, videos and the vicuna_v1
template."""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer as _Tokenizer
from tokenizers.decoders import DecodeStream

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
FRAME_MARKER = "<frame>"  # a video model with the original's prompt layout writes a video as one per frame
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def media(n_images: int, n_videos: int = 0, template: str = "vicuna_v1") -> str:
    """The markers a turn starts with: images first, then videos, each on its own line. Qwen-VL writes each image
    as "Picture i: <img>...</img>" (its from_list_format), numbered from 1 in each turn."""
    if template == "qwen":
        return "".join(f"Picture {i}: <img>{IMAGE_MARKER}</img>\n" for i in range(1, n_images + 1))
    return (IMAGE_MARKER + "\n") * n_images + (VIDEO_MARKER + "\n") * n_videos


# The conversation templates, as LLaVA's conversation.py lays them out: per name, (the first turn from the system
# line s (may be ""), the turn's media markers m and question q; a later turn, after the previous answer and its
# EOS). vicuna_v1: LLaVA-1.5, Video-LLaVA, LLaVA-NeXT on Vicuna; mistral_instruct: LLaVA-NeXT on Mistral-7B-Instruct
# (no system line); chatml: LLaVA-NeXT-34B on Nous-Hermes-2-Yi (its EOS is <|im_end|>); qwen: Qwen-VL-Chat, ChatML
# as its make_context lays it out, with its own image lines (media) and no BOS (NO_BOS).
TEMPLATES = {
    "vicuna_v1": (lambda s, m, q: f"{s + ' ' if s else ''}USER: {m}{q} ASSISTANT:",
                  lambda m, q: f"USER: {m}{q} ASSISTANT:"),
    "mistral_instruct": (lambda s, m, q: f"[INST] {m}{q} [/INST]", lambda m, q: f"[INST] {m}{q} [/INST]"),
    "chatml": (lambda s, m, q: (f"<|im_start|>system\n{s}<|im_end|>\n" if s else "")
               + f"<|im_start|>user\n{m}{q}<|im_end|>\n<|im_start|>assistant\n",
               lambda m, q: f"\n<|im_start|>user\n{m}{q}<|im_end|>\n<|im_start|>assistant\n"),
}
TEMPLATES["qwen"] = TEMPLATES["chatml"]
NO_BOS = {"qwen"}


def chat_prompt(question: str, n_images: int = 1, system: str = VICUNA_SYSTEM, n_videos: int = 0,
                template: str = "vicuna_v1") -> str:
    """A conversation's first turn (LLaVA-1.5's vicuna_v1 unless `template` names another; Video-LLaVA's llava_v1
    is vicuna_v1 with its own system line; "" leaves it out); images and videos go first, each on its own line."""
    return TEMPLATES[template][0](system, media(n_images, n_videos, template), question)


class Tokenizer:
    def __init__(self, tokenizer: _Tokenizer, *, bos_token_id: int, eos_token_id: int, image_token_id: int,
                 video_token_id: int | None = None, frame_token_id: int | None = None, n_frames: int = 0,
                 template: str = "vicuna_v1"):
        self.tok, self.template = tokenizer, template   # template: the conversation layout (TEMPLATES)
        self.bos_token_id = None if template in NO_BOS else bos_token_id   # None: prompts start without one
        self.eos_token_id, self.image_token_id = eos_token_id, image_token_id
        self.video_token_id = video_token_id  # None: the model takes no video, and "<video>" is plain text
        self.markers = {IMAGE_MARKER: image_token_id, **({VIDEO_MARKER: video_token_id} if video_token_id is not None
                                                         else {})}
        # The original Video-LLaVA's layout: "<video>" is written as n_frames frame placeholders joined by spaces.
        self.n_frames = n_frames
        if frame_token_id is not None:
            self.markers[FRAME_MARKER] = frame_token_id
        # A word-level vocabulary (the tiny model's) maps every word it lacks to one unknown token: those words
        # are reported rather than read as <unk>. (LLaMA's tokenizer falls back to bytes and knows them all.)
        unk = getattr(tokenizer.model, "unk_token", None) if type(tokenizer.model).__name__ == "WordLevel" else None
        self.unk_token_id = tokenizer.get_vocab().get(unk) if isinstance(unk, str) else None

    @classmethod
    def from_file(cls, path: str | Path, **ids) -> Tokenizer:
        try:
            tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions with terse messages
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls(tok, **ids)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        """BOS (unless the template has none: NO_BOS), then each text chunk between "<image>" (and, for a video
        model, "<video>") markers tokenized on its own, joined by one placeholder id per marker.

        This is LLaVA's tokenizer_image_token: chunks are tokenized separately (so a chunk after an image
        starts afresh, e.g. with SentencePiece's leading space), and BOS appears once, at the start.
        """
        ids = [] if self.bos_token_id is None else [self.bos_token_id]
        if FRAME_MARKER in self.markers:
            prompt = prompt.replace(VIDEO_MARKER, " ".join([FRAME_MARKER] * self.n_frames))
        pieces = re.split("(" + "|".join(map(re.escape, self.markers)) + ")", prompt)
        for i, piece in enumerate(pieces):
            ids.extend([self.markers[piece]] if i % 2 else self.encode_text(piece))
        return ids

    def encode_turn(self, question: str, n_images: int = 0, n_videos: int = 0) -> list[int]:
        """A later turn of the conversation, after the previous answer and its EOS (vicuna_v1: "USER: q
        ASSISTANT:"), its images and videos (if any) first, each on its own line, as in chat_prompt."""
        ids = self.encode_prompt(TEMPLATES[self.template][1](media(n_images, n_videos, self.template), question))
        return ids if self.bos_token_id is None else ids[1:]

    def first_turn(self, question: str, n_images: int = 1, system: str = VICUNA_SYSTEM, n_videos: int = 0):
        """The ids of a conversation's first turn (BOS first) in this tokenizer's template."""
        return self.encode_prompt(chat_prompt(question, n_images, system, n_videos, self.template))

    def encode_text(self, text: str) -> list[int]:
        """Ids of plain text (no BOS); words the vocabulary lacks are an error that names them."""
        encoding, text = self.encode_known(text)
        unknown = [text[a:b] for t, (a, b) in zip(encoding.ids, encoding.offsets) if t == self.unk_token_id]
        if unknown:
            unknown, words = list(dict.fromkeys(unknown)), self.known_words()
            raise ValueError(f"the tokenizer does not know {', '.join(map(repr, unknown))}: the model cannot read "
                             f"{'it' if len(unknown) == 1 else 'them'}. Its vocabulary is these {len(words)} words and "
                             f"signs: {' '.join(words)}")
        return encoding.ids

    def known_words(self) -> list[str] | None:
        """A word-level vocabulary's words and signs, sorted (the tiny models'); None for a subword tokenizer."""
        if self.unk_token_id is None:
            return None
        return sorted(w for w in self.tok.get_vocab() if not (w.startswith("<") and w.endswith(">") and len(w) > 2))

    def encode_known(self, text: str):
        """(encoding, the text encoded): a word the vocabulary lacks is tried in lower case (the tiny model's
        vocabulary is lower-case), so "What" reads as "what" there and stays "What" where the vocabulary has it."""
        encoding = self.tok.encode(text, add_special_tokens=False)
        spans = [span for t, span in zip(encoding.ids, encoding.offsets) if t == self.unk_token_id]
        if not spans:
            return encoding, text
        for a, b in reversed(spans):
            text = text[:a] + text[a:b].lower() + text[b:]
        return self.tok.encode(text, add_special_tokens=False), text

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) not in self.markers.values()]
        return self.tok.decode(ids, skip_special_tokens=True)

    def instruction(self, ids) -> str:
        """The question of a prompt's last turn, read back from its ids: the text after its last image or video
        placeholder (the whole prompt without one) and after the last turn's opening (vicuna_v1's "USER:"), without
        the template's closing ("ASSISTANT:")."""
        ids = [int(i) for i in ids]
        marks = [i for i, t in enumerate(ids) if t in self.markers.values()]
        text = self.decode(ids[marks[-1] + 1:] if marks else ids)
        opening, closing = (self.decode(self.encode_known(part)[0].ids).strip()
                            for part in TEMPLATES[self.template][1]("\0", "").split("\0"))
        text = text.strip()
        text = text[:len(text) - len(closing)] if closing and text.endswith(closing) else text
        return (text[text.rfind(opening) + len(opening):] if opening and opening in text else text).strip()

    def text_stream(self) -> TextStream:
        """An incremental decoder for one generated sequence: see TextStream."""
        return TextStream(self)


class TextStream:
    """Turns generated ids, pushed one at a time, into text pieces whose concatenation is exactly
    `tokenizer.decode(all ids)`. A piece may be empty: a subword waits for the characters that complete it
    ("hel" + "lo"), and a byte-fallback token waits for the rest of its UTF-8 character.

        text = tokenizer.text_stream()
        for tokens, _ in stream(model, ids, pixels, max_new_tokens=64, eos_token_id=eos):
            print(text.push(int(tokens[0])), end="", flush=True)
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.decoder = DecodeStream(skip_special_tokens=True)  # the tokenizers library's incremental decoding

    def push(self, token_id: int) -> str:
        if token_id in self.tokenizer.markers.values():  # as decode(): placeholders are not text
            return ""
        return self.decoder.step(self.tokenizer.tok, int(token_id)) or ""
