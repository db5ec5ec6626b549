"""Video-LLaVA against transformers' VideoLlavaForConditionalGeneration on the same random weights, converted by
the production converter: images alone, videos alone, both, batched with padding, generation, FastV over a video
against a gather-and-rerun reference built from transformers' own layers, and both checkpoint layouts."""

import json

import pytest
import torch
from helpers import IMAGE_SIZE, IMAGE_TOKEN, PATCH, VOCAB, build_tokenizer, randomize, write_hf_checkpoint
from safetensors.torch import load_file, save_file

import minifastv
from minifastv import FastV, generate
from minifastv.convert import ConversionError, convert
from minifastv.inputs import left_pad
from minifastv.models import VideoLlavaConfig, VideoLlavaModel
from minifastv.pruning import make

VIDEO_TOKEN = 126
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2          # 16 per image
FRAMES = 4
N_VIDEO = FRAMES * (N_PATCHES + 1)              # 68 per video: each frame keeps its class token


def hf_video_llava(seed=0, n_kv_heads=2, text_layers=4):
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig as HFConfig
    from transformers import VideoLlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=n_kv_heads, rms_norm_eps=1e-5,
                       max_position_embeddings=512, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH)
    cfg = HFConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                   video_token_index=VIDEO_TOKEN, image_seq_length=N_PATCHES, video_seq_length=N_VIDEO)
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    return randomize(model, seed).eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_video_llava()
    root = tmp_path_factory.mktemp("video")
    convert(write_hf_checkpoint(hf, root / "src"), root / "out", log=lambda _: None)
    return hf, minifastv.load(root / "out", dtype=None), root


def prompt(seed, n_text, images=(), videos=()):
    """BOS, random text, an image placeholder before the text indices `images`, a video one before `videos`."""
    text = torch.randint(4, VOCAB - 2, (n_text,), generator=torch.Generator().manual_seed(seed)).tolist()
    ids = [1]
    for i, t in enumerate(text):
        ids += [IMAGE_TOKEN] * list(images).count(i) + [VIDEO_TOKEN] * list(videos).count(i) + [t]
    return ids


def expand(ids):
    """transformers' form: each placeholder repeated once per slot it stands for."""
    return [t for i in ids for t in [i] * {IMAGE_TOKEN: N_PATCHES, VIDEO_TOKEN: N_VIDEO}.get(i, 1)]


def pixels(n, seed):
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def frames(n, seed):
    return torch.randn(n, FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed + 100))


def hf_inputs(ids, n_images, n_videos, seed):
    kwargs = {"input_ids": torch.tensor([expand(ids)])}
    if n_images:
        kwargs["pixel_values"] = pixels(n_images, seed)
    if n_videos:
        kwargs["pixel_values_videos"] = frames(n_videos, seed)
    return kwargs


def ours_inputs(ids, n_images, n_videos, seed):
    return (torch.tensor([ids]), pixels(n_images, seed) if n_images else None,
            {"video_values": frames(n_videos, seed)} if n_videos else {})


CASES = {"video": ((), (3,)), "image": ((2,), ()), "image and video": ((2,), (6,)), "two videos": ((), (1, 7))}


def test_the_converted_config_is_video_llavas(pair):
    _, ours, _ = pair
    assert isinstance(ours, VideoLlavaModel) and isinstance(ours.config, VideoLlavaConfig)
    assert (ours.config.video_token_id, ours.config.n_frames, ours.config.image_token_id) == (VIDEO_TOKEN, FRAMES,
                                                                                            IMAGE_TOKEN)
    assert ours.spans() == {IMAGE_TOKEN: N_PATCHES, VIDEO_TOKEN: N_VIDEO}


def test_the_hf_prompt_is_transformers_documented_one(pair):
    """No system line: "USER: <video>\n{question} ASSISTANT:", the video placeholder as its one id."""
    from minifastv.pipeline import Pipeline

    _, _, root = pair
    pipe = Pipeline.load(root / "out", dtype=None)
    assert pipe.model.config.system == ""
    ids = pipe.inputs([], "what is it", [frames(1, 0)[0]]).input_ids[0].tolist()
    tok = pipe.tokenizer
    assert ids == [tok.bos_token_id] + tok.encode_text("USER: ") + [VIDEO_TOKEN] + tok.encode_text(
        "\nwhat is it ASSISTANT:")


