"""The OpenAI chat-completions request, read and checked: every problem is an ApiError naming the field at
fault, answered with the status and error object a client of the OpenAI API expects."""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..image import ImageError, to_rgb
from ..inputs import check_inputs, image_pixels, image_sizes, system_line, video_values, widen
from ..pruning import METHODS, make, name_of
from ..tokenizer import VICUNA_SYSTEM

ROLES = ("system", "user", "assistant")
READ = {"model", "messages", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
        "stream", "stream_options", "prune", "prune_ratio", "prune_k", "ignore_eos"}
# OpenAI fields that would change what the answer means, with the values that leave it as it is: another value is
# refused (400), as vLLM refuses what it does not implement, rather than answered as if it had been honoured.
REFUSED = {"logprobs": (False,), "top_logprobs": (0,), "frequency_penalty": (0,), "presence_penalty": (0,),
           "logit_bias": ({},), "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],),
           "function_call": ("none", "auto"), "response_format": ({"type": "text"},), "modalities": (["text"],),
           "audio": (), "prediction": (), "reasoning_effort": (), "web_search_options": (), "repetition_penalty": (1,),
           "min_tokens": (0,), "best_of": (1,)}
# Fields about the request's bookkeeping, not its answer: accepted and ignored.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}.get(self.status,
                                                                                           "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; printed when the server starts."""

    max_body_bytes: int = 20 * 2**20
    max_image_bytes: int = 10 * 2**20      # one image, decoded from base64 (or read from a file)
    max_image_pixels: int = 4096 * 4096
    max_images: int = 4                    # per request
    max_tokens: int = 512                  # the cap on max_tokens (and the default, within the context)
    allow_files: Path | None = None        # local images are read from here only
    max_video_bytes: int = 50 * 2**20      # one video (a video model's); its frames share max_image_pixels
    max_videos: int = 1                    # per request
    max_video_frames: int = 100_000        # frames a video may have (a long one is reached by seeking)

    def describe(self, video: bool = False) -> str:
        files = f"local files under {self.allow_files}" if self.allow_files else "no local files"
        videos = (f", video {self.max_video_bytes / 2**20:g} MiB and {self.max_video_frames} frames, "
                  f"{self.max_videos} video{'s' * (self.max_videos != 1)} a request") if video else ""
        return (f"limits: body {self.max_body_bytes / 2**20:g} MiB, image {self.max_image_bytes / 2**20:g} MiB and "
                f"{pixels(self.max_image_pixels)}, {self.max_images} images a request{videos}, max_tokens "
                f"{self.max_tokens}, {files}")


def pixels(n: int) -> str:
    """A pixel count as the server writes it everywhere: "16,777,216 pixels (4096 x 4096)"."""
    side = math.isqrt(n)
    return f"{n:,} pixels" + (f" ({side} x {side})" if side * side == n else "")


def a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def bad(message, param=None, code="invalid_value"):
    return ApiError(400, message, param, code)


