"""From images, videos and text to what the model takes: prompt ids (one placeholder id per image or video),
preprocessed pixels in placeholder order and an attention mask, for a batch left-padded so that every sample's
last token is in the last column; and the checks every input passes before the model uses it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .image import ImageError, preprocess, to_rgb
from .tokenizer import IMAGE_MARKER, VICUNA_SYSTEM, Tokenizer
from .video import frames_pixels

IGNORE = -100  # label of a token the loss does not train on (prompt, padding), as torch's cross_entropy


@dataclass
class Batch:
    input_ids: torch.Tensor               # [B, T], left-padded
    attention_mask: torch.Tensor          # [B, T], 0 at padding
    pixel_values: torch.Tensor | None     # [n_images, 3, S, S], sample 0's images first, each in prompt order
    labels: torch.Tensor | None = None    # [B, T] training targets, IGNORE where nothing is learnt
    video_values: torch.Tensor | None = None  # [n_videos, n_frames, 3, S, S], as pixel_values
    image_sizes: torch.Tensor | None = None   # [n_images, 2] (height, width): LLaVA-NeXT's (pixel_values: tiles)

    def visual_inputs(self) -> dict:
        """The family's other visual inputs, those it has: video_values, image_sizes (a model takes only its own)."""
        return {name: value for name in ("video_values", "image_sizes") if (value := getattr(self, name)) is not None}

    def model_inputs(self) -> dict:
        """Keyword arguments for LlavaModel.prefill/forward and generate/stream."""
        return {"input_ids": self.input_ids, "pixel_values": self.pixel_values, "attention_mask": self.attention_mask,
                **self.visual_inputs()}


def image_pixels(config, images: Sequence[Image.Image], names: Sequence[str] | None = None) -> torch.Tensor | None:
    """Images preprocessed as the checkpoint's config says (size, pad or crop, normalisation): [n, 3, S, S]; for
    LLaVA-NeXT each image's base image and tiles (its config's `tiles`), [n_tiles_total, 3, S, S]. An image that
    cannot be used is an ImageError naming it (`names`, e.g. the files, else its position)."""
    if not images:
        return None
    pixels, tiles = [], getattr(config, "tiles", None)
    for i, im in enumerate(images):
        try:
            views = [im] if tiles is None else tiles(to_rgb(im))
            pixels += [preprocess(view, config.vision.image_size, config.image_mode, config.image_mean,
                                  config.image_std) for view in views]
        except ImageError as e:
            raise ImageError(f"{names[i] if names else f'image {i}'}: {e}") from None
    return torch.stack(pixels)


def image_sizes(config, images: Sequence[Image.Image]) -> torch.Tensor | None:
    """[n_images, 2] (height, width) for a model whose prompts hold a placeholder per image token (LLaVA-NeXT)."""
    if not images or not getattr(config, "placeholder_per_token", False):
        return None
    return torch.tensor([[im.height, im.width] for im in images])


def widen(config, ids: list[int], images: Sequence[Image.Image], labels: list[int] | None = None) -> list[int]:
    """A prompt with one placeholder per image, as the tokenizer writes it, in the form the model takes: as it is,
    or (LLaVA-NeXT) each image's placeholder repeated once per token of the image (its size decides how many).
    With `labels` (a training sample's, one per id), the labels widened the same way instead."""
    if not getattr(config, "placeholder_per_token", False):
        return ids if labels is None else labels
    sizes, out = iter(images), []
    for t, label in zip(ids, ids if labels is None else labels):
        out += [label] * (config.n_image_tokens((im := next(sizes)).height, im.width) if t == config.image_token_id
                          else 1)
    return out


