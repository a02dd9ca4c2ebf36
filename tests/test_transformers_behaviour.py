"""Without updates, DuplexForCausalLM is its backbone in every ordinary transformers behaviour (written after
transformers' ModelTesterMixin / GenerationTesterMixin); what it refuses with updates, it refuses by name."""

import pytest
import torch
from conftest import perturb_duplex, tiny_backbone

from data import build_byte_tokenizer
from modeling_duplex import DuplexForCausalLM

TOK = build_byte_tokenizer()
PROMPTS = ["Count from 3 to 9.\n", "Spell cat.\n"]


@pytest.fixture(scope="module")
def model() -> DuplexForCausalLM:
    """Open gates and trained-looking duplex weights: only an empty workspace keeps it the backbone."""
    backbone = tiny_backbone("qwen3")
    return perturb_duplex(DuplexForCausalLM.from_backbone(backbone, num_slots=4, encoder_layers=1)).eval()


@pytest.fixture(scope="module")
def backbone(model):
    return model.get_base_model().eval()


def batch() -> dict:
    return TOK(PROMPTS, return_tensors="pt", padding=True)


def both(model, backbone, seed: int = 0, **kwargs) -> tuple:
    """The same generate call on the Duplex model and on its backbone, from the same random state."""
    kwargs = dict(max_new_tokens=8, pad_token_id=TOK.pad_token_id, **kwargs)
    torch.manual_seed(seed)
    ours = model.generate(**batch(), **kwargs)
    torch.manual_seed(seed)
    theirs = backbone.generate(**batch(), **kwargs)
    return ours, theirs


def sequences(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.sequences


# ---- the backbone's own behaviour, without updates -------------------------------------------------------------


def test_base_model_prefix_names_the_backbone(model):
    assert model.base_model_prefix == "model" and model.base_model is model.model


def test_beam_search_is_the_backbones(model, backbone):
    ours, theirs = both(model, backbone, num_beams=3, do_sample=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("do_sample", [False, True])
def test_num_return_sequences_is_the_backbones(model, backbone, do_sample):
    num_beams = 1 if do_sample else 2
    ours, theirs = both(model, backbone, num_return_sequences=2, num_beams=num_beams, do_sample=do_sample)
    assert ours.shape[0] == 2 * len(PROMPTS)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_beam_search_scores_and_flags_from_the_generation_config_are_the_backbones(model, backbone):
    kwargs = dict(num_beams=2, do_sample=False, return_dict_in_generate=True, output_scores=True)
    ours, theirs = both(model, backbone, **kwargs)
    torch.testing.assert_close(ours.sequences, theirs.sequences, rtol=0, atol=0)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores)


@pytest.mark.parametrize("assistant", ["plain", "duplex"])
def test_assisted_decoding_writes_what_greedy_writes(model, backbone, assistant):
    """Greedy assisted decoding is exact: with a plain or a Duplex assistant, the output is plain greedy's."""
    helper = backbone if assistant == "plain" else model
    enc = TOK(PROMPTS[0], return_tensors="pt")  # assisted decoding takes one row
    greedy = model.generate(**enc, max_new_tokens=10, do_sample=False)
    assisted = model.generate(**enc, max_new_tokens=10, do_sample=False, assistant_model=helper)
    torch.testing.assert_close(assisted, greedy, rtol=0, atol=0)


def test_prompt_lookup_decoding_writes_what_greedy_writes(model):
    enc = TOK("Say apple apple apple apple.\n", return_tensors="pt")
    greedy = model.generate(**enc, max_new_tokens=10, do_sample=False)
    lookup = model.generate(**enc, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3)
    torch.testing.assert_close(lookup, greedy, rtol=0, atol=0)


# ---- refused with updates (and output_attentions at all), by name ------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [("num_beams", 2), ("num_return_sequences", 2), ("prompt_lookup_num_tokens", 3), ("assistant_model", "self")],
)
def test_decoding_options_that_cannot_carry_updates_are_refused_by_name(model, option, value):
    value = model if value == "self" else value
    kwargs = {option: value, "do_sample": option == "num_return_sequences"}
    enc = TOK(PROMPTS[0], return_tensors="pt")
    with pytest.raises(ValueError, match=f"(?s)`{option}=.*` is not supported together with `updates`"):
        model.generate(**enc, updates=[(2, "Stop at 5.")], tokenizer=TOK, max_new_tokens=4, **kwargs)


def test_output_attentions_is_refused_by_name(model):
    with pytest.raises(ValueError, match="output_attentions"):
        model(**batch(), output_attentions=True)


# ---- forward's defaults (forward is being rewritten: these fail until it follows the config) -----------------------


def test_return_dict_false_returns_a_tuple(model):
    out = model(**batch(), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape[:2] == batch()["input_ids"].shape


def test_output_hidden_states_follows_the_config(model):
    model.config.output_hidden_states = True
    try:
        out = model(**batch())
    finally:
        model.config.output_hidden_states = False
    assert out.hidden_states is not None and len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1


def test_forward_returns_a_cache_when_the_config_says_use_cache(model, backbone):
    assert model.config.text_config.use_cache and backbone(**batch()).past_key_values is not None
    assert model(**batch()).past_key_values is not None
