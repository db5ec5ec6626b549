"""`python -m minifastv serve` on the shipped tiny model, in a subprocess, through the official openai client and
raw HTTP: the answers are generate's, batched requests get what they get alone, the queue, disconnects,
limits, keys and bad input behave as the README says."""

import base64
import concurrent.futures
import http.client
import json
import signal
import time

import pytest
import torch
from serving import SAMPLE, Server, data_url, image_message

from minifastv import generate
from minifastv.data import SAMPLES
from minifastv.pruning import METHODS, make

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ask(client, i, method=None, ratio=0.5, stream=False, **kwargs):
    s = SAMPLE[i]
    extra = {"prune": method or "none", **({"prune_ratio": ratio} if method else {}), **kwargs.pop("extra_body", {})}
    reply = client.chat.completions.create(model="tiny", messages=[image_message(SAMPLES / s["image"], s["question"])],
                                           temperature=0, stream=stream, extra_body=extra, **kwargs)
    if not stream:
        return reply.choices[0].message.content, reply.usage, reply.choices[0].finish_reason
    text, usage, reason = "", None, None
    for chunk in reply:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, usage, reason


@pytest.mark.parametrize("method", ["none", *METHODS])
def test_the_openai_client_gets_generates_greedy_text(client, pipe, method):
    """Streamed and not, every pruning method: the text, the kept patches and the FLOPs of generate."""
    for i in (0, 1):
        s = SAMPLE[i]
        prune = None if method == "none" else make(method, 0.75)
        alone = pipe.answer([SAMPLES / s["image"]], s["question"], prune=prune)
        for stream in (False, True):
            text, usage, reason = ask(client, i, None if method == "none" else method, 0.75, stream=stream,
                                      **({"stream_options": {"include_usage": True}} if stream else {}))
            extra = usage.model_extra
            assert (text, reason) == (alone.text, "stop")
            assert extra["kept_patches"] == alone.kept_patches and extra["image_tokens_kept"] == alone.kept
            assert (extra["prefill_flops"], extra["prefill_flops_unpruned"]) == (alone.flops, alone.flops_unpruned)
            assert (usage.prompt_tokens, usage.completion_tokens) == (alone.n_prompt_tokens, len(alone.token_ids) + 1)


