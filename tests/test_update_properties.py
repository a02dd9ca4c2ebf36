"""Property-based test of the update API: whatever a user passes, generate either succeeds and reports every update
in `update_landings`, or raises ValueError; with a KV cache or without, it writes the same tokens."""

import warnings

import pytest
import torch
from conftest import perturb_duplex, tiny_backbone
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from configuration_duplex import WORKSPACE_UPDATES
from data import build_byte_tokenizer
from modeling_duplex import DuplexForCausalLM, DuplexUpdate

TOK = build_byte_tokenizer()
PROMPTS = ["Count from 3 to 9.\n", "Spell cat.\n", "Name 4 fruits.\n"]


@pytest.fixture(scope="module", params=WORKSPACE_UPDATES)
def model(request):
    backbone = tiny_backbone("qwen3")
    model = DuplexForCausalLM.from_backbone(backbone, num_slots=6, encoder_layers=1, workspace_update=request.param)
    return perturb_duplex(model).eval()


at = st.integers(min_value=-1, max_value=9)  # -1 is invalid; values past max_new_tokens never land
payload = st.one_of(
    st.sampled_from(["Stop at 5.", "ok", "Spell dog instead.", "", "  "]),
    st.lists(st.integers(min_value=0, max_value=255), min_size=0, max_size=6),
)
update = st.one_of(st.tuples(at, payload), st.builds(lambda a, p: DuplexUpdate(at=a, text=p), at, st.text(max_size=8)))
row_updates = st.lists(update, max_size=3)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompts=st.lists(st.sampled_from(PROMPTS), min_size=1, max_size=2),
    updates=st.data(),
    mode=st.sampled_from(["workspace", "ignore", "inband"]),
    max_new_tokens=st.integers(min_value=1, max_value=6),
    with_tokenizer=st.booleans(),
)
def test_generate_succeeds_and_reports_every_update_or_raises_value_error(
    model, prompts, updates, mode, max_new_tokens, with_tokenizer
):
    per_row = [updates.draw(row_updates) for _ in prompts]
    enc = TOK(prompts, return_tensors="pt", padding=True)
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,  # no early end of sequence: `at` alone decides what lands
        do_sample=False,
        updates=per_row if len(prompts) > 1 else per_row[0],
        update_mode=mode,
        tokenizer=TOK if with_tokenizer else None,
        return_dict_in_generate=True,
    )
    outputs = {}
    for use_cache in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # updates past the end warn; they are checked below
            try:
                outputs[use_cache] = model.generate(**enc, use_cache=use_cache, **kwargs)
            except ValueError as error:
                event(f"ValueError: {str(error)[:40]}")
                continue
        event("succeeded")
        landings = outputs[use_cache].update_landings
        assert [len(row) for row in landings] == [len(row) for row in per_row]
        for row, row_landings in zip(per_row, landings, strict=True):
            assert sorted(u.at if isinstance(u, DuplexUpdate) else u[0] for u in row) == [
                landing.requested_at for landing in row_landings
            ]
            for landing in row_landings:
                assert landing.applied == (landing.at is not None and mode != "ignore")
                assert (landing.at is None) == (landing.requested_at >= max_new_tokens)
    if mode != "inband" and outputs:  # inband splices into the cache: without one it must refuse
        assert set(outputs) == {True, False}, "a call valid with a cache must be valid without one"
        assert torch.equal(outputs[True].sequences, outputs[False].sequences)


def test_fresh_update_encoder_is_the_identity():
    """Every block of a fresh update encoder starts as the identity: a correction enters the workspace as its own
    token embeddings, which the frozen backbone reads as it reads the same text in-band."""
    model = DuplexForCausalLM.from_backbone(tiny_backbone("qwen3"), num_slots=8, encoder_layers=2)
    ids = torch.tensor([[5, 9, 2, 7]])
    embeds = model.model.embed_tokens(ids)
    torch.testing.assert_close(model.update_encoder(embeds, torch.ones_like(ids)), embeds, atol=0, rtol=0)
