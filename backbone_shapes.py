"""The backbone shapes this repository builds, each defined once, for training, the benchmark and the tests.

    micro          the tests' random backbone (milliseconds to build; the tests also build it as Llama)
    tiny           the offline default's backbone: what `train_duplex.py --pretrain_backbone` trains, shipped in
                   checkpoints/duplex-tiny-backbone (Qwen3, byte-level vocabulary)
    smollm2-135m   HuggingFaceTB/SmolLM2-135M (Llama)
    qwen3-1.7b     Qwen/Qwen3-1.7B-Base, read from the `text_config` of this repository's config.json

A shape is architecture only: which weights (random or pretrained) fill it is the caller's business. Callers that
need a different value (a longer rotary table, the tokenizer's special ids) pass it as an override, so that the
difference shows where it is made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

REPO_CONFIG = Path(__file__).resolve().parent / "config.json"

_DEFINED_HERE: dict[str, dict[str, Any]] = {
    "micro": dict(
        model_type="qwen3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=260,
        max_position_embeddings=512,
        eos_token_id=256,
        pad_token_id=257,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        model_type="qwen3",
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        vocab_size=258,  # data.build_byte_tokenizer: 256 bytes, then eos and pad
        bos_token_id=None,
        eos_token_id=256,
        pad_token_id=257,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    ),
}
SHAPES: tuple[str, ...] = ("micro", "tiny", "smollm2-135m", "qwen3-1.7b")


def shape_fields(shape: str) -> dict[str, Any]:
    """The keyword arguments (`model_type` included) that define `shape`; a fresh dict the caller may change."""
    if shape == "qwen3-1.7b":
        return json.loads(REPO_CONFIG.read_text())["text_config"]
    if shape not in _DEFINED_HERE:
        raise ValueError(f"unknown backbone shape {shape!r}; known: {', '.join(SHAPES)}")
    return dict(_DEFINED_HERE[shape])


def backbone_config(shape: str, **overrides: Any) -> PreTrainedConfig:
    """The HF config of the backbone `shape`, with `overrides` applied on top. An overriding `model_type` builds
    the same shape in another architecture (e.g. `backbone_config("micro", model_type="llama")`)."""
    fields = {**shape_fields(shape), **overrides}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def architecture(config: PreTrainedConfig) -> dict[str, Any]:
    """The fields of `config` that decide the model, as they are written to config.json: everything but where it
    came from (`_name_or_path`, `architectures`, `transformers_version`) and the dtype its weights were saved in."""
    fields = json.loads(config.to_json_string(use_diff=False))
    for key in ("_name_or_path", "architectures", "transformers_version", "dtype"):
        fields.pop(key, None)
    return fields