@torch.no_grad()
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(pair, case):
    hf, ours, _ = pair
    images, videos = CASES[case]
    ids = prompt(len(case), 10, images, videos)
    ref = hf(**hf_inputs(ids, len(images), len(videos), seed=3)).logits
    ids_t, px, visual = ours_inputs(ids, len(images), len(videos), seed=3)
    got = ours(ids_t, px, **visual)
    assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-4


@torch.no_grad()
def test_greedy_generation_matches_transformers(pair):
    hf, ours, _ = pair
    ids = prompt(5, 8, (1,), (4,))
    ref = hf.generate(**hf_inputs(ids, 1, 1, seed=5), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    ids_t, px, visual = ours_inputs(ids, 1, 1, seed=5)
    got = generate(ours, ids_t, px, max_new_tokens=8, **visual)
    assert got[0].tolist() == ref[0, len(expand(ids)):].tolist()


@torch.no_grad()
@pytest.mark.parametrize("prune", [None, FastV(2, 0.5), make("random", 0.75)], ids=["unpruned", "fastv", "random"])
def test_a_padded_batch_gives_each_sample_what_it_gives_alone(pair, prune):
    _, ours, _ = pair
    samples = [(prompt(7, 12, (), (2,)), 0, 1), (prompt(8, 5, (1,), (3,)), 1, 1), (prompt(9, 9, (), (0,)), 0, 1)]
    ids, mask, _ = left_pad([s[0] for s in samples], pad_id=0)
    px = torch.cat([pixels(n, seed=i) for i, (_, n, _) in enumerate(samples) if n])
    vids = torch.cat([frames(v, seed=i) for i, (_, _, v) in enumerate(samples)])
    batch = ours.prefill(ids, px, attention_mask=mask, prune=prune, video_values=vids)
    batch_gen = generate(ours, ids, px, attention_mask=mask, max_new_tokens=5, prune=prune, video_values=vids)
    for i, (sample, n_images, n_videos) in enumerate(samples):
        alone_ids, alone_px, visual = ours_inputs(sample, n_images, n_videos, seed=i)
        alone_px = pixels(n_images, seed=i) if n_images else None
        visual = {"video_values": frames(n_videos, seed=i)}
        alone = ours.prefill(alone_ids, alone_px, prune=prune, **visual)
        offset = batch.valid.shape[1] - alone.valid.shape[1]
        assert [s - offset for s in batch.kept_image_slots()[i]] == alone.kept_image_slots()[0]
        assert (batch.logits[i, -1] - alone.logits[0, -1]).abs().max() <= 1e-4
        assert batch_gen[i].tolist() == generate(ours, alone_ids, alone_px, max_new_tokens=5, prune=prune,
                                                 **visual)[0].tolist()


@torch.no_grad()
def fastv_reference(hf, ids, n_images, n_videos, k, ratio, seed):
    """(kept slots, last-position logits): transformers' eager attention at layer k-1 ranks every visual token
    (a video's class tokens among them), its hidden states are gathered and its own layers k.. rerun."""
    kwargs = hf_inputs(ids, n_images, n_videos, seed)
    out = hf(**kwargs, output_hidden_states=True, output_attentions=True)
    expanded = kwargs["input_ids"][0]
    visual = (expanded == IMAGE_TOKEN) | (expanded == VIDEO_TOKEN)
    row = out.attentions[k - 1][0, :, -1, :].mean(0)
    slots = visual.nonzero()[:, 0]
    top = slots[row[slots].topk(round((1 - ratio) * len(slots))).indices]
    keep = sorted((~visual).nonzero()[:, 0].tolist() + top.tolist())
    lm = hf.model.language_model
    h, positions = out.hidden_states[k][:, keep], torch.tensor([keep])
    causal = torch.full((len(keep), len(keep)), float("-inf")).triu(1)[None, None]
    cos_sin = lm.rotary_emb(h, positions)
    for layer in lm.layers[k:]:
        h = layer(h, attention_mask=causal, position_ids=positions, position_embeddings=cos_sin)
        h = h[0] if isinstance(h, tuple) else h
    return keep, hf.lm_head(lm.norm(h))[:, -1]


@torch.no_grad()
@pytest.mark.parametrize("k, ratio", [(1, 0.5), (2, 0.5), (2, 0.75)])
@pytest.mark.parametrize("case", ["video", "image and video"])
def test_fastv_over_video_tokens_matches_a_gather_and_rerun_reference(pair, k, ratio, case):
    hf, ours, _ = pair
    images, videos = CASES[case]
    ids = prompt(k, 10, images, videos)
    ref_keep, ref_logits = fastv_reference(hf, ids, len(images), len(videos), k, ratio, seed=k)
    ids_t, px, visual = ours_inputs(ids, len(images), len(videos), seed=k)
    pre = ours.prefill(ids_t, px, prune=FastV(k, ratio), **visual)
    n_visual = len(images) * N_PATCHES + len(videos) * N_VIDEO
    assert pre.keep[0].tolist() == ref_keep and len(pre.kept_image_slots()[0]) == round((1 - ratio) * n_visual)
    assert (pre.logits[:, -1] - ref_logits).abs().max() <= 1e-4


def test_the_hub_layout_converts_to_the_same_model(pair, tmp_path):
    """LanguageBind's -hf names (language_model.model.*, image_tower.vision_model.*, video_tower.vision_model.*,
    multi_modal_projector.*) and transformers' own save give the same checkpoint."""
    hf, ours, root = pair
    hub = tmp_path / "hub"
    hub.mkdir()
    renames = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
               ("model.image_tower.", "image_tower.vision_model."),
               ("model.video_tower.", "video_tower.vision_model."),
               ("model.multi_modal_projector.", "multi_modal_projector.")]
    state = {}
    for key, tensor in load_file(str(root / "src" / "model.safetensors")).items():
        new = next((new + key[len(old):] for old, new in renames if key.startswith(old)), None)
        assert new is not None, key
        state[new] = tensor
    save_file(state, str(hub / "model.safetensors"))
    config = json.loads((root / "src" / "config.json").read_text())
    (hub / "config.json").write_text(json.dumps({**config, "architectures": ["VideoLlavaForConditionalGeneration"]}))
    build_tokenizer(hub / "tokenizer.json")
    convert(hub, tmp_path / "out", log=lambda _: None)
    theirs = load_file(str(tmp_path / "out" / "model.safetensors"))
    mine = load_file(str(root / "out" / "model.safetensors"))
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)
    assert minifastv.load(tmp_path / "out").config == ours.config


