"""The exactness suite on every rotary decoder the read attaches to, under each attention implementation it declares.

The properties are test_equivalence.py's (imported, so they run here against these backbones): closed gates are the
backbone bit for bit; open gates over the identity encoder read a correction exactly as in-band text; teacher-forced
logits equal step-by-step decoding; a left-padded batch equals each row alone. Phi-3 brings fused projections and
partial rotary embeddings; Mistral and Qwen2 their own attention classes.
"""

import pytest
import torch
from test_equivalence import (  # noqa: F401  (collected here, against this module's backbones)
    PROMPT,
    test_left_padded_batch_equals_each_row_alone,
    test_open_in_context_read_is_exactly_in_band,
    test_teacher_forced_equals_step_by_step,
    test_zero_init_is_exactly_the_backbone,
)
from transformers import AutoModelForCausalLM, StaticCache

from backbone_shapes import backbone_config
from generation_duplex import pack_updates
from modeling_duplex import DuplexForCausalLM

ARCHITECTURES = {
    "qwen3": {},
    "llama": {},
    "qwen2": {},
    "mistral": {"sliding_window": None},
    "phi3": {"partial_rotary_factor": 0.5, "pad_token_id": 0},  # fused qkv_proj / gate_up_proj, half the dims rotate
}
IMPLEMENTATIONS = ("eager", "sdpa")


def build_backbone(arch: str, attn_implementation: str) -> torch.nn.Module:
    """The micro shape as `arch`, random weights (seed 0), with the given attention implementation."""
    torch.manual_seed(0)
    config = backbone_config("micro", model_type=arch, **ARCHITECTURES[arch])
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


@pytest.fixture(params=[(a, i) for a in ARCHITECTURES for i in IMPLEMENTATIONS], ids=lambda p: f"{p[0]}-{p[1]}")
def backbone(request):
    return build_backbone(*request.param)


@pytest.fixture
def workspace_update() -> str:
    return "in_context"


@pytest.fixture
def duplex(backbone):
    from conftest import perturb_duplex

    model = DuplexForCausalLM.from_backbone(backbone, num_slots=4, encoder_layers=2, adapter_layers=[0, 2])
    return perturb_duplex(model).eval()


def test_the_backbone_keeps_its_attention_implementation(backbone):
    """The read wraps the implementation the user chose (its kernel and its masks) rather than replacing it."""
    chosen = backbone.config._attn_implementation
    model = DuplexForCausalLM.from_backbone(backbone, num_slots=4, encoder_layers=1)
    assert model.model.config._attn_implementation == f"duplex_{chosen}"


def test_a_static_cache_is_refused_with_corrections(duplex):
    """Entering slots pass through the cache and are cropped after the pass: a cache that cannot be cropped is
    refused by name, not silently misread."""
    cache = StaticCache(config=duplex.config.text_config, max_cache_len=64)
    packed = pack_updates([[(PROMPT.shape[1] - 2, [65, 66])]])
    with pytest.raises(ValueError, match="StaticCache"):
        duplex(PROMPT, past_key_values=cache, use_cache=True, update_is_correction=torch.ones(1, 1), **packed)


def test_a_decoder_without_rotary_positions_is_refused():
    """A backbone the read cannot attach to (no rotary embedding: absolute positions) is refused by name."""
    absolute = build_backbone("llama", "eager")
    del absolute.model.rotary_emb
    with pytest.raises(ValueError, match="rotary"):
        DuplexForCausalLM.from_backbone(absolute, num_slots=4, encoder_layers=1)


def test_flex_attention_is_refused_by_name():
    """Flex attention is not among the implementations the read is tested under: refused when the model is built,
    naming it, rather than reading corrections wrongly."""
    with pytest.raises(ValueError, match="flex_attention"):
        DuplexForCausalLM.from_backbone(build_backbone("qwen3", "flex_attention"), num_slots=4, encoder_layers=1)


def test_an_implementation_set_afterwards_is_refused_with_corrections(duplex):
    """An attention implementation switched on the backbone after loading, outside those the read is tested under,
    is refused by name once a correction is to be read."""
    duplex.model.config._attn_implementation = "flex_attention"
    packed = pack_updates([[(PROMPT.shape[1] - 2, [65, 66])]])
    with pytest.raises(ValueError, match="flex_attention"):
        duplex(PROMPT, update_is_correction=torch.ones(1, 1), **packed)


def test_a_bf16_backbone_reads_corrections_with_open_gates(backbone):
    """Mixed dtypes (bf16 backbone, fp32 duplex modules, kernels that return fp32 log-sum-exps) meet in the read:
    a correction lands, is read, and changes what the model writes."""
    from conftest import perturb_duplex

    model = DuplexForCausalLM.from_backbone(backbone.to(torch.bfloat16), num_slots=4, encoder_layers=1)
    model = perturb_duplex(model).eval()
    options = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    updates = [(2, [83, 116, 111, 112]), (5, [120, 121])]
    read = model.generate(PROMPT, updates=updates, **options)
    ignored = model.generate(PROMPT, updates=updates, update_mode="ignore", **options)
    assert any(landing.kind == "correction" for landing in read.update_landings[0])
    assert not torch.equal(read.sequences, ignored.sequences)
