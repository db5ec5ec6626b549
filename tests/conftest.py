"""The tests' shared fixtures; the helpers they use are in helpers.py (a plain module, imported by name)."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
from helpers import build_tokenizer, hf_clip, hf_llava, to_minifastv
from torch import nn


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """The tests never write the user's kernel cache (quant/kernels.py); child processes inherit this too."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("MINIFASTV_CACHE", str(tmp_path_factory.mktemp("kernel-cache")))
        yield


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def twin():
    """twin(**spec) -> (a random transformers LLaVA built by helpers.hf_llava(**spec), its minifastv twin converted
    by the production converter, with CLIP's text tower of helpers.hf_clip if clip=True), made once per session for
    each spec."""
    made = {}

    def make(clip=False, **spec):
        key = (clip, *sorted(spec.items()))
        if key not in made:
            hf = hf_llava(**spec)
            made[key] = hf, to_minifastv(hf, hf_clip(hf, seed=spec.get("seed", 0)) if clip else None)
        return made[key]

    return make


@pytest.fixture(scope="session")
def random_video_dir(tmp_path_factory):
    """A tiny Video-LLaVA checkpoint (train_tiny.py's tiny video preset and tokenizer) with seeded random weights:
    the mechanics of video at the entry points, not the answers' quality (test_tiny_video.py checks those)."""
    import minifastv
    import train_tiny

    path = tmp_path_factory.mktemp("video") / "tiny-video"
    tok = train_tiny.build_tokenizer("video")
    minifastv.save(train_tiny.build_model(tok, seed=3, task="video"), tok, path)
    return path


@pytest.fixture(scope="session")
def tiny_pipe():
    """The shipped tiny model in float32, with its tokenizer; shared, so tests read it and never change it."""
    from minifastv import Pipeline
    from minifastv.data import TINY_MODEL

    return Pipeline.load(TINY_MODEL, dtype="float32")


@pytest.fixture
def start_server():
    """start_server(*options) -> a serving.Server; every server a test starts is stopped when the test ends."""
    from serving import Server

    started = []

    def start(*options):
        started.append(Server(*options))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def open_clip_modules():
    """open_clip's transformer.py and pos_embed.py without its package __init__, which imports torchvision (PyPI's
    build does not load beside the CPU torch): its model code needs only torchvision's FrozenBatchNorm2d name."""
    spec = importlib.util.find_spec("open_clip")
    saved = {name: sys.modules.get(name) for name in ("open_clip", "torchvision", "torchvision.ops",
                                                       "torchvision.ops.misc")}
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = nn.BatchNorm2d
    sys.modules.update({"open_clip": package, "torchvision": types.ModuleType("torchvision"),
                        "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc})
    try:   # imported, the modules keep what they took; the stand-ins leave at once (transformers looks for them)
        modules = importlib.import_module("open_clip.transformer"), importlib.import_module("open_clip.pos_embed")
    finally:
        for name in [n for n in sys.modules if n == "open_clip" or n.startswith(("open_clip.", "torchvision"))]:
            del sys.modules[name]
        sys.modules.update({k: v for k, v in saved.items() if v is not None})
    return modules