def test_eight_concurrent_clients_get_what_they_get_alone(server, pipe, capsys):
    """Different images, questions, methods and lengths at once (ignore_eos keeps them going for different
    numbers of steps, so requests leave and join a running batch); then the load alone and together."""
    jobs = [(i % 4, [None, "fastv", "pool", "pyramiddrop-official"][i // 2], 20 + 7 * i) for i in range(8)]
    expected = []
    for i, method, n in jobs:
        batch = pipe.inputs([SAMPLES / SAMPLE[i]["image"]], SAMPLE[i]["question"])
        ids = generate(pipe.model, **batch.model_inputs(), max_new_tokens=n, prune=method and make(method, 0.5))
        expected.append(pipe.tokenizer.decode(ids[0].tolist()))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    def one(job):
        i, method, n = job
        message = image_message(SAMPLES / SAMPLE[i]["image"], SAMPLE[i]["question"])
        return client.chat.completions.create(model="tiny", messages=[message], temperature=0, max_tokens=n,
                                              extra_body={"prune": method or "none", "ignore_eos": True,
                                                          **({"prune_ratio": 0.5} if method else {})})

    decoded = server.health()["decoded_tokens"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        start = time.perf_counter()
        together = list(pool.map(one, jobs))
        together_s = time.perf_counter() - start
    assert [r.choices[0].message.content for r in together] == expected
    # A request leaves the batch with its last token: no row decodes past its request's end.
    assert server.health()["decoded_tokens"] - decoded == sum(n - 1 for _, _, n in jobs)
    assert all(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == n
               for r, (_, _, n) in zip(together, jobs))
    start = time.perf_counter()
    for job in jobs:
        one(job)
    alone_s = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n8 requests ({sum(n for _, _, n in jobs)} tokens): one at a time {alone_s:.2f} s, "
              f"concurrently {together_s:.2f} s ({alone_s / together_s:.2f}x)")


def long_request(server, stream=True):
    """A request that runs to the context's end unless stopped (ignore_eos), on a raw connection."""
    s = SAMPLE[0]
    body = {"messages": [image_message(SAMPLES / s["image"], s["question"])], "temperature": 0, "stream": stream,
            "max_tokens": 400, "ignore_eos": True, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn


def first_text(reply) -> bytes:
    """Read a streamed reply up to its first text chunk: the role chunk comes at once, the text only once the
    engine has taken the request and decoded (so it is running, no longer waiting)."""
    while True:
        line = reply.readline()
        assert line, "the stream ended before any text"
        if line.startswith(b"data: ") and b'"role"' not in line:
            assert reply.readline() == b"\n"                  # the blank line that ends the event
            return line


def wait_for(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def short_request(server):
    return server.request("POST", "/v1/chat/completions", {"messages": [
        image_message(SAMPLES / SAMPLE[1]["image"], SAMPLE[1]["question"])], "temperature": 0})


def test_a_full_queue_answers_429_and_a_disconnect_frees_the_slot(start_server):
    """Decode steps slowed to 50 ms (20 s for the 400 tokens asked): nothing here depends on the box's speed."""
    server = start_server("--max-batch", "1", "--max-queue", "1", "--step-delay-ms", "50")
    running = long_request(server)
    reply = running.getresponse()
    assert reply.status == 200 and b'"content"' in first_text(reply)          # decoding, in the one slot
    waiting = long_request(server, stream=False)                               # the one place in the queue
    wait_for(lambda: server.health()["waiting"] == 1)
    status, headers, body = short_request(server)
    assert status == 429 and headers["Retry-After"] == "1" and body["error"]["code"] == "queue_full"
    waiting.close()                        # gone before its turn: never run, and its place is free at once
    wait_for(lambda: server.health()["waiting"] == 0)
    assert server.health()["running"] == 1
    queued = long_request(server, stream=False)                                # takes the freed place
    wait_for(lambda: server.health()["waiting"] == 1)
    queued.close()
    running.close()                        # gone mid-stream: its row is freed at the next step
    wait_for(lambda: server.health()["running"] == 0 and server.health()["waiting"] == 0)
    health = server.health()
    assert health["cancelled"] == 3 and health["decode_steps"] < 300   # 400 tokens were asked for
    status, _, body = short_request(server)
    assert status == 200 and body["choices"][0]["message"]["content"] == SAMPLE[1]["answer"]


def test_max_queue_0_serves_while_the_batch_has_room(start_server):
    """--max-queue 0: no request waits beyond the batch's free rows, but those rows are used."""
    server = start_server("--max-batch", "1", "--max-queue", "0", "--step-delay-ms", "50")
    status, _, body = short_request(server)
    assert status == 200 and body["choices"][0]["message"]["content"] == SAMPLE[1]["answer"]
    running = long_request(server)
    assert b'"content"' in first_text(running.getresponse())
    status, _, body = short_request(server)
    assert status == 429 and body["error"]["code"] == "queue_full"
    running.close()
    wait_for(lambda: server.health()["running"] == 0)
    assert short_request(server)[0] == 200


@pytest.mark.parametrize("grace", [0, 120])
def test_sigterm_ends_in_flight_requests_cleanly_and_refuses_new_ones(grace, start_server):
    """No grace (decode steps slowed to 50 ms): the stream ends at the next step. 120 s: it runs to its 400 tokens
    (a few seconds of work, so no loaded box runs out of grace)."""
    server = start_server("--shutdown-grace", str(grace), *(["--step-delay-ms", "50"] if grace == 0 else []))
    conn = long_request(server)
    reply = conn.getresponse()
    assert b'"content"' in first_text(reply)          # running (not waiting, which SIGTERM would refuse)
    server.proc.send_signal(signal.SIGTERM)
    events = [line for line in reply.read().decode().split("\n\n") if line]
    last, usage = (json.loads(event.removeprefix("data: ")) for event in events[-3:-1])
    assert events[-1] == "data: [DONE]" and last["choices"][0]["finish_reason"] == "length"
    tokens = usage["usage"]["completion_tokens"]
    assert tokens < 200 if grace == 0 else tokens == 400
    stderr = server.proc.stderr.read()
    assert server.proc.wait(30) == 0 and "server stopped" in stderr
    assert "POST /v1/chat/completions 200 " in stderr and " completion tokens, length," in stderr   # the request log
    assert ("limits: body 20 MiB, image 10 MiB and 16,777,216 pixels (4096 x 4096), 4 images a request, max_tokens "
            "512, no local "
            "files; no API key") in stderr                                   # the caps, said at start
    with pytest.raises(OSError):
        server.request("GET", "/health", timeout=2)


PNG = data_url(SAMPLES / "heldout_0.png")


def user(*parts):
    return {"role": "user", "content": list(parts)}


def picture(url):
    return {"type": "image_url", "image_url": {"url": url}}


def text(t):
    return {"type": "text", "text": t}


QUESTION = user(picture(PNG), text("which shape is in row one column one?"))
GOOD = {"messages": [QUESTION], "max_tokens": 4}
MALFORMED = [  # (what is wrong, method, path, body (bytes as sent), status, code or param the error names)
    ("not JSON", "POST", "/v1/chat/completions", b"{messages: [", 400, "invalid_json"),
    ("not UTF-8", "POST", "/v1/chat/completions", b"\xff\xfe{}", 400, "invalid_json"),
    ("empty body", "POST", "/v1/chat/completions", b"", 400, "invalid_json"),
    ("nested 100,000 deep", "POST", "/v1/chat/completions", b"[" * 100_000, 400, "invalid_json"),
    ("temperature NaN", "POST", "/v1/chat/completions", json.dumps({**GOOD, "temperature": float("nan")}).encode(),
     400, "temperature"),
    ("a JSON array", "POST", "/v1/chat/completions", [GOOD], 400, "invalid_type"),
    ("no messages", "POST", "/v1/chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("messages not a list", "POST", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("empty messages", "POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("a message not an object", "POST", "/v1/chat/completions", {"messages": ["hi"]}, 400, "messages[0]"),
    ("unknown role", "POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("assistant last", "POST", "/v1/chat/completions",
     {"messages": [QUESTION, {"role": "assistant", "content": "square"}]}, 400, "messages[1].role"),
    ("two user messages in a row", "POST", "/v1/chat/completions", {"messages": [QUESTION, QUESTION]}, 400,
     "messages[1].role"),
    ("system not first", "POST", "/v1/chat/completions",
     {"messages": [QUESTION, {"role": "system", "content": "x"}]}, 400, "messages[1].role"),
    ("content a number", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("unknown part type", "POST", "/v1/chat/completions",
     {"messages": [user({"type": "audio", "audio": "x"})]}, 400, "messages[0].content[0]"),
    ("no text", "POST", "/v1/chat/completions", {"messages": [user(picture(PNG))]}, 400, "messages[0].content"),
    ("an <image> marker in the text", "POST", "/v1/chat/completions",
     {"messages": [user(picture(PNG), text("<image> which shape"))]}, 400, "messages[0].content"),
    ("image_url not an object", "POST", "/v1/chat/completions",
     {"messages": [user({"type": "image_url", "image_url": 7}, text("which shape"))]}, 400,
     "messages[0].content[0].image_url"),
    ("an http URL", "POST", "/v1/chat/completions",
     {"messages": [user(picture("https://example.com/a.png"), text("which shape"))]}, 400, "url_not_allowed"),
    ("bad base64", "POST", "/v1/chat/completions",
     {"messages": [user(picture("data:image/png;base64,@@@@"), text("which shape"))]}, 400, "invalid_base64"),
    ("a data URL without base64", "POST", "/v1/chat/completions",
     {"messages": [user(picture("data:image/png,abc"), text("which shape"))]}, 400, "invalid_image"),
    ("not an image", "POST", "/v1/chat/completions",
     {"messages": [user(picture("data:image/png;base64,aGVsbG8gd29ybGQ="), text("which shape"))]}, 400,
     "invalid_image"),
    ("a truncated PNG", "POST", "/v1/chat/completions",
     {"messages": [user(picture("data:image/png;base64," + base64.b64encode((SAMPLES / "heldout_0.png").read_bytes()[:300])
                            .decode()), text("which shape"))]}, 400, "invalid_image"),
    ("a local path without --allow-files", "POST", "/v1/chat/completions",
     {"messages": [user(picture("/etc/passwd"), text("which shape"))]}, 403, "file_not_allowed"),
    ("an image in an assistant message", "POST", "/v1/chat/completions",
     {"messages": [QUESTION, {"role": "assistant", "content": [picture(PNG)]}, QUESTION]}, 400,
     "messages[1].content[0]"),
    ("too many images", "POST", "/v1/chat/completions",
     {"messages": [user(*[picture(PNG)] * 5, text("which shape"))]}, 413, "too_many_images"),
    ("a word the model does not know", "POST", "/v1/chat/completions",
     {"messages": [user(picture(PNG), text("bonjour"))]}, 400, "unknown_words"),
    ("unknown model", "POST", "/v1/chat/completions", {**GOOD, "model": "gpt-4"}, 404, "model_not_found"),
    ("max_tokens 0", "POST", "/v1/chat/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens a string", "POST", "/v1/chat/completions", {**GOOD, "max_tokens": "4"}, 400, "max_tokens"),
    ("max_tokens over the cap", "POST", "/v1/chat/completions", {**GOOD, "max_tokens": 100000}, 400, "max_tokens"),
    ("temperature negative", "POST", "/v1/chat/completions", {**GOOD, "temperature": -1}, 400, "temperature"),
    ("temperature a boolean", "POST", "/v1/chat/completions", {**GOOD, "temperature": True}, 400, "temperature"),
    ("top_p 0", "POST", "/v1/chat/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("seed negative", "POST", "/v1/chat/completions", {**GOOD, "seed": -5}, 400, "seed"),
    ("seed a float", "POST", "/v1/chat/completions", {**GOOD, "seed": 1.5}, 400, "seed"),
    ("stop an empty string", "POST", "/v1/chat/completions", {**GOOD, "stop": ""}, 400, "stop"),
    ("five stop strings", "POST", "/v1/chat/completions", {**GOOD, "stop": list("abcde")}, 400, "stop"),
    ("stream a string", "POST", "/v1/chat/completions", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("n 2", "POST", "/v1/chat/completions", {**GOOD, "n": 2}, 400, "n"),
    ("logprobs asked for", "POST", "/v1/chat/completions", {**GOOD, "logprobs": True}, 400, "logprobs"),
    ("a frequency penalty", "POST", "/v1/chat/completions", {**GOOD, "frequency_penalty": 0.5}, 400,
     "frequency_penalty"),
    ("tools", "POST", "/v1/chat/completions", {**GOOD, "tools": [{"type": "function"}]}, 400, "tools"),
    ("a JSON response format", "POST", "/v1/chat/completions", {**GOOD, "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("an unrecognized field (a typo)", "POST", "/v1/chat/completions", {**GOOD, "max_token": 4}, 400, "max_token"),
    ("unknown pruning method", "POST", "/v1/chat/completions", {**GOOD, "prune": "magic"}, 400, "unknown_method"),
    ("prune_ratio 1", "POST", "/v1/chat/completions", {**GOOD, "prune": "fastv", "prune_ratio": 1}, 400,
     "prune_ratio"),
    ("prune_k on a method without k", "POST", "/v1/chat/completions",
     {**GOOD, "prune": "pool", "prune_k": 2}, 400, "prune_k"),
    ("prune_ratio without a method", "POST", "/v1/chat/completions", {**GOOD, "prune_ratio": 0.5}, 400,
     "prune_ratio"),
    ("prune_k 0 for FastV", "POST", "/v1/chat/completions", {**GOOD, "prune": "fastv", "prune_k": 0}, 400,
     "prune_k"),
    ("GET on the completions", "GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
    ("no such endpoint", "POST", "/v1/completions", GOOD, 404, "not_found"),
    ("a body over the cap", "POST", "/v1/chat/completions", b"{" + b" " * (21 * 2**20) + b"}", 413,
     "body_too_large"),
]


@pytest.mark.parametrize("what, method, path, body, status, named", MALFORMED, ids=[row[0] for row in MALFORMED])
def test_a_malformed_request_gets_its_documented_4xx_and_the_server_stays_up(server, what, method, path, body, status,
                                                                            named):
    got, _, reply = server.request(method, path, body)
    assert got == status, reply
    error = reply["error"]
    assert named in (error["code"], error["param"]) and error["message"] and "Traceback" not in error["message"], error
    assert server.proc.poll() is None and server.health()["status"] == "ok"


def test_after_every_malformed_request_a_good_one_is_answered(server):
    assert len(MALFORMED) >= 30
    assert server.request("POST", "/v1/chat/completions", GOOD)[0] == 200
    # The OpenAI fields at their harmless values, and the bookkeeping ones, are accepted (and ignored).
    harmless = {"logprobs": False, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "tools": [],
                "response_format": {"type": "text"}, "user": "someone", "metadata": {"a": "b"}, "store": False}
    assert server.request("POST", "/v1/chat/completions", {**GOOD, **harmless})[0] == 200


def test_local_files_only_under_allow_files_and_the_api_key_is_enforced(tmp_path, pipe, start_server):
    inside, outside = tmp_path / "served", tmp_path / "private"
    inside.mkdir(), outside.mkdir()
    (inside / "a.png").write_bytes((SAMPLES / "heldout_1.png").read_bytes())
    (outside / "b.png").write_bytes((SAMPLES / "heldout_1.png").read_bytes())
    (inside / "link.png").symlink_to(outside / "b.png")
    server = start_server("--allow-files", str(inside), "--api-key", "sesame", "--prune", "fastv", "--prune-ratio", "0.75",
                    "--prune-k", "1")
    key = {"Authorization": "Bearer sesame"}

    def asking(url, headers=key):
        body = {"messages": [user(picture(url), text(SAMPLE[1]["question"]))], "temperature": 0}
        return server.request("POST", "/v1/chat/completions", body, headers)

    expected = pipe.answer([SAMPLES / "heldout_1.png"], SAMPLE[1]["question"], prune=make("fastv", 0.75, 1)).text
    for url in ("a.png", f"file://{inside / 'a.png'}"):                     # the server's pruning by default
        status, _, body = asking(url)
        assert status == 200 and body["choices"][0]["message"]["content"] == expected
        assert body["usage"]["image_tokens_kept"] == 16 and body["usage"]["pruning"] == "FastV K=1 R=0.75"
    for extra, pruning in (({"prune": "fastv"}, "FastV K=1 R=0.75"), ({"prune_ratio": 0.5}, "FastV K=1 R=0.5"),
                           ({"prune": "pool"}, "Pool R=0.5"), ({"prune": None}, "none"),
                           ({"prune": "dart", "prune_k": 3}, "DART K=3 R=0.5")):
        body = {"messages": [user(picture("a.png"), text(SAMPLE[1]["question"]))], "max_tokens": 1, **extra}
        assert server.request("POST", "/v1/chat/completions", body, key)[2]["usage"]["pruning"] == pruning
    for url in ("../private/b.png", str(outside / "b.png"), f"file://{outside / 'b.png'}", "link.png"):
        status, _, body = asking(url)
        assert status == 403 and body["error"]["code"] == "file_not_allowed", url
    assert asking("missing.png")[2]["error"]["code"] == "file_not_found"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        status, reply_headers, body = asking("a.png", headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert reply_headers["WWW-Authenticate"] == "Bearer"
    assert server.request("GET", "/v1/models")[0] == 401
    assert server.request("GET", "/v1/models", headers=key)[2]["data"][0]["id"] == "tiny"
    assert server.request("GET", "/health")[0] == 200          # the health check needs no key


def test_every_request_knob_changes_the_answer(client, pipe):
    """max_tokens, stop, temperature, top_p, seed, ignore_eos and the system message each do what they say."""
    def run(**kwargs):
        extra = {k: kwargs.pop(k) for k in ("ignore_eos", "prune") if k in kwargs}
        messages = kwargs.pop("messages", [image_message(SAMPLES / SAMPLE[0]["image"], SAMPLE[0]["question"])])
        reply = client.chat.completions.create(model="tiny", messages=messages, extra_body=extra, **kwargs)
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage.completion_tokens

    batch = pipe.inputs([SAMPLES / SAMPLE[0]["image"]], SAMPLE[0]["question"])
    ids = generate(pipe.model, **batch.model_inputs(), max_new_tokens=12)[0].tolist()      # EOS not special
    words = pipe.tokenizer.decode(ids).split()
    assert run(temperature=0, max_tokens=12, ignore_eos=True) == (" ".join(words), "length", 12)
    assert run(temperature=0, max_tokens=5, ignore_eos=True)[1:] == ("length", 5)
    assert run(temperature=0) == (SAMPLE[0]["answer"], "stop", 2)                           # "red", EOS
    cut = run(temperature=0, max_tokens=12, ignore_eos=True, stop=[" " + words[3]])
    # the tokens end where the text does, too (the tiny model's ids hold EOS tokens, which have no text)
    tokens = min(n for n in range(len(ids)) if pipe.tokenizer.decode(ids[:n]) == " ".join(words[:3]))
    assert tokens > 3 and cut == (" ".join(words[:3]), "stop", tokens)
    # A stop string over two tokens: its first token's text is held back while streaming, never sent.
    across = [" ".join(["", *words[3:5]])]
    assert ask(client, 0, stream=True, max_tokens=12, stop=across, extra_body={"ignore_eos": True})[0] == \
        " ".join(words[:3]) == ask(client, 0, max_tokens=12, stop=across, extra_body={"ignore_eos": True})[0]
    sampled = {run(temperature=2.0, seed=seed, max_tokens=12, ignore_eos=True)[0] for seed in range(4)}
    assert len(sampled) > 1                                                                 # temperature, seed
    for seed in (0, 7):                                                                     # seed reproduces
        assert run(temperature=2.0, seed=seed, max_tokens=12, ignore_eos=True) == \
            run(temperature=2.0, seed=seed, max_tokens=12, ignore_eos=True)
    assert run(max_completion_tokens=3, temperature=0, ignore_eos=True)[1:] == ("length", 3)
    assert run(temperature=2.0, top_p=1e-6, seed=3, max_tokens=12, ignore_eos=True)[0] == " ".join(words)
    system = [{"role": "system", "content": "a chat"}, image_message(SAMPLES / SAMPLE[0]["image"],
                                                                    SAMPLE[0]["question"])]
    prompt = pipe.tokenizer.encode_prompt("a chat USER: <image>\n" + SAMPLE[0]["question"] + " ASSISTANT:")
    pixels = pipe.inputs([SAMPLES / SAMPLE[0]["image"]], "x").pixel_values
    alone = generate(pipe.model, torch.tensor([prompt]), pixels, max_new_tokens=6)[0].tolist()
    assert run(messages=system, temperature=0, max_tokens=6, ignore_eos=True)[0] == pipe.tokenizer.decode(alone)


def test_a_conversation_continues_as_chat_does(client, pipe):
    from minifastv import Chat

    chat = Chat(pipe, SAMPLES / SAMPLE[1]["image"], temperature=0.0)
    questions = [SAMPLE[1]["question"], "which shape is in row two column two?", "what colour is the square?"]
    messages = []
    for i, question in enumerate(questions):
        expected = chat.ask(question).text
        content = image_message(SAMPLES / SAMPLE[1]["image"], question)["content"] if i == 0 else question
        messages.append({"role": "user", "content": content})
        got = client.chat.completions.create(model="tiny", messages=messages, temperature=0).choices[0].message.content
        assert got == expected
        messages.append({"role": "assistant", "content": got})


def test_the_caps_and_settings_on_the_command_line_are_applied(tmp_path, start_server):
    import io

    from PIL import Image

    big = io.BytesIO()
    Image.new("RGB", (100, 100), "white").save(big, format="PNG")           # 10,000 pixels in a few hundred bytes
    big_url = "data:image/png;base64," + base64.b64encode(big.getvalue()).decode()
    small = io.BytesIO()
    Image.new("RGB", (10, 10), "white").save(small, format="PNG")
    small_url = "data:image/png;base64," + base64.b64encode(small.getvalue()).decode()
    server = start_server("--max-tokens", "8", "--max-image-pixels", "5000", "--max-images", "1", "--max-image-mb",
                    f"{(len(big.getvalue()) + 10) / 2**20}", "--max-body-mb", "0.1", "--batch-wait-ms", "600",
                    "--served-name", "shapes")
    question = text(SAMPLE[0]["question"])
    assert server.request("GET", "/v1/models")[2]["data"][0]["id"] == "shapes"
    cases = [({"messages": [user(picture(big_url), question)]}, 413, "image_too_large"),           # pixels
             ({"messages": [user(picture(PNG), question)]}, 413, "image_too_large"),               # bytes
             ({"messages": [user(picture(small_url), picture(small_url), question)]}, 413, "too_many_images"),
             ({"messages": [user(question)], "max_tokens": 9}, 400, "max_tokens"),
             ({"messages": [user(question)], "pad": "x" * 120_000}, 413, "body_too_large")]
    for body, status, named in cases:
        got, _, reply = server.request("POST", "/v1/chat/completions", body)
        assert got == status and named in (reply["error"]["code"], reply["error"]["param"]), reply
    start = time.perf_counter()
    got, _, reply = server.request("POST", "/v1/chat/completions", {"messages": [user(question)],
                                                                     "model": "shapes", "ignore_eos": True})
    assert got == 200 and reply["usage"]["completion_tokens"] == 8                 # the cap is the default
    assert time.perf_counter() - start >= 0.6                                     # waited for company


def test_serve_defaults_to_loopback_and_refuses_bad_settings(capsys):
    import argparse

    from minifastv.cli import main
    from minifastv.serve import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).host == "127.0.0.1"
    for flags, message in ((["--max-batch", "0"], "--max-batch must be positive"),
                           (["--max-queue", "-1"], "--max-queue must be 0 or more"),
                           (["--port", "70000"], "--port must be in 0..65535"),
                           (["--allow-files", "/nonexistent"], "not a directory")):
        assert main(["serve", *flags]) == 2 and message in capsys.readouterr().err


def test_a_failing_pass_tells_its_requests_and_the_engine_goes_on(pipe, monkeypatch):
    import queue

    from minifastv.serve.engine import Engine, Job

    engine = Engine(pipe, batch_wait=0).start()
    ids = pipe.inputs([SAMPLES / SAMPLE[1]["image"]], SAMPLE[1]["question"])
    events = queue.Queue()
    job = lambda: Job(ids.input_ids[0].tolist(), ids.pixel_values, None, 4, events.put)  # noqa: E731
    real = pipe.model.prefill
    monkeypatch.setattr(pipe.model, "prefill", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    engine.submit(job())
    kind, error = events.get(timeout=30)
    assert kind == "error" and (error.status, error.code, error.message) == (500, "generation_failed",
                                                                             "RuntimeError: out of memory")
    assert error.body()["error"]["type"] == "server_error"
    monkeypatch.setattr(pipe.model, "prefill", real)
    engine.submit(job())
    kind, *rest = events.get(timeout=30)
    while kind == "text":
        kind, *rest = events.get(timeout=30)
    assert kind == "done" and rest[0].text == SAMPLE[1]["answer"]
    wait_for(lambda: engine.running == 0)   # the count is updated after the answer is handed over
    engine.drain(0)
    engine.close()
