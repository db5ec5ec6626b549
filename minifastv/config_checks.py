"""What makes a config consistent, checked whenever one is built (config.py's dataclasses call these). The checks
of a config.json as a file (unknown keys, sizes beyond any real model) are the loader's: checkpoint.py."""

from __future__ import annotations

PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
IMAGE_MODES = ("pad", "crop", "squash")
QUANT_METHODS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept


class ConfigError(ValueError):
    """A config value is missing, unknown or inconsistent."""


def check_vision(cfg):
    _check_positive(cfg, "image_size", "patch_size", "dim", "n_layers", "n_heads", "intermediate_size")
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"vision: image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.dim % cfg.n_heads:
        raise ConfigError(f"vision: dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}")
    if isinstance(cfg.feature_layer, bool) or not isinstance(cfg.feature_layer, int):
        raise ConfigError(f"vision: feature_layer must be an integer, got {cfg.feature_layer!r}")
    if not -(cfg.n_layers + 1) <= cfg.feature_layer <= cfg.n_layers:
        raise ConfigError(f"vision: feature_layer {cfg.feature_layer} is outside [-{cfg.n_layers + 1}, {cfg.n_layers}]")


def check_text(cfg):
    _check_positive(cfg, "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "max_seq_len")
    if cfg.dim % cfg.n_heads:
        raise ConfigError(f"text: dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ConfigError(f"text: n_heads {cfg.n_heads} is not a multiple of n_kv_heads {cfg.n_kv_heads}")
    if (cfg.dim // cfg.n_heads) % 2:
        raise ConfigError(f"text: head dim {cfg.dim // cfg.n_heads} must be even for rotary embeddings")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if not 0 <= getattr(cfg, name) < cfg.vocab_size:
            raise ConfigError(f"text: {name} {getattr(cfg, name)} is outside the vocabulary [0, {cfg.vocab_size})")


def check_quant(cfg):
    if cfg.method not in QUANT_METHODS:
        raise ConfigError(f"quantization method {cfg.method!r} is not one of {', '.join(QUANT_METHODS)}")
    if cfg.method == "int8" and cfg.group_size is not None:
        raise ConfigError(f"int8 has one scale per output channel; group_size must be null, got {cfg.group_size!r}")
    if cfg.method == "int4" and cfg.group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {cfg.group_size!r}")


def check_llava(cfg):
    if cfg.projector_type not in PROJECTOR_TYPES:
        raise ConfigError(f"projector_type {cfg.projector_type!r} is not one of {PROJECTOR_TYPES}")
    if cfg.image_mode not in IMAGE_MODES:
        raise ConfigError(f"image_mode {cfg.image_mode!r} is not one of {IMAGE_MODES}")
    if cfg.image_token_id in (cfg.text.bos_token_id, cfg.text.eos_token_id, cfg.text.pad_token_id):
        raise ConfigError(f"image_token_id {cfg.image_token_id} collides with a special token id")
    if cfg.quant is not None and cfg.quant.group_size is not None:
        for name in ("dim", "intermediate_size"):  # the in_features of the quantized linears
            if getattr(cfg.text, name) % cfg.quant.group_size:
                fits = [g for g in INT4_GROUP_SIZES
                        if not cfg.text.dim % g and not cfg.text.intermediate_size % g]
                raise ConfigError(f"int4 group_size {cfg.quant.group_size} does not divide text {name} "
                                  f"{getattr(cfg.text, name)}; group sizes that divide this model's widths: "
                                  f"{', '.join(map(str, fits)) or 'none (quantize it to int8)'}")


def _check_positive(cfg, *names):
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{type(cfg).__name__}.{name} must be a positive integer, got {value!r}")
