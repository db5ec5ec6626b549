"""The HTTP side: an ASGI app (Starlette) with OpenAI's chat-completions API, the models list, a health check
and the web page. Requests become engine Jobs; their events come back through an asyncio queue."""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..image import token_grid
from ..options import describe
from ..pruning import METHODS, name_of
from .engine import Engine, Job, QueueFull, ShuttingDown
from .protocol import ApiError, Limits, read_request, read_video

STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}


def log(request: Request, status: int, what: str):
    """The request log: one line on stderr per chat completion, answered or refused."""
    client = request.client.host if request.client else "-"
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {client} {request.method} {request.url.path} {status} {what}",
          file=sys.stderr, flush=True)


def error(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def create_app(engine: Engine, limits: Limits, *, model_name: str, default_prune=None, api_key: str | None = None):
    pipe = engine.pipe
    config = pipe.model.config

    def check_key(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send the header Authorization: Bearer <key>", None,
                           "invalid_api_key")

    async def read_body(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"the request body ({declared} bytes) is over the {limits.max_body_bytes} the server "
                           "takes", None, "body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"the request body is over the {limits.max_body_bytes} bytes the server takes",
                               None, "body_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the request body nests too deeply to read", None, "invalid_json") from None

    async def chat_completions(request: Request):
        check_key(request)
        body = await read_body(request)
        loop = asyncio.get_running_loop()
        # The image decoding and tokenizing run off the event loop, which keeps serving other clients.
        spec = await loop.run_in_executor(None, read_request, body, pipe, limits, default_prune, model_name)
        events: asyncio.Queue = asyncio.Queue()
        stream, include_usage = spec.pop("stream"), spec.pop("include_usage")
        job = Job(**spec, send=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            engine.submit(job)
        except QueueFull:
            raise ApiError(429, f"the server is busy: its batch is full and {engine.max_queue} requests are already "
                           "waiting; retry later",
                           None, "queue_full") from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", None, "shutting_down") from None
        reply = Reply(model_name, job, events, token_grid(config), describe(spec["prune"]) if spec["prune"] else "none",
                      lambda status, what: log(request, status, what))
        watcher = asyncio.create_task(watch_disconnect(request, job))
        if stream:
            return StreamingResponse(reply.chunks(include_usage, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return JSONResponse(await reply.whole())
        finally:
            watcher.cancel()

    async def models(request: Request):
        check_key(request)
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                         "owned_by": "minifastv"}]})

    async def health(request: Request):
        return JSONResponse({"status": "ok" if engine.accepting else "shutting down", "model": model_name,
                             "waiting": engine.n_waiting(), "running": engine.running,
                             "decode_steps": engine.steps, "decoded_tokens": engine.decoded,
                             "cancelled": engine.cancelled},
                            status_code=200 if engine.accepting else 503)

    async def page(request: Request):
        name, media = STATIC[request.url.path]
        return Response(resources.files(__package__).joinpath("static", name).read_bytes(), media_type=media)

    async def settings(request: Request):
        """What the page needs to know: the model, its patch grid, the pruning methods and the defaults."""
        return JSONResponse({"model": model_name, "patch_grid": token_grid(config),
                             "methods": ["none", *METHODS],
                             "default_prune": None if default_prune is None else {
                                 "method": name_of(default_prune),
                                 "ratio": default_prune.ratio,
                                 "k": getattr(default_prune, "k", None)},
                             "image_mode": config.image_mode, "image_mean": list(config.image_mean),
                             "n_frames": getattr(config, "n_frames", None),
                             "api_key_required": api_key is not None, "max_tokens": limits.max_tokens,
                             "vocabulary": pipe.tokenizer.known_words()})

    async def frames(request: Request):
        """A video model's view of a video: {"video": a data: URL (or a file under --allow-files)} -> {"frames":
        the n_frames sampled frames, cropped as the model sees them, as PNG data: URLs} (the page draws them)."""
        check_key(request)
        body = await read_body(request)
        url = body.get("video") if isinstance(body, dict) else None
        if not isinstance(url, str):
            raise ApiError(400, "the body must be {\"video\": a data: URL}", "video", "invalid_type")
        if getattr(config, "n_frames", None) is None:
            raise ApiError(400, "this model takes no video", "video", "video_not_supported")
        loop = asyncio.get_running_loop()
        views = await loop.run_in_executor(None, frame_views, url, limits, config)
        return JSONResponse({"frames": views})

    async def on_api_error(request, exc: ApiError):
        log(request, exc.status, f"{exc.code or ''} {exc.param or ''}".strip())
        return error(exc)

    async def on_http_error(request, exc: HTTPException):
        messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        e = ApiError(exc.status_code, messages.get(exc.status_code, str(exc.detail)), None,
                     {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))
        return error(e)

    async def on_other_error(request, exc: Exception):  # a bug of ours: said, without a traceback to the client
        return error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/v1/settings", settings, methods=["GET"]), Route("/v1/frames", frames, methods=["POST"]),
              *(Route(path, page, methods=["GET"]) for path in STATIC)]
    return Starlette(routes=routes, exception_handlers={ApiError: on_api_error, HTTPException: on_http_error,
                                                        Exception: on_other_error})