def test_bad_video_input_is_a_named_error(pair):
    _, ours, _ = pair
    ids = torch.tensor([prompt(1, 6, (), (2,))])
    with pytest.raises(ValueError, match="1 video placeholder.* but 0 video"):
        ours(ids)
    with pytest.raises(ValueError, match=rf"video_values must have shape \[num_videos, {FRAMES}, 3, 28, 28\]"):
        ours(ids, video_values=frames(1, 0)[:, :3])
    with pytest.raises(ValueError, match="do not take videos yet"):
        ours(ids, video_values=frames(1, 0), prune=make("fastervlm", 0.5))
    mixed = torch.tensor([prompt(1, 6, (1,), (2,))])
    with pytest.raises(ValueError, match="do not divide visual groups of different sizes"):
        ours(mixed, pixels(1, 0), video_values=frames(1, 0), prune=make("uniform", 0.5))


def test_a_llava_checkpoint_with_a_video_tower_is_refused(tmp_path):
    from helpers import hf_llava

    hf = hf_llava(seed=1)
    src = write_hf_checkpoint(hf, tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    state["model.video_tower.vision_model.pre_layrnorm.weight"] = torch.ones(32)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="unknown tensor 'model.video_tower.vision_model.pre_layrnorm.weight'"):
        convert(src, tmp_path / "out", log=lambda _: None)


def test_the_config_round_trips_and_is_checked():
    from minifastv.checkpoint import config_from_dict
    from minifastv.config import ConfigError
    from minifastv.models.video_llava import VIDEO_LLAVA_7B

    assert config_from_dict(json.loads(json.dumps(VIDEO_LLAVA_7B.to_dict()))) == VIDEO_LLAVA_7B
    assert VIDEO_LLAVA_7B.vision.n_patches == 256 and VIDEO_LLAVA_7B.n_frames * 257 == 2056
    from minifastv.data import TINY_MODEL

    assert "family" not in json.loads((TINY_MODEL / "config.json").read_text())  # LLaVA-1.5 by default
    assert minifastv.load(TINY_MODEL).config.family == "llava"
    with pytest.raises(ConfigError, match="unknown model family 'qwen'"):
        config_from_dict({"family": "qwen"})
    with pytest.raises(ConfigError, match="n_frames must be an integer in"):
        VideoLlavaConfig(n_frames=0)
    with pytest.raises(ConfigError, match="video_token_id 32000 collides"):
        VideoLlavaConfig(image_token_id=32000, video_token_id=32000)


