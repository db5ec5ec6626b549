"""The server with a video model: video_url content parts as vLLM takes them (data: URLs, or files under
--allow-files), each answer what the library gives for the same question alone, the caps on a video's bytes,
frames and pixels printed at start and applied, and the 4xx answers for videos as for images."""

import base64
import json

from serving import data_url

from minifastv.data import SAMPLES

VIDEOS = json.loads((SAMPLES / "video_questions.json").read_text())


def video_url(path) -> str:
    return "data:video/x-matroska;base64," + base64.b64encode(path.read_bytes()).decode()


def video_message(url, question, *more) -> dict:
    return {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, *more,
                                        {"type": "text", "text": question}]}


def write_video(path, n, size=(32, 32), noise=False):
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = *size, "bgr0"
        for i in range(n):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) if noise else \
                np.full((size[1], size[0], 3), i * 10, dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="bgr0")))
        out.mux(stream.encode())
    return path


def test_a_video_request_is_answered_as_the_library_answers_it(random_video_dir, start_server, tmp_path):
    from minifastv.pipeline import Pipeline
    from minifastv.pruning import make

    pipe = Pipeline.load(random_video_dir, dtype="float32")
    server = start_server("--model", str(random_video_dir), "--allow-files", str(SAMPLES), "--prune", "fastv")
    limits = next(line for line in iter(server.proc.stderr.readline, "") if line.startswith("limits:"))
    assert "images a request, video 50 MiB and 100000 frames, 1 video a request" in limits
    for q in VIDEOS[:2]:
        alone = pipe.answer([], q["question"], videos=[SAMPLES / q["video"]], prune=make("fastv", 0.5),
                            max_new_tokens=4)
        for url in (video_url(SAMPLES / q["video"]), q["video"]):     # a data: URL, a file under --allow-files
            status, _, reply = server.request("POST", "/v1/chat/completions", {
                "messages": [video_message(url, q["question"])], "temperature": 0, "max_tokens": 4})
            assert status == 200, reply
            usage = reply["usage"]
            assert reply["choices"][0]["message"]["content"] == alone.text
            assert usage["kept_patches"] == alone.kept_patches and usage["kept_class_tokens"] == alone.kept_class_tokens
            assert (usage["image_tokens"], usage["image_tokens_kept"]) == (136, 68)
            assert (alone.n_image_tokens, alone.kept) == (136, 68)
    # An image and a video in one message
    image = SAMPLES / "heldout_0.png"
    q = VIDEOS[0]
    alone = pipe.answer([image], q["question"], videos=[SAMPLES / q["video"]], max_new_tokens=3)
    status, _, reply = server.request("POST", "/v1/chat/completions", {
        "messages": [video_message(video_url(SAMPLES / q["video"]), q["question"],
                                   {"type": "image_url", "image_url": {"url": data_url(image)}})],
        "temperature": 0, "max_tokens": 3, "prune": None})
    assert status == 200 and reply["choices"][0]["message"]["content"] == alone.text, reply


def test_the_video_caps_and_bad_videos_get_their_4xx(random_video_dir, start_server, tmp_path):
    long = video_url(write_video(tmp_path / "long.mkv", 12))
    heavy = video_url(write_video(tmp_path / "heavy.mkv", 4, noise=True))
    wide = video_url(write_video(tmp_path / "wide.mkv", 2, size=(200, 100)))
    sample = video_url(SAMPLES / VIDEOS[0]["video"])
    server = start_server("--model", str(random_video_dir), "--max-video-frames", "10", "--max-video-mb",
                          f"{(len(sample) + 100) / 2**20 * 3 / 4}", "--max-image-pixels", "10000")
    question = VIDEOS[0]["question"]
    cases = [(video_message(long, question), 413, "video_too_large", "more than the cap of 10 frames"),
             (video_message(heavy, question), 413, "video_too_large", "bytes the server takes"),
             (video_message(wide, question), 413, "video_too_large", "200 x 100 pixels"),
             (video_message("data:video/mp4;base64," + base64.b64encode(b"not a video").decode(), question), 400,
              "invalid_video", "not a video"),
             (video_message(sample, question, {"type": "video_url", "video_url": {"url": sample}}), 413,
              "too_many_videos", "2 videos in one request"),
             (video_message("https://example.com/v.mp4", question), 400, "url_not_allowed", "never fetches"),
             (video_message(SAMPLES / VIDEOS[0]["video"], question), 403, "file_not_allowed", "--allow-files"),
             ({"role": "user", "content": f"<video>\n{question}"}, 400, "messages[0].content", "video_url parts")]
    for message, status, named, says in cases:
        message = json.loads(json.dumps(message, default=str))
        got, _, reply = server.request("POST", "/v1/chat/completions", {"messages": [message], "max_tokens": 2})
        assert got == status and named in (reply["error"]["code"], reply["error"]["param"]), reply
        assert says in reply["error"]["message"], reply
    got, _, reply = server.request("POST", "/v1/chat/completions", {"messages": [video_message(sample, question)],
                                                                     "max_tokens": 2})
    assert got == 200, reply                                                       # and the server is still up


def test_an_image_model_refuses_a_video_part(start_server):
    server = start_server()
    got, _, reply = server.request("POST", "/v1/chat/completions", {
        "messages": [video_message(video_url(SAMPLES / VIDEOS[0]["video"]), "what colour")]})
    assert got == 400 and reply["error"]["code"] == "video_not_supported", reply


def test_frames_the_preprocessing_refuses_are_a_400_not_a_500(random_video_dir, monkeypatch):
    """read_request in process: a ValueError from preprocessing the decoded frames is the request's error."""
    import minifastv.serve.protocol as protocol
    from minifastv.pipeline import Pipeline

    pipe = Pipeline.load(random_video_dir, dtype="float32")
    body = {"messages": [video_message(video_url(SAMPLES / VIDEOS[0]["video"]), VIDEOS[0]["question"])]}
    assert protocol.read_request(body, pipe, protocol.Limits(), None, "m")["videos"].shape == (1, 8, 3, 32, 32)
    monkeypatch.setattr(protocol, "video_values", lambda *a: (_ for _ in ()).throw(ValueError("frame 3: no pixels")))
    try:
        protocol.read_request(body, pipe, protocol.Limits(), None, "m")
    except protocol.ApiError as e:
        assert (e.status, e.code, e.message) == (400, "invalid_video", "frame 3: no pixels")
    else:
        raise AssertionError("no error")
