"""Test helpers (a plain module; conftest.py holds the fixtures): tiny random transformers LLaVA models, their
minifastv twins through the production converter, prompts and pixels, a tokenizer built here, the noise twins
that bound a quantized model's error."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from minifastv import load
from minifastv.convert import convert
from minifastv.quant import quantized_modules

IMAGE_TOKEN = 127  # llava-hf style: the image id is a vocabulary entry, so transformers can embed it
VOCAB = 128
IMAGE_SIZE, PATCH = 28, 7  # 16 patches per image


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.2):
    """Every parameter random, norms included, so a wrong eps, bias or weight cannot hide behind init values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1 + noise if ("norm" in name and name.endswith("weight")) else noise)
    return model


def hf_llava(*, n_kv_heads=4, rms_eps=1e-5, rope_theta=10000.0, seed=0, feature_layer=-2, text_layers=3, text_dim=64,
             text_intermediate=96):
    """A small random transformers LlavaForConditionalGeneration in fp32 with eager attention."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=VOCAB, hidden_size=text_dim, intermediate_size=text_intermediate, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=n_kv_heads, rms_norm_eps=rms_eps,
                       max_position_embeddings=512, pad_token_id=0,
                       rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
                      vision_feature_layer=feature_layer, image_seq_length=(IMAGE_SIZE // PATCH) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    return randomize(model, seed).eval()


def to_minifastv(hf_model, clip=None):
    """The minifastv twin of a transformers model, through the production path: the model is written to disk
    with its transformers names and config.json, converted by minifastv.convert, and opened by minifastv.load.
    `clip`: a transformers CLIPModel (hf_clip) whose text tower joins it (convert's --clip-text)."""
    with tempfile.TemporaryDirectory() as tmp:
        text = None if clip is None else write_clip_checkpoint(clip, Path(tmp) / "clip")
        convert(write_hf_checkpoint(hf_model, Path(tmp) / "src"), Path(tmp) / "out", clip_text=text,
                log=lambda _: None)
        return load(Path(tmp) / "out", dtype=None)


CLIP_VOCAB, CLIP_START, CLIP_END = 584, 582, 583   # build_clip_tokenizer's: the start and end of text come last
CLIP_WORDS = ["What colour is the square?", "Is there a circle at the top left?", "how many triangles are there",
              "Describe the image in detail.", "which shape is in row two, column three"]


def build_clip_tokenizer(path: Path) -> Path:
    """A small byte-level BPE tokenizer in CLIP's layout (train_tiny.build_clip_tokenizer, the tiny model's maker)
    trained on a few questions, saved as tokenizer.json."""
    import train_tiny

    train_tiny.build_clip_tokenizer(CLIP_WORDS * 20).save(str(path))
    return path


def hf_clip(llava, *, seed=0, eos_token_id=2, n_positions=16):
    """A small random transformers CLIPModel whose vision half is `llava`'s tower (a LLaVA is built on its CLIP),
    with a text tower over build_clip_tokenizer's ids; chunks of n_positions tokens. eos_token_id 2 pools at
    the largest id (the openai configs), else at that id's first place."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    text = CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=n_positions, eos_token_id=eos_token_id,
                          bos_token_id=CLIP_START, projection_dim=24)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=llava.config.vision_config.to_dict(), projection_dim=24)
    torch.manual_seed(seed)
    model = randomize(CLIPModel._from_config(cfg, attn_implementation="eager"), seed)
    model.vision_model.load_state_dict(llava.model.vision_tower.state_dict())
    return model.eval()


def write_clip_checkpoint(clip, directory: Path) -> Path:
    """A transformers CLIPModel as a checkpoint directory: config.json, safetensors, CLIP's tokenizer.json."""
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(clip.config.to_dict()))
    build_clip_tokenizer(directory / "tokenizer.json")
    return directory


def write_hf_checkpoint(hf_model, directory: Path) -> Path:
    """A transformers model as a checkpoint directory with its own names: config.json, safetensors, tokenizer."""
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    build_tokenizer(directory / "tokenizer.json")
    return directory


def expand_images(ids: list[int], n_patches: int) -> list[int]:
    """transformers' input form: each image placeholder repeated once per patch."""
    return [t for i in ids for t in ([i] * n_patches if i == IMAGE_TOKEN else [i])]


def random_prompt(g: torch.Generator, n_text: int, image_at: list[int]) -> list[int]:
    """BOS, then n_text random ordinary tokens with image placeholders inserted before the given text indices."""
    text = torch.randint(4, VOCAB - 1, (n_text,), generator=g).tolist()
    ids = [1]
    for i, t in enumerate(text):
        ids += [IMAGE_TOKEN] * image_at.count(i) + [t]
    return ids