def reference_attention(x, state, prefix, n_heads):
    """Multi-head attention of the sequence x [S, D] over itself, written out: q, k, v, softmax, merge, out."""
    S, D = x.shape
    d = D // n_heads
    q, k, v = (x @ state[f"{prefix}{p}_proj.weight"].T + state[f"{prefix}{p}_proj.bias"] for p in "qkv")
    out = torch.zeros(S, D)
    for h in range(n_heads):
        cols = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[:, cols] @ k[:, cols].T / d ** 0.5, dim=-1)
        out[:, cols] = weights @ v[:, cols]
    return out @ state[f"{prefix}o_proj.weight"].T + state[f"{prefix}o_proj.bias"]


@torch.no_grad()
def reference_temporal_tower(state, cfg, videos):
    """The original video tower (LanguageBind_Video_merge) from its description, one video, frame and token
    position at a time: patches + class token + positions, pre-norm; per block, each position's frames get the
    block's frame embedding and attend to each other (own LayerNorm, residual), then each frame runs the
    usual CLIP block. Returns [V, n_frames, n_patches + 1, D] at the feature layer."""
    ln = torch.nn.functional.layer_norm
    eps, D, heads = cfg.vision.norm_eps, cfg.vision.dim, cfg.vision.n_heads
    out = []
    for frames in videos:
        x = torch.nn.functional.conv2d(frames, state["video.patch_embed.weight"], stride=cfg.vision.patch_size)
        x = x.flatten(2).transpose(1, 2)                                              # F, n_patches, D
        x = torch.cat([state["video.class_embedding"].expand(len(frames), 1, D), x], 1) + state["video.position_embedding"]
        x = ln(x, (D,), state["video.pre_norm.weight"], state["video.pre_norm.bias"], eps)
        for i in range(cfg.vision.n_used_layers):
            p = f"video.blocks.{i}."
            mixed = torch.empty_like(x)
            for n in range(x.shape[1]):                                               # one token position
                seq = x[:, n] + state[p + "temporal_embedding"].reshape(-1, D)        # its frames, in order
                h = ln(seq, (D,), state[p + "temporal_norm.weight"], state[p + "temporal_norm.bias"], eps)
                mixed[:, n] = seq + reference_attention(h, state, p + "temporal_attn.", heads)
            for f in range(len(frames)):                                              # one frame
                y = mixed[f]
                y = y + reference_attention(ln(y, (D,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps),
                                            state, p + "attn.", heads)
                h = ln(y, (D,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps)
                h = h @ state[p + "fc1.weight"].T + state[p + "fc1.bias"]
                h = h * torch.sigmoid(1.702 * h)
                x[f] = y + h @ state[p + "fc2.weight"].T + state[p + "fc2.bias"]
        out.append(x)
    return torch.stack(out)


@torch.no_grad()
def test_the_temporal_video_tower_matches_a_reference_written_from_its_description(pair):
    from helpers import randomize

    _, ours, _ = pair
    cfg = VideoLlavaConfig(**{**{f: getattr(ours.config, f) for f in ("vision", "text", "image_token_id",
                                                                        "video_token_id", "n_frames")},
                              "temporal": True})
    model = randomize(VideoLlavaModel(cfg), seed=21, scale=0.3).eval()
    videos = frames(2, seed=4)                                                   # two videos: frames stay apart
    got, _ = model.video(videos.flatten(0, 1))
    ref = reference_temporal_tower(model.state_dict(), cfg, videos)
    assert (got.view_as(ref) - ref).abs().max() <= 1e-4
    plain = VideoLlavaModel(VideoLlavaConfig(**{**cfg.__dict__, "temporal": False}))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "temporal" not in k})
    assert (plain.video(videos.flatten(0, 1))[0].view_as(ref) - ref).abs().max() > 1e-2    # the frames do mix
    ids = torch.tensor([prompt(2, 6, (), (1,))])
    assert model(ids, video_values=videos[:1]).shape == (1, 1 + 6 + N_VIDEO, VOCAB)       # BOS, text, the video


