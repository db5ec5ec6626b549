"""The server's request reading and its engine's bookkeeping, in process (no HTTP): the boundaries and defaults a
single changed line would move without the end-to-end tests noticing."""

import base64
import io

import pytest
import torch
from PIL import Image
from serving import SAMPLE, image_message

from minifastv.data import SAMPLES
from minifastv.pruning import FastV, RandomDrop

pytest.importorskip("starlette")
from minifastv.serve import protocol
from minifastv.serve.engine import Engine, Job, QueueFull, groups


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


def request(pipe, *messages, limits=None, default_prune=None, **fields):
    body = {"messages": list(messages) or [image_message(SAMPLES / SAMPLE[0]["image"], SAMPLE[0]["question"])],
            **fields}
    return protocol.read_request(body, pipe, limits or protocol.Limits(), default_prune, "tiny")


def error(call, *args, **kwargs) -> protocol.ApiError:
    with pytest.raises(protocol.ApiError) as e:
        call(*args, **kwargs)
    return e.value


def test_the_servers_seed_stays_with_its_method():
    server = RandomDrop(ratio=0.5, k=1, seed=7)
    for body in ({"prune_ratio": 0.25}, {"prune": "random"}, {"prune_k": 2}, {"prune": "random", "prune_ratio": 0.75}):
        assert protocol.read_pruning(body, server).seed == 7, body
    assert protocol.read_pruning({"prune": "random"}, FastV(2, 0.5)).seed == 0   # another method: its own default


def test_the_image_byte_cap_is_on_the_decoded_bytes(pipe):
    data = (SAMPLES / "heldout_0.png").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    exact = protocol.read_image(url, "x", protocol.Limits(max_image_bytes=len(data)))   # at the cap: taken
    assert exact.size == Image.open(SAMPLES / "heldout_0.png").size
    e = error(protocol.read_image, url, "x", protocol.Limits(max_image_bytes=len(data) - 1))
    assert (e.status, e.code) == (413, "image_too_large")


def test_exactly_max_images_is_taken_and_one_more_is_413(pipe):
    limits = protocol.Limits(max_images=2)
    part = image_message(SAMPLES / SAMPLE[0]["image"], "x")["content"][0]
    two = {"role": "user", "content": [part, part, {"type": "text", "text": SAMPLE[0]["question"]}]}
    assert request(pipe, two, limits=limits)["pixels"].shape[0] == 2
    three = {"role": "user", "content": [part, *two["content"]]}
    e = error(request, pipe, three, limits=limits)
    assert (e.status, e.code) == (413, "too_many_images")
    assert e.message == "3 images in one request; the server takes at most 2"


def test_max_tokens_is_capped_by_the_room_the_prompt_leaves(pipe):
    limits = protocol.Limits(max_tokens=100_000)
    default = request(pipe, limits=limits)
    room = pipe.model.config.text.max_seq_len - pipe.model.merged_slots(torch.tensor([default["ids"]]))[1]
    assert default["max_tokens"] == room
    assert request(pipe, limits=limits, max_tokens=room)["max_tokens"] == room
    e = error(request, pipe, limits=limits, max_tokens=room + 1)
    assert e.param == "max_tokens" and "the prompt takes" in e.message
    assert request(pipe, max_completion_tokens=3)["max_tokens"] == 3
    assert request(pipe, max_completion_tokens=3, max_tokens=5)["max_tokens"] == 5   # max_tokens, when both come
    assert request(pipe, seed=0)["seed"] == 0


def test_earlier_answers_end_with_eos_as_vicuna_v1_lays_them_out(pipe):
    first = image_message(SAMPLES / SAMPLE[0]["image"], SAMPLE[0]["question"])
    alone = request(pipe, first)["ids"]
    ids = request(pipe, first, {"role": "assistant", "content": "red"}, {"role": "user", "content": "and?"})["ids"]
    answer = pipe.tokenizer.encode_text("red")
    eos = pipe.model.config.text.eos_token_id
    assert ids[:len(alone)] == alone and ids[len(alone):len(alone) + len(answer) + 1] == answer + [eos]
    assert ids[len(alone) + len(answer) + 1:] == pipe.tokenizer.encode_turn("and?")


def test_error_messages_read_as_english_and_name_the_part(pipe):
    assert error(request, pipe, max_tokens="4").message == "max_tokens must be an integer, got str '4'"
    e = error(request, pipe, {"role": "assistant", "content": "x"})
    assert e.message.startswith("messages[0]: an assistant message cannot come here")
    junk = "data:image/png;base64," + base64.b64encode(b"hello world").decode()
    e = error(protocol.read_image, junk, "messages[0].content[0]", protocol.Limits())
    assert e.message == "messages[0].content[0]: not a readable image (not a format the server reads)"
    big = io.BytesIO()
    Image.new("RGB", (101, 100)).save(big, format="PNG")
    e = error(protocol.read_image, "data:image/png;base64," + base64.b64encode(big.getvalue()).decode(), "p",
              protocol.Limits(max_image_pixels=10_000))
    assert e.message == "p: 101 x 100 pixels is over the 10,000 pixels (100 x 100) the server takes"
    assert "16,777,216 pixels (4096 x 4096)" in protocol.Limits().describe()


def test_a_request_without_pictures_is_prefilled_unpruned(pipe):
    prune = FastV(2, 0.5)
    job = lambda pixels: Job([1, 2], pixels, prune, 4, print)
    text, picture = job(None), job(torch.zeros(1, 3, 32, 32))
    assert groups([text, picture]) == [(None, [text]), (prune, [picture])]


def test_gone_requests_free_their_queue_places(pipe):
    engine = Engine(pipe, max_batch=1, max_queue=1)        # not started: nothing is taken from the queue
    sent = []
    jobs = [Job([1, 2], None, None, 4, sent.append) for _ in range(3)]
    engine.submit(jobs[0])                                 # the batch's free row
    engine.submit(jobs[1])                                 # the one place in the queue
    with pytest.raises(QueueFull):
        engine.submit(jobs[2])
    jobs[0].cancel()
    engine.submit(jobs[2])                                 # the gone request's place is free at once
    assert [(kind, e.code) for kind, e in sent] == [("error", "cancelled")]
    assert engine.n_waiting() == 2 and engine.cancelled == 1
    jobs[1].cancel()
    assert engine.take(8) == [jobs[2]] and engine.cancelled == 2   # a gone request is never prefilled