def video_values(config, videos, names: Sequence[str] | None = None) -> torch.Tensor | None:
    """Videos, each a list of PIL frames or a preprocessed [n_frames, 3, S, S] tensor (video.video_pixels reads a
    file into one), as [n, n_frames, 3, S, S]; `names` label them in error messages."""
    if not videos:
        return None
    if getattr(config, "n_frames", None) is None:
        raise ValueError("this model takes no video (its config has no video tower)")
    out = []
    for i, video in enumerate(videos):
        try:
            out.append(video if isinstance(video, torch.Tensor) else frames_pixels(video, config))
        except (ImageError, ValueError) as e:
            raise type(e)(f"{names[i] if names else f'video {i}'}: {e}") from None
    return torch.stack(out)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, labels: Sequence[Sequence[int]] | None = None):
    """(ids [B, T], attention mask [B, T], labels [B, T] or None) with each row right-aligned."""
    T = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (T - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    if labels is None:
        return ids, mask, None
    return ids, mask, torch.tensor([[IGNORE] * (T - len(r)) + list(lab) for r, lab in zip(rows, labels)])


def questions(tokenizer: Tokenizer, config, requests: Sequence[tuple], names: Sequence[str] | None = None,
              video_names: Sequence[str] | None = None) -> Batch:
    """One single-turn prompt (LLaVA-1.5's vicuna_v1 template, images then videos first) per (images, question)
    or (images, question, videos); `names` and `video_names` label the images and videos (in order) in error
    messages."""
    rows = []
    for images, question, *videos in requests:
        check_question(tokenizer, question)
        rows.append(widen(config, tokenizer.first_turn(question, len(images), system_line(config),
                                                       len(videos[0]) if videos else 0), images))
    ids, mask, _ = left_pad(rows, config.text.pad_token_id)
    images, videos = every_image_and_video(requests)
    return Batch(ids, mask, image_pixels(config, images, names), video_values=video_values(config, videos, video_names),
                 image_sizes=image_sizes(config, images))


def every_image_and_video(requests) -> tuple[list, list]:
    """The images and the videos of (images, text) or (images, text, videos) requests, in order, flattened."""
    return ([im for images, *_ in requests for im in images],
            [v for _, _, *videos in requests for v in (videos[0] if videos else ())])


def check_question(tokenizer: Tokenizer, question: str) -> None:
    if not question.strip():
        raise ValueError("the prompt is empty: it has no question")
    for marker in tokenizer.markers:
        if marker in question:
            kind = "image" if marker == IMAGE_MARKER else "video"
            raise ValueError(f"the question contains {marker!r}: {kind}s are passed separately (--{kind} on the "
                             f"command line) and the prompt gets one placeholder per {kind}")


def system_line(config) -> str:
    """The system line a checkpoint's prompts start with: its config's (a video model may say), else vicuna_v1's."""
    system = getattr(config, "system", None)
    return VICUNA_SYSTEM if system is None else system


def encode_conversation(tokenizer: Tokenizer, turns: Sequence[tuple[str, str]], n_images: int = 1,
                        n_videos: int = 0, system: str = VICUNA_SYSTEM):
    """A multi-turn dialogue as LLaVA trains on it: "<system> USER: <image>\\n q1 ASSISTANT: a1 </s> USER: q2
    ASSISTANT: a2 </s> ...". Returns (ids, labels): labels are the answers and their EOS, IGNORE elsewhere."""
    ids, labels = [], []
    for t, (question, answer) in enumerate(turns):
        prompt = tokenizer.first_turn(question, n_images, system, n_videos) if t == 0 \
            else tokenizer.encode_turn(question)
        target = tokenizer.encode_text(answer) + [tokenizer.eos_token_id]
        ids += prompt + target
        labels += [IGNORE] * len(prompt) + target
    return ids, labels


def conversations(tokenizer: Tokenizer, config, dialogues: Sequence[tuple]) -> Batch:
    """A training batch: one (images, [(question, answer), ...]) or (images, turns, videos) dialogue per sample,
    with labels."""
    encoded = [encode_conversation(tokenizer, turns, len(images), len(videos[0]) if videos else 0, system_line(config))
               for images, turns, *videos in dialogues]
    encoded = [(widen(config, ids, images), widen(config, ids, images, labels))   # LLaVA-NeXT: a placeholder a token
               for (ids, labels), (images, *_) in zip(encoded, dialogues)]
    ids, mask, labels = left_pad([e[0] for e in encoded], config.text.pad_token_id, [e[1] for e in encoded])
    images, videos = every_image_and_video(dialogues)
    return Batch(ids, mask, image_pixels(config, images), labels, video_values(config, videos),
                 image_sizes(config, images))


def check_inputs(config, input_ids, pixel_values, attention_mask) -> torch.Tensor:
    """Refuse what the model cannot use, naming the problem; returns the attention mask as bool [B, T]."""
    if input_ids.ndim != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a LongTensor [batch, seq], got {input_ids.dtype} {list(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids is empty (shape {[B, T]}): a prompt needs at least one token")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {list(mask.shape)} differs from input_ids shape "
                         f"{list(input_ids.shape)}")
    if not mask.any(1).all():
        raise ValueError(f"sample {int((~mask.any(1)).nonzero()[0])} has no tokens (its attention_mask is all 0)")
    if pixel_values is not None:
        check_pixels(config, pixel_values)
    is_image = input_ids == config.image_token_id
    n_images = int(is_image.sum())
    n_given = 0 if pixel_values is None else pixel_values.shape[0]
    if n_images != n_given and not getattr(config, "placeholder_per_token", False):  # LLaVA-NeXT checks its own
        raise ValueError(f"the prompt has {n_images} image placeholder(s) (id {config.image_token_id}) "
                         f"but {n_given} image(s) were given")
    others = [getattr(config, name, None) for name in ("video_token_id", "frame_token_id")]
    placeholder = is_image | torch.isin(input_ids, torch.tensor([t for t in others if t is not None], dtype=torch.long,
                                                                 device=input_ids.device))
    if (placeholder & ~mask).any():
        raise ValueError("an image or video placeholder lies under attention_mask == 0")
    bad = ~placeholder & mask & ((input_ids < 0) | (input_ids >= config.text.vocab_size))
    if bad.any():
        raise ValueError(f"token id {int(input_ids[bad][0])} is outside the vocabulary [0, {config.text.vocab_size})")
    return mask


def check_pixels(config, pixel_values):
    size = config.vision.image_size
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
        hint = "; one image needs a batch dimension: pixels[None]" if pixel_values.ndim == 3 else ""
        raise ValueError(f"pixel_values must have shape [num_images, 3, {size}, {size}], "
                         f"got {list(pixel_values.shape)}{hint}")
    if not pixel_values.isfinite().all():
        raise ValueError("pixel_values contains NaN or infinite values")