def random_pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def build_tokenizer(path: Path) -> Path:
    """A small BPE tokenizer in the LLaMA style (Metaspace pre-tokenizer, BOS added by a post-processor),
    trained here with the `tokenizers` library, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    corpus = ["A chat between a curious user and an artificial intelligence assistant.",
              "USER: What colour is the square? ASSISTANT: red", "Is there a circle at the top left? yes",
              "how many triangles are there\nthree", "The assistant gives helpful, detailed, and polite answers."]
    tok.train_from_iterator(corpus * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))
    return path


@torch.no_grad()
def assert_batch_equals_alone(model, prompts, pixels, prune=None, new_tokens=8, videos=None):
    """A left-padded batch of `prompts` (lists of ids; `pixels`: one tensor of images per prompt, or None;
    `videos`: likewise, video_values per prompt) gives each sample what it gives alone: the same kept image
    slots (shifted by the extra padding), tokens per layer and FLOPs, last-position logits within 1e-4 and
    greedy tokens. Returns the batch's Prefill."""
    from minifastv import generate
    from minifastv.inputs import left_pad

    def joined(tensors):
        given = [t for t in tensors if t is not None]
        return torch.cat(given) if given else None

    videos = [None] * len(prompts) if videos is None else videos
    visual = (lambda v: {} if v is None else {"video_values": v})
    ids, mask, _ = left_pad(prompts, pad_id=0)
    every = visual(joined(videos))
    batch = model.prefill(ids, joined(pixels), attention_mask=mask, prune=prune, **every)
    batch_gen = generate(model, ids, joined(pixels), attention_mask=mask, max_new_tokens=new_tokens, prune=prune,
                         **every)
    for i, (prompt, px, video) in enumerate(zip(prompts, pixels, videos)):
        alone = model.prefill(torch.tensor([prompt]), px, prune=prune, **visual(video))
        offset = batch.valid.shape[1] - alone.valid.shape[1]              # extra left padding in the batch
        assert [s - offset for s in batch.kept_image_slots()[i]] == alone.kept_image_slots()[0]
        assert batch.layer_tokens[i].tolist() == alone.layer_tokens[0].tolist() and batch.flops[i] == alone.flops[0]
        assert (batch.logits[i, -1] - alone.logits[0, -1]).abs().max() <= 1e-4
        assert batch_gen[i].tolist() == generate(model, torch.tensor([prompt]), px, max_new_tokens=new_tokens,
                                                 prune=prune, **visual(video))[0].tolist()
    return batch


def noise_twin(model, quantized, seed: int):
    """`model` with Gaussian noise of variance step^2 / 12 on every weight that `quantized` quantizes."""
    twin, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    stored = quantized.state_dict()  # the stored form, also of packed int4 weights
    steps = {name: stored[f"{name}.scale"].float() for name, _ in quantized_modules(quantized)}
    with torch.no_grad():
        for name, linear in quantized_modules(twin):
            step = steps[name]
            step = step[:, None] if step.ndim == 1 else step.repeat_interleave(quantized.config.quant.group_size, 1)
            linear.weight += torch.randn(linear.weight.shape, generator=g) * step.expand_as(linear.weight) / 12**0.5
    return twin


def activation_noise(model, seed: int):
    """Gaussian noise of variance step^2 / 12 on the inputs of every quantized linear, step = the row's
    absmax / 127: what rounding the activations to int8 adds."""
    g = torch.Generator().manual_seed(seed)

    def add(module, args):
        x = args[0]
        step = x.abs().amax(-1, keepdim=True) / 127
        return (x + torch.randn(x.shape, generator=g) * step / 12**0.5,)

    for _, linear in quantized_modules(model):
        linear.register_forward_pre_hook(add)
    return model


@torch.no_grad()
def assert_decode_within_noise_twin(fp32, q, ids, px, steps: int, activations: bool = False) -> torch.Tensor:
    """The logits of q's prefill and steps - 1 decode steps, against fp32 recomputing each prefix from scratch: the
    error's mean within 1.3x the noise twin's (three draws; with activation noise for int8 activations) and its
    max within 2x. Returns q's logits."""
    from minifastv import generate

    out, logits = generate(q, ids, px, max_new_tokens=steps, return_logits=True)
    prefixes = [torch.cat([ids, out[:, :step]], 1) for step in range(steps)]
    ref = torch.cat([fp32(p, px)[:, -1] for p in prefixes])
    err = (logits[0] - ref).abs()
    twins = []
    for seed in range(3):
        twin = noise_twin(fp32, q, seed)
        twin = activation_noise(twin, seed) if activations else twin
        twins.append((torch.cat([twin(p, px)[:, -1] for p in prefixes]) - ref).abs())
    twin_mean, twin_max = (sum(getattr(t, f)() for t in twins) / 3 for f in ("mean", "max"))
    assert err.mean() <= 1.3 * twin_mean and err.max() <= 2 * twin_max, (err.mean(), twin_mean, err.max(), twin_max)
    return logits


REPOSITORY = Path(__file__).resolve().parent.parent


def run_cli(*args):
    """`python -m minifastv ARGS` in a subprocess from the repository root: its CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "minifastv", *map(str, args)], capture_output=True, text=True,
                          cwd=REPOSITORY, timeout=120, check=False)
