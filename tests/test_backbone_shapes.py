"""backbone_shapes: each shape's single definition agrees with what the repository ships and trains."""

import json

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from transformers import AutoConfig, Qwen3ForCausalLM

from backbone_shapes import SHAPES, architecture, backbone_config
from configuration_duplex import DuplexConfig
from data import build_byte_tokenizer

SHIPPED_BACKBONE = ROOT / "checkpoints" / "duplex-tiny-backbone"


def test_tiny_is_the_shipped_backbone():
    """The offline default's definition (what `--pretrain_backbone` trains) is the shipped backbone's config, its
    weights load into it, and its special ids are the byte-level tokenizer's (which training passes explicitly)."""
    tiny = backbone_config("tiny")
    assert architecture(tiny) == architecture(AutoConfig.from_pretrained(SHIPPED_BACKBONE))
    with torch.device("meta"):
        model = Qwen3ForCausalLM(tiny)
    weights = load_file(SHIPPED_BACKBONE / "model.safetensors")
    expected = {name: param.shape for name, param in model.state_dict().items() if name != "lm_head.weight"}
    assert {name: tensor.shape for name, tensor in weights.items()} == expected  # lm_head is tied, not saved
    tokenizer = build_byte_tokenizer()
    assert (tiny.vocab_size, tiny.eos_token_id, tiny.pad_token_id) == (
        len(tokenizer),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )


def test_qwen3_1_7b_is_the_repo_config_text_config():
    config = backbone_config("qwen3-1.7b")
    text_config = json.loads((ROOT / "config.json").read_text())["text_config"]
    assert {key: config.to_dict()[key] for key in text_config} == text_config
    assert architecture(config) == architecture(DuplexConfig.from_pretrained(ROOT).text_config)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_builds_and_takes_overrides(shape):
    config = backbone_config(shape, max_position_embeddings=4096)
    assert config.max_position_embeddings == 4096
    assert backbone_config(shape).max_position_embeddings != 4096  # the definition itself is untouched


def test_micro_builds_as_llama_too():
    qwen3, llama = backbone_config("micro"), backbone_config("micro", model_type="llama")
    assert (qwen3.model_type, llama.model_type) == ("qwen3", "llama")
    assert qwen3.hidden_size == llama.hidden_size and qwen3.num_hidden_layers == llama.num_hidden_layers


def test_unknown_shape_is_named():
    with pytest.raises(ValueError, match="unknown backbone shape"):
        backbone_config("huge")