def frame_views(url: str, limits: Limits, config) -> list[str]:
    """The sampled frames of the video at `url`, as the model sees them (before normalisation), as PNG data URLs."""
    import base64
    import io

    from ..image import model_view

    out = []
    for frame in read_video(url, "video", limits, config.n_frames):
        png = io.BytesIO()
        model_view(frame, config.vision.image_size, "crop").save(png, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(png.getvalue()).decode())
    return out


async def watch_disconnect(request: Request, job: Job):
    """Cancel the job when its client goes away (the body is read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


class Reply:
    """A job's events as an OpenAI chat completion, whole or as server-sent events."""

    def __init__(self, model_name, job, events, grid: int, method: str, log=lambda status, what: None):
        self.model, self.job, self.events, self.grid, self.method = model_name, job, events, grid, method
        self.log = log
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def usage(self, answer) -> dict:
        completion = answer.decode_steps + 1
        return {"prompt_tokens": answer.n_prompt_tokens, "completion_tokens": completion,
                "total_tokens": answer.n_prompt_tokens + completion,
                "image_tokens": answer.n_image_tokens, "image_tokens_kept": answer.kept,
                "kept_patches": answer.kept_patches, "patch_grid": self.grid,
                **({"kept_class_tokens": answer.kept_class_tokens} if answer.has_video else {}),
                "prefill_flops": answer.flops, "prefill_flops_unpruned": answer.flops_unpruned,
                "prefill_s": round(answer.prefill_s, 6), "decode_s": round(answer.decode_s, 6), "pruning": self.method}

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    async def next(self):
        event = await self.events.get()
        if event[0] == "error":
            raise event[1]
        if event[0] == "done":
            answer, reason = event[1:]
            self.log(200, f"{answer.n_prompt_tokens} prompt + {answer.decode_steps + 1} completion tokens, "
                          f"{reason}, visual tokens kept {answer.kept}/{answer.n_image_tokens}, pruning {self.method}, "
                          f"prefill {answer.prefill_s:.3f} s, decode {answer.decode_s:.3f} s")
        return event

    async def whole(self) -> dict:
        text = []
        while True:
            event = await self.next()
            if event[0] == "text":
                text.append(event[1])
            else:
                _, answer, reason = event
                message = {"role": "assistant", "content": "".join(text)}
                return {**self.head("chat.completion"), "choices": [{"index": 0, "message": message,
                                                                      "finish_reason": reason, "logprobs": None}],
                        "usage": self.usage(answer)}

    async def chunks(self, include_usage: bool, watcher):
        def sse(delta, reason=None, **extra):
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            return f"data: {json.dumps({**self.head('chat.completion.chunk'), 'choices': [choice], **extra})}\n\n"

        try:
            yield sse({"role": "assistant", "content": ""})
            while True:
                try:
                    event = await self.next()
                except ApiError as e:
                    self.log(200, f"stream ended by an error: {e.status} {e.code}")
                    yield f"data: {json.dumps(e.body())}\n\n"
                    break
                if event[0] == "text":
                    yield sse({"content": event[1]})
                    continue
                _, answer, reason = event
                yield sse({}, reason)
                if include_usage:
                    chunk = {**self.head("chat.completion.chunk"), "choices": [], "usage": self.usage(answer)}
                    yield f"data: {json.dumps(chunk)}\n\n"
                break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the answer is complete): the engine frees its row
            self.job.cancel()
            watcher.cancel()