def write_original_layout(hf, root, tokenizer_from):
    """The original Video-LLaVA's files from transformers' weights: the decoder and projector under model.*
    (model.mm_projector.{0,2}), and each tower as a whole LanguageBind model in its own directory (vision_model.*,
    plus a text half that conversion drops); the video tower with temporal attention, random, as
    LanguageBind_Video_merge stores it. Returns (source, image tower, video tower, the towers' tensors)."""
    hf_state = {k: v.clone() for k, v in hf.state_dict().items()}
    src, image, video = (root / name for name in ("src", "LanguageBind_Image", "LanguageBind_Video_merge"))
    for d in (src, image, video):
        d.mkdir(parents=True)
    text = {"model." + k.removeprefix("model.language_model."): v for k, v in hf_state.items()
            if k.startswith("model.language_model.")}
    text["lm_head.weight"] = hf_state["lm_head.weight"]
    for i, j in ((1, 0), (2, 2)):
        for p in ("weight", "bias"):
            text[f"model.mm_projector.{j}.{p}"] = hf_state[f"model.multi_modal_projector.linear_{i}.{p}"]
    save_file(text, str(src / "model.safetensors"))
    vision = hf.config.vision_config
    g = torch.Generator().manual_seed(77)
    towers = {}
    for directory, prefix, temporal in ((image, "model.image_tower.", False), (video, "model.video_tower.", True)):
        state = {"vision_model." + k.removeprefix(prefix): v for k, v in hf_state.items() if k.startswith(prefix)}
        D = vision.hidden_size
        if temporal:
            for i in range(vision.num_hidden_layers):
                p = f"vision_model.encoder.layers.{i}."
                state[p + "temporal_embedding"] = torch.randn(1, FRAMES, D, generator=g) * 0.3
                state[p + "temporal_layer_norm1.weight"] = 1 + torch.randn(D, generator=g) * 0.2
                state[p + "temporal_layer_norm1.bias"] = torch.randn(D, generator=g) * 0.2
                for x in ("q", "k", "v", "out"):
                    state[p + f"temporal_attn.{x}_proj.weight"] = torch.randn(D, D, generator=g) * 0.2
                    state[p + f"temporal_attn.{x}_proj.bias"] = torch.randn(D, generator=g) * 0.2
        towers[directory.name] = dict(state)
        state.update({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 8), "logit_scale": torch.ones(())})
        save_file(state, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps({"vision_config": {
            "hidden_size": D, "intermediate_size": vision.intermediate_size, "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads, "image_size": vision.image_size,
            "patch_size": vision.patch_size, "layer_norm_eps": vision.layer_norm_eps, "hidden_act": "quick_gelu",
            **({"add_time_attn": True, "num_frames": FRAMES} if temporal else {})}}))
    t = hf.config.text_config
    (src / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "vocab_size": VOCAB,
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "mm_image_tower": "LanguageBind/LanguageBind_Image", "mm_video_tower": "LanguageBind/LanguageBind_Video_merge",
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_hidden_size": vision.hidden_size, "image_aspect_ratio": "pad", "torch_dtype": "float32"}))
    (src / "tokenizer.json").write_bytes(tokenizer_from.read_bytes())
    return src, image, video, towers


@torch.no_grad()
def test_the_original_layout_converts_with_its_temporal_towers_and_prompt(pair, tmp_path):
    """model.layers.* with LanguageBind_Image and LanguageBind_Video_merge directories: the temporal weights
    arrive, the config is the original's (a frame placeholder per frame, llava_v1's system line, padded
    images), and the logits equal a reference built from the source tensors by hand: the temporal tower written
    from its description, transformers' projector and decoder fed the original's sequence (each frame's 257
    features where the original writes its image placeholder, a space between frames)."""
    from minifastv.models.video_llava import LLAVA_V1_SYSTEM

    hf, ours, root = pair
    src, image, video, towers = write_original_layout(hf, tmp_path, root / "src" / "tokenizer.json")
    with pytest.raises(ConversionError, match="needs --video-tower DIR"):
        convert(src, tmp_path / "none", image_tower=image, log=lambda _: None)
    out = convert(src, tmp_path / "out", image_tower=image, video_tower=video, log=lambda _: None)
    model = minifastv.load(out, dtype=None)
    cfg = model.config
    assert (cfg.frame_token_id, cfg.temporal, cfg.n_frames, cfg.system, cfg.image_token_id, cfg.image_mode) == \
        (-202, True, FRAMES, LLAVA_V1_SYSTEM, -200, "pad")
    mine = model.state_dict()
    written = towers["LanguageBind_Video_merge"]
    assert torch.equal(mine["video.blocks.1.temporal_attn.o_proj.weight"],
                       written["vision_model.encoder.layers.1.temporal_attn.out_proj.weight"])
    # The reference, from the source tensors with names mapped here by hand
    state = {}
    for key, tensor in written.items():
        rest = key.removeprefix("vision_model.")
        rest = rest.replace("embeddings.class_embedding", "class_embedding").replace(
            "embeddings.patch_embedding.weight", "patch_embed.weight").replace(
            "embeddings.position_embedding.weight", "position_embedding").replace("pre_layrnorm", "pre_norm").replace(
            "encoder.layers.", "blocks.").replace("self_attn.out_proj", "attn.o_proj").replace(
            "self_attn.", "attn.").replace("temporal_attn.out_proj", "temporal_attn.o_proj").replace(
            "temporal_layer_norm1", "temporal_norm").replace("layer_norm1", "norm1").replace(
            "layer_norm2", "norm2").replace("mlp.fc", "fc")
        state["video." + rest] = tensor
    videos = frames(1, seed=9)
    features = reference_temporal_tower(state, cfg, videos)[0]                     # F, 257, D
    projector = hf.model.multi_modal_projector
    visual = projector(features)                                                   # F, 257, C
    space = 7                                                                      # the token between frames
    head, tail = prompt(3, 4)[:5], prompt(4, 5)[1:]
    ids = head + [item for f in range(FRAMES) for item in ([-202] + ([space] if f < FRAMES - 1 else []))] + tail
    embed = hf.get_input_embeddings()
    pieces, frame = [], 0
    for token in ids:
        if token == -202:
            pieces.append(visual[frame])
            frame += 1
        else:
            pieces.append(embed(torch.tensor([token])))
    sequence = torch.cat(pieces)[None]
    reference = hf.lm_head(hf.model.language_model(inputs_embeds=sequence).last_hidden_state)
    got = model(torch.tensor([ids]), video_values=videos)
    assert got.shape == reference.shape and (got - reference).abs().max() <= 1e-4
    # The tokenizer writes the original's layout: "<video>" becomes a frame placeholder per frame, spaces between
    from minifastv.pipeline import Pipeline

    pipe = Pipeline.load(out, dtype=None)
    batch = pipe.inputs([], "what happens", [videos[0]])
    ids = batch.input_ids[0].tolist()
    assert ids.count(-202) == FRAMES and ids.count(-201) == 0
    first = ids.index(-202)
    between = ids[first + 1:ids.index(-202, first + 1)]
    assert between == pipe.tokenizer.encode_text(" ") and len(between) >= 1
    assert ids[:first] == pipe.tokenizer.encode_prompt(LLAVA_V1_SYSTEM + " USER: ")
    assert (pipe.model(**batch.model_inputs()) - model(**batch.model_inputs())).abs().max() == 0


def test_the_original_layouts_mistakes_are_named(pair, tmp_path):
    """Tower directories for a checkpoint that is not the original Video-LLaVA, and temporal weights in a tower
    whose config says it has no temporal attention: each a ConversionError that says so."""
    hf, _, root = pair
    src, image, video, _ = write_original_layout(hf, tmp_path, root / "src" / "tokenizer.json")
    with pytest.raises(ConversionError, match="--image-tower and --video-tower are for an original Video-LLaVA"):
        convert(root / "src", tmp_path / "x", image_tower=image, video_tower=video, log=lambda _: None)
    config = json.loads((video / "config.json").read_text())
    config["vision_config"]["add_time_attn"] = False
    (video / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"LanguageBind_Video_merge/model.safetensors: 'vision_model.encoder"
                                              r".layers.0.temporal_\w+(\.\w+)*' has no place in the model .*temporal "
                                              r"attention: False"):
        convert(src, tmp_path / "y", image_tower=image, video_tower=video, log=lambda _: None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