def get(body: dict, name: str, kinds, default=None, check=None, what: str = ""):
    """body[name] if it has one of the JSON types `kinds` (bool is not a number here) and passes `check`."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = "/".join({int: "integer", float: "number", str: "string", bool: "boolean", list: "array",
                          dict: "object"}[k] for k in kinds)
        raise ApiError(400, f"{name} must be {a(names)}, got {type(value).__name__} {value!r:.80}", name,
                       "invalid_type")
    if check is not None and not check(value):
        raise bad(f"{name} must be {what}, got {value!r:.80}", name)
    return value


def read_request(body, pipe, limits: Limits, default_prune, model_name: str) -> dict:
    """The request's settings and prompt: ids, pixels, prune, max_tokens, sampling, stop, stream."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_type")
    model = get(body, "model", (str,))
    if model is not None and model != model_name:
        raise ApiError(404, f"model {model!r:.80} is not served here; this server serves {model_name!r}", "model",
                       "model_not_found")
    if get(body, "n", (int,), 1) != 1:
        raise bad("n must be 1: the server answers each request once", "n")
    for name, value in body.items():
        if name in REFUSED and value is not None and value not in REFUSED[name]:
            raise bad(f"{name} {value!r:.80} is not supported by this server (see docs/serving.md)", name,
                      "unsupported_field")
        if name not in READ | REFUSED.keys() | IGNORED:
            raise bad(f"unrecognized field {name!r:.80} (see docs/serving.md for the fields the server reads)", name,
                      "unrecognized_field")
    config, tok = pipe.model.config, pipe.tokenizer
    n_frames = getattr(config, "n_frames", None)
    images, videos, ids = read_messages(body.get("messages"), tok, config.text.eos_token_id, limits, n_frames,
                                        system_line(config))
    pictures = [im for im, _ in images]
    pixels = image_pixels(config, pictures, [name for _, name in images]) if images else None
    ids = widen(config, ids, pictures)   # LLaVA-NeXT: a placeholder per image token
    try:  # the frames PyAV decoded, preprocessed: a frame the preprocessing refuses is the request's fault
        videos = video_values(config, [frames for frames, _ in videos], [name for _, name in videos]) if videos \
            else None
    except ValueError as e:
        raise bad(str(e), "messages", "invalid_video") from None
    input_ids = torch.tensor([ids])
    try:
        check_inputs(config, input_ids, pixels, None)
        _, length = pipe.model.merged_slots(input_ids)
    except ValueError as e:
        raise bad(str(e), "messages", "context_length_exceeded") from None
    room = config.text.max_seq_len - length
    if room < 1:
        raise bad(f"the prompt takes {length} of the model's {config.text.max_seq_len} tokens: no room for an answer",
                  "messages", "context_length_exceeded")
    cap = min(limits.max_tokens, room)
    max_tokens = get(body, "max_completion_tokens", (int,), None, lambda v: v >= 1, "a positive integer")
    max_tokens = get(body, "max_tokens", (int,), max_tokens, lambda v: v >= 1, "a positive integer")
    if max_tokens is not None and max_tokens > cap:
        why = (f"the server's cap is {limits.max_tokens}" if cap == limits.max_tokens else
               f"the prompt takes {length} of the model's {config.text.max_seq_len} tokens")
        raise bad(f"max_tokens {max_tokens} is more than this request may have ({cap}: {why})", "max_tokens")
    stop = get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad(f"stop must be a non-empty string or a list of up to 4 of them, got {stop!r:.80}", "stop")
    options = get(body, "stream_options", (dict,), {})
    return {
        "ids": ids, "pixels": pixels, "videos": videos, "image_sizes": image_sizes(config, pictures),
        "prune": read_pruning(body, default_prune),
        "max_tokens": max_tokens or cap, "stop": tuple(stop),
        "temperature": float(get(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2,
                                 "a number in [0, 2]")),  # 1 when absent, as the OpenAI API
        "top_p": float(get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        "seed": get(body, "seed", (int,), None, lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"),
        "ignore_eos": get(body, "ignore_eos", (bool,), False),
        "stream": get(body, "stream", (bool,), False),
        "include_usage": get(options, "include_usage", (bool,), False),
    }


def read_pruning(body, default):
    """The request's pruning (extra body fields prune, prune_ratio, prune_k), else the server's."""
    name = get(body, "prune", (str,), None)
    given = {key: body.get(key) for key in ("prune_ratio", "prune_k") if body.get(key) is not None}
    if name is None and "prune" in body:           # "prune": null asks for no pruning
        name = "none"
    if name is None:
        if not given:
            return default
        if default is None:
            raise bad(f"{', '.join(given)} given without prune (the method; this server prunes nothing by default)",
                      next(iter(given)))
        name = name_of(default)
    if name == "none":
        if given:
            raise bad(f"{', '.join(given)} given with prune none", next(iter(given)))
        return None
    if name not in METHODS:
        raise bad(f"unknown pruning method {name!r:.80}; choose from none, {', '.join(METHODS)}", "prune",
                  "unknown_method")
    same = type(default) is METHODS[name]            # the server's method: its settings are the defaults
    ratio = get(body, "prune_ratio", (int, float), default.ratio if same else 0.5, lambda v: 0 <= v < 1,
                "a number in [0, 1) (the fraction of image tokens dropped)")
    k = get(body, "prune_k", (int,), getattr(default, "k", None) if same else None, lambda v: v >= 0,
            "a non-negative integer")
    try:
        return make(name, float(ratio), k, getattr(default, "seed", None) if same else None)
    except ValueError as e:
        raise bad(str(e), "prune_k" if k is not None else "prune") from None


def read_messages(messages, tok, eos: int, limits: Limits, n_frames: int | None = None,
                  default_system: str = VICUNA_SYSTEM):
    """([(image, its name)], [(video frames, its name)], prompt ids) of a vicuna_v1 conversation: optional system
    message first, then user and assistant messages in turn, ending with the user's question. n_frames: the
    frames a video model samples (None: the model takes no video)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty array of {role, content} objects", "messages",
                  "invalid_type" if not isinstance(messages, list) else "invalid_value")
    system, images, videos, turns = default_system, [], [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object with role and content", where, "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r:.40}", f"{where}.role")
        expected = "user" if not turns or turns[-1][3] is not None else "assistant"
        if role == "system" and i > 0 or role != "system" and role != expected:
            raise bad(f"{where}: {a(role)} message cannot come here; the conversation is an optional system message, "
                      "then user and assistant messages in turn, ending with a user message", f"{where}.role")
        text, found, seen = read_content(message.get("content"), where, limits, role == "user", n_frames)
        if role == "system":
            system = text
        elif role == "user":
            if not text.strip():
                raise bad(f"{where} has no text: ask a question", f"{where}.content")
            for marker in tok.markers:
                if marker in text:
                    kind = "image" if marker == "<image>" else "video"
                    raise bad(f"{where} contains {marker!r}: send {kind}s as {kind}_url parts", f"{where}.content")
            images += found
            videos += seen
            turns.append([len(found), len(seen), text, None])
        else:
            turns[-1][3] = text
    if turns[-1][3] is not None:
        raise bad("the last message must be the user's", f"messages[{len(messages) - 1}].role")
    if len(images) > limits.max_images:
        raise ApiError(413, f"{len(images)} images in one request; the server takes at most {limits.max_images}",
                       "messages", "too_many_images")
    if len(videos) > limits.max_videos:
        raise ApiError(413, f"{len(videos)} videos in one request; the server takes at most {limits.max_videos}",
                       "messages", "too_many_videos")
    ids = []
    try:
        for t, (n_images, n_videos, question, answer) in enumerate(turns):
            ids += (tok.first_turn(question, n_images, system, n_videos) if t == 0 else
                    tok.encode_turn(question, n_images, n_videos))
            if answer is not None:
                ids += tok.encode_text(answer) + [eos]
    except ValueError as e:
        raise bad(str(e), "messages", "unknown_words") from None
    return images, videos, ids


def read_content(content, where: str, limits: Limits, allow_images: bool, n_frames: int | None = None):
    """(text, [(image, name)], [(video frames, name)]) of a message's content: a string, or an array of text,
    image_url and (for a video model, whose videos have n_frames frames) video_url parts, as vLLM takes them."""
    if isinstance(content, str):
        return content, [], []
    if not isinstance(content, list) or not content:
        raise bad(f"{where}.content must be a string or a non-empty array of parts", f"{where}.content", "invalid_type")
    texts, images, videos = [], [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and allow_images:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad(f"{at}.image_url must be an object with a url string", f"{at}.image_url", "invalid_type")
            images.append((read_image(url, at, limits), at))
        elif kind == "video_url" and allow_images:
            if n_frames is None:
                raise bad(f"{at}: this model takes no video", f"{at}.video_url", "video_not_supported")
            url = part.get("video_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad(f"{at}.video_url must be an object with a url string", f"{at}.video_url", "invalid_type")
            videos.append((read_video(url, at, limits, n_frames), at))
        elif kind in ("image_url", "video_url"):
            raise bad(f"{at}: only user messages may carry images and videos", at)
        else:
            raise bad(f"{at} must be {{type: text, text}}, {{type: image_url, image_url: {{url}}}} or "
                      "{type: video_url, video_url: {url}}", at, "invalid_type")
    return "\n".join(texts), images, videos


def read_bytes(url: str, at: str, limits: Limits, kind: str = "image") -> bytes:
    """The bytes of a data: URL (base64), or of a local file under --allow-files; never anything fetched."""
    cap, param = (limits.max_image_bytes if kind == "image" else limits.max_video_bytes), f"{at}.{kind}_url"
    if url.startswith(("http://", "https://")):
        raise bad(f"{at}: the server never fetches URLs; send the {kind} as a data: URL (base64)", param,
                  "url_not_allowed")
    if not url.startswith("data:"):
        return read_local(url, at, limits, kind)
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise bad(f"{at}: a data: URL must be data:<type>;base64,<data>", param, f"invalid_{kind}")
    too_large = ApiError(413, f"{at}: the {kind} is over the {cap} bytes the server takes", param, f"{kind}_too_large")
    if len(payload) > math.ceil(cap / 3) * 4 + 4:   # surely over: not decoded
        raise too_large
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{at}: the data: URL is not valid base64", param, "invalid_base64") from None
    if len(data) > cap:
        raise too_large
    return data


def read_video(url: str, at: str, limits: Limits, n_frames: int) -> list[Image.Image]:
    """A video's n_frames sampled frames, from a data: URL or a local file under --allow-files."""
    from ..video import VideoError, read_frames

    try:
        return read_frames(read_bytes(url, at, limits, "video"), n_frames, limits.max_image_pixels,
                           limits.max_video_frames, name=at)
    except VideoError as e:
        status, code = (413, "video_too_large") if "the cap of" in str(e) else (400, "invalid_video")
        raise ApiError(status, str(e), f"{at}.video_url", code) from None


def read_image(url: str, at: str, limits: Limits) -> Image.Image:
    """A data: URL (base64), or a local file under --allow-files; never anything fetched."""
    data = read_bytes(url, at, limits)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > limits.max_image_pixels:
                cap = pixels(limits.max_image_pixels)
                raise ApiError(413, f"{at}: {im.width} x {im.height} pixels is over the {cap} the server takes",
                               f"{at}.image_url", "image_too_large")
            im.load()
            return to_rgb(im)
    except ApiError:
        raise
    except Image.UnidentifiedImageError:   # its message names a BytesIO object, not the request's part
        raise bad(f"{at}: not a readable image (not a format the server reads)", f"{at}.image_url",
                  "invalid_image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, ImageError) as e:
        raise bad(f"{at}: not a readable image ({e})", f"{at}.image_url", "invalid_image") from None


def read_local(url: str, at: str, limits: Limits, kind: str = "image") -> bytes:
    cap, param = (limits.max_image_bytes if kind == "image" else limits.max_video_bytes), f"{at}.{kind}_url"
    if limits.allow_files is None:
        raise ApiError(403, f"{at}: local files are not served (start the server with --allow-files DIR); send the "
                       f"{kind} as a data: URL", param, "file_not_allowed")
    root = limits.allow_files.resolve()
    path = (root / url.removeprefix("file://")).resolve()
    if not path.is_relative_to(root):
        raise ApiError(403, f"{at}: {url!r:.200} is outside the directory the server reads ({root})", param,
                       "file_not_allowed")
    if not path.is_file():
        raise bad(f"{at}: no {kind} file {url!r:.200} under {root}", param, "file_not_found")
    if path.stat().st_size > cap:
        raise ApiError(413, f"{at}: the file is over the {cap} bytes the server takes", param, f"{kind}_too_large")
    return path.read_bytes()
