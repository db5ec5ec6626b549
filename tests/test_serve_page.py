"""The server's web page in a real headless browser (Debian's chromium and chromedriver, driven by selenium):
pick an image, ask, and the streamed answer and the kept-patch overlay are the model's."""

import os
import shutil
from pathlib import Path

import pytest
from serving import SAMPLE

from minifastv.data import SAMPLES
from minifastv.pruning import make

webdriver = pytest.importorskip("selenium.webdriver")
BROWSER, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (BROWSER and DRIVER):
    if os.environ.get("MINIFASTV_REQUIRE_BROWSER"):   # .ci/run installs them: there, a missing browser fails
        raise RuntimeError("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
    pytest.skip("no chromium/chromedriver on this machine (apt-get install chromium chromium-driver)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})   # the console, read by the test
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_streams_the_answer_and_outlines_the_kept_patches(browser, tmp_path, tiny_pipe, start_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    pipe = tiny_pipe
    server = start_server()
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "method")).options) > 1)
    vocabulary = browser.find_element(By.ID, "vocabulary")                 # the tiny model's words, said up front
    assert vocabulary.is_displayed() and " ".join(pipe.tokenizer.known_words()) in vocabulary.text
    assert [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []   # no favicon 404
    browser.find_element(By.ID, "question").send_keys("what colour?")      # no image yet: asked for, nothing sent
    browser.find_element(By.ID, "send").click()
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and error.text.startswith("Pick an image first")
    assert not browser.find_elements(By.CSS_SELECTOR, "#turns li") and server.health()["decode_steps"] == 0
    browser.find_element(By.ID, "question").clear()
    browser.find_element(By.ID, "file").send_keys(str(SAMPLES / SAMPLE[0]["image"]))
    wait.until(lambda d: d.find_element(By.ID, "image").get_attribute("src").startswith("data:image/png"))
    Select(browser.find_element(By.ID, "method")).select_by_value("fastv")
    ratio = browser.find_element(By.ID, "ratio")
    ratio.clear()
    ratio.send_keys("0.75")
    answers = []
    for turn, question in enumerate([SAMPLE[0]["question"], "which shape is in row four column four?"]):
        browser.find_element(By.ID, "question").send_keys(question)
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#turns li.assistant.done")) == turn + 1)
        answers.append(browser.execute_script(
            "const li = [...document.querySelectorAll('#turns li.assistant')].pop(); return li.firstChild.data;"))
        assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    first = pipe.answer([SAMPLES / SAMPLE[0]["image"]], SAMPLE[0]["question"], prune=make("fastv", 0.75))
    assert answers[0] == first.text
    kept = browser.find_elements(By.CSS_SELECTOR, "#overlay rect.kept")
    dropped = browser.find_elements(By.CSS_SELECTOR, "#overlay rect.dropped")
    reported = browser.find_element(By.ID, "kept").text                    # "16 / 64", from the last answer
    assert reported == f"{len(kept)} / 64" and len(kept) + len(dropped) == 64 and len(kept) == 16
    assert len(browser.find_elements(By.CSS_SELECTOR, "#turns li.user")) == 2
    shot = Path(os.environ.get("MINIFASTV_SCREENSHOT", tmp_path / "page.png"))
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_the_page_takes_a_video_and_outlines_the_kept_patches_frame_by_frame(browser, tmp_path, start_server,
                                                                             random_video_dir):
    """A video model's page: the server sends the sampled frames as the model sees them, and after the answer
    each frame shows its own kept patches and a bar for its class token, as the library reports them."""
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from minifastv.pipeline import Pipeline

    pipe = Pipeline.load(random_video_dir, dtype="float32")
    q = json.loads((SAMPLES / "video_questions.json").read_text())[0]
    server = start_server("--model", str(random_video_dir))
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "method")).options) > 1)
    assert "videos of 8 frames" in browser.find_element(By.ID, "model").text
    browser.find_element(By.ID, "file").send_keys(str(SAMPLES / q["video"]))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#frames .frame img")) == 8)
    Select(browser.find_element(By.ID, "method")).select_by_value("fastv")
    browser.find_element(By.ID, "question").send_keys(q["question"])
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#turns li.assistant.done")) == 1)
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    alone = pipe.answer([], q["question"], videos=[SAMPLES / q["video"]], prune=make("fastv", 0.5))
    text = browser.execute_script("return document.querySelector('#turns li.assistant').firstChild.data;")
    assert text == alone.text
    frames = browser.find_elements(By.CSS_SELECTOR, "#frames .frame")
    for f, frame in enumerate(frames):
        rects = frame.find_elements(By.CSS_SELECTOR, "svg rect")
        kept = [i for i, r in enumerate(rects) if r.get_attribute("class") == "kept"]
        assert len(rects) == 16 and kept == alone.kept_patches[f]
        bar = frame.find_element(By.CSS_SELECTOR, ".cls").get_attribute("class")
        assert bar == ("cls kept" if f in alone.kept_class_tokens[0] else "cls dropped")
    assert browser.find_element(By.ID, "kept").text == f"{alone.kept} / 136"
    shot = Path(os.environ.get("MINIFASTV_VIDEO_SCREENSHOT", tmp_path / "video_page.png"))
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_a_qwen_vl_page_shows_the_squashed_image_and_the_kept_queries(browser, tmp_path, start_server):
    """Qwen-VL resizes the whole image to a square (image mode "squash"): the page draws it so, and outlines the
    kept tokens on the resampler's 4 x 4 grid of queries as the library reports them."""
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from minifastv.data import TINY_QWEN_MODEL
    from minifastv.pipeline import Pipeline

    wide = Image.new("RGB", (120, 40), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 20, 40))            # a red left sixth: a crop would cut it, a pad would add grey
    wide.save(tmp_path / "wide.png")
    server = start_server("--model", str(TINY_QWEN_MODEL))
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "method")).options) > 1)
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "wide.png"))
    wait.until(lambda d: d.find_element(By.ID, "image").get_attribute("src").startswith("data:image/png"))
    corners = browser.execute_script("""
        const img = document.getElementById('image'), c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
        const at = (x, y) => Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3));
        return [c.width, c.height, at(2, 2), at(2, c.height - 3), at(c.width - 3, 2)];""")
    assert corners == [120, 120, [255, 0, 0], [255, 0, 0], [0, 0, 255]]
    question = "what colour is the shape in row one column one?"
    Select(browser.find_element(By.ID, "method")).select_by_value("fastv")
    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#turns li.assistant.done")) == 1)
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    alone = Pipeline.load(TINY_QWEN_MODEL, dtype="float32").answer([tmp_path / "wide.png"], question,
                                                                   prune=make("fastv", 0.5))
    assert browser.execute_script("return document.querySelector('#turns li.assistant').firstChild.data;") == alone.text
    rects = browser.find_elements(By.CSS_SELECTOR, "#overlay rect")
    kept = [i for i, r in enumerate(rects) if r.get_attribute("class") == "kept"]
    assert len(rects) == 16 and kept == alone.kept_patches[0]
    assert browser.find_element(By.ID, "kept").text == "8 / 16"
