"""The heart of the suite: the duplex model is the backbone at init, and training sees what generation does."""

import pytest
import torch
from conftest import perturb_duplex, tiny_backbone

from configuration_duplex import WORKSPACE_UPDATES
from data import build_byte_tokenizer
from generation_duplex import pack_updates, update_position
from modeling_duplex import DuplexForCausalLM

PROMPT = torch.tensor([[72, 101, 108, 108, 111, 10, 51, 32, 52]])
UPDATES = [(0, [83, 116, 111, 112]), (3, [97, 98]), (3, [120]), (6, [49, 50, 46])]  # two land at the same step


@pytest.fixture(params=WORKSPACE_UPDATES)
def workspace_update(request) -> str:
    """Every property here holds for each workspace update rule."""
    return request.param


@pytest.fixture
def duplex(backbone, workspace_update) -> DuplexForCausalLM:
    """conftest's trained-looking duplex model, built with each workspace update rule."""
    model = DuplexForCausalLM.from_backbone(
        backbone, num_slots=4, encoder_layers=2, adapter_layers=[0, 2], workspace_update=workspace_update
    )
    return perturb_duplex(model).eval()


def generate(model, input_ids=PROMPT, **kwargs):
    defaults = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **{**defaults, **kwargs})


def test_zero_init_is_exactly_the_backbone(backbone, workspace_update):
    model = DuplexForCausalLM.from_backbone(
        backbone, num_slots=4, encoder_layers=2, workspace_update=workspace_update
    ).eval()
    ids = PROMPT.repeat(2, 1)
    packed = pack_updates([[(0, [1, 2, 3]), (4, [9, 9])], [(0, [5])]])
    with torch.no_grad():
        reference = backbone(ids).logits
        assert torch.equal(model(ids).logits, reference)
        assert torch.equal(model(ids, **packed).logits, reference)
    plain = backbone.generate(PROMPT, max_new_tokens=10, do_sample=False)
    with_updates = model.generate(PROMPT, max_new_tokens=10, do_sample=False, updates=UPDATES)
    assert torch.equal(plain, with_updates)


def test_teacher_forced_equals_step_by_step(duplex):
    """Each position of a teacher-forced pass sees the workspace version generation had there (fp32, atol 1e-4)."""
    out = generate(duplex, updates=UPDATES, output_logits=True)
    step_logits = torch.stack(out.logits, dim=1)  # (1, new, V)
    prompt_len, new = PROMPT.shape[1], step_logits.shape[1]
    landed = [(lnd.at, lnd.token_ids) for lnd in out.update_landings[0]]
    assert [at for at, _ in landed] == [0, 3, 3, 6]
    written = [ids for _, ids in landed]  # the model decides itself which are corrections, as generate did
    positions = [update_position(prompt_len, at) for at, _ in landed]
    packed = pack_updates([list(zip(positions, written, strict=True))])
    with torch.no_grad():
        forced = duplex(out.sequences, **packed).logits[:, prompt_len - 1 : prompt_len - 1 + new]
    torch.testing.assert_close(forced, step_logits, atol=1e-4, rtol=0)
    # and the updates matter: without them the same sequence scores differently
    without = duplex(out.sequences).logits
    assert (without[:, prompt_len - 1 : prompt_len - 1 + new] - forced).abs().max() > 1e-3


def test_cached_and_uncached_generation_agree(duplex):
    cached = generate(duplex, updates=UPDATES, output_logits=True)
    uncached = generate(duplex, updates=UPDATES, output_logits=True, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("update_mode", ["workspace", "inband"])
def test_left_padded_batch_equals_each_row_alone(duplex, update_mode):
    """Rows of different lengths, one with an update before its first new token (in-band: spliced into the prompt's
    own forward, beside the other rows' left padding), decode in a batch exactly as each row alone."""
    duplex.config.inband_template = "{text}"  # token-id updates, spliced as they are
    short = PROMPT[:, 3:]
    rows = [(PROMPT, [(1, [65, 66])]), (short, [(0, [67]), (4, [68, 69, 70])])]
    pad = duplex.config.text_config.pad_token_id
    batch = torch.full((2, PROMPT.shape[1]), pad)
    mask = torch.zeros_like(batch)
    for b, (ids, _) in enumerate(rows):
        batch[b, -ids.shape[1] :], mask[b, -ids.shape[1] :] = ids[0], 1
    together = duplex.generate(
        batch,
        attention_mask=mask,
        updates=[u for _, u in rows],
        update_mode=update_mode,
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        pad_token_id=pad,
        return_dict_in_generate=True,
        output_logits=True,
    )
    for b, (ids, updates) in enumerate(rows):
        alone = generate(
            duplex,
            ids,
            updates=updates,
            update_mode=update_mode,
            max_new_tokens=8,
            min_new_tokens=8,
            output_logits=True,
        )
        assert torch.equal(together.sequences[b, PROMPT.shape[1] :], alone.sequences[0, ids.shape[1] :])
        torch.testing.assert_close(
            torch.stack(together.logits)[:, b], torch.stack(alone.logits)[:, 0], atol=1e-4, rtol=0
        )


def test_ignore_mode_equals_no_updates(duplex):
    ignored = generate(duplex, updates=UPDATES, update_mode="ignore", output_logits=True)
    plain = generate(duplex, output_logits=True)
    assert torch.equal(ignored.sequences, plain.sequences)
    assert torch.equal(torch.stack(ignored.logits), torch.stack(plain.logits))
    assert all(not landing.applied for landing in ignored.update_landings[0])
    applied = generate(duplex, updates=UPDATES, output_logits=True)
    assert not torch.equal(torch.stack(applied.logits), torch.stack(plain.logits))  # they matter to this model


def test_inband_mode_equals_splicing_the_correction_into_the_prompt():
    """In-band continues from the same cache exactly as if the spliced tokens had been part of the context."""
    backbone = tiny_backbone("qwen3")
    model = DuplexForCausalLM.from_backbone(backbone, num_slots=4, encoder_layers=1, inband_template="{text}").eval()
    correction, at = [88, 89, 90], 4
    spliced = generate(model, updates=[(at, correction)], update_mode="inband", max_new_tokens=8, min_new_tokens=8)
    head = spliced.sequences[:, : PROMPT.shape[1] + at]
    context = torch.cat([head, torch.tensor([correction])], dim=1)
    reference = backbone.generate(context, max_new_tokens=8 - at, min_new_tokens=8 - at, do_sample=False)
    assert torch.equal(spliced.sequences[:, PROMPT.shape[1] + at :], reference[:, context.shape[1] :])


def test_trained_model_writes_like_its_backbone_until_an_update_lands(duplex, backbone, workspace_update):
    """Trained duplex modules change nothing before the first update (the workspace starts empty), so the in-band
    baseline run through a trained model is exactly the frozen backbone given the correction in its token stream."""
    fresh = DuplexForCausalLM.from_backbone(
        backbone, num_slots=4, encoder_layers=2, adapter_layers=[0, 2], workspace_update=workspace_update
    ).eval()
    inband = dict(updates=[(4, "Stop.")], update_mode="inband", tokenizer=build_byte_tokenizer(), output_logits=True)
    trained, reference = generate(duplex, **inband), generate(fresh, **inband)
    assert torch.equal(trained.sequences, reference.sequences)
    assert torch.equal(torch.stack(trained.logits), torch.stack(reference.logits))
    late = generate(duplex, updates=[(6, [88, 89, 90])], output_logits=True)  # workspace mode, update at token 6
    plain = generate(fresh, output_logits=True)
    assert torch.equal(torch.stack(late.logits)[:6], torch.stack(plain.logits)[:6])


def test_get_base_model_shares_the_backbone(duplex, backbone):
    base = duplex.get_base_model()
    assert base.get_output_embeddings().weight.data_ptr() == backbone.get_output_embeddings().weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(base(PROMPT).logits, backbone(PROMPT).logits)


def test_uncached_batch_reads_the_newest_version_of_each_row(duplex):
    """Rows updated in different rounds (row 0 at token 4, row 1 at token 1): without a cache every position must
    still read its own row's newest workspace version, as the cached run does."""
    batch = PROMPT.repeat(2, 1)
    kwargs = dict(updates=[[(4, [65, 66])], [(1, [67, 68])]], output_logits=True)
    cached = generate(duplex, batch, **kwargs)
    uncached = generate(duplex, batch, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=0)


def test_duplex_modules_keep_fp32_master_weights_on_a_bf16_backbone(backbone, workspace_update):
    model = DuplexForCausalLM.from_backbone(
        backbone.to(torch.bfloat16), num_slots=4, encoder_layers=1, workspace_update=workspace_update
    )
    assert {p.dtype for p in model.duplex_state_dict().values()} == {torch.float32}
    assert {p.dtype for p in model.model.parameters()} == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(PROMPT, **pack_updates([[(2, [65, 66, 67])]]))
    assert torch.isfinite(out.logits).all()


def test_activation_checkpointing_trains_the_same(duplex):
    """With activation checkpointing (the 1.7B recipe's memory saver) a training step on a batch with updates gives
    the loss and duplex gradients of a plain step: the workspace's own pass keeps its cache, adapted layers are
    recomputed."""
    batch = dict(input_ids=PROMPT, labels=PROMPT, **pack_updates([[(2, [65, 66, 67]), (5, [70, 71])]]))

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        duplex.zero_grad()
        loss = duplex(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in duplex.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    duplex.train()
    plain_loss, plain_grads = step()
    duplex.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in duplex.model.layers)
    checkpointed_loss, checkpointed_grads = step()
    duplex.activation_checkpointing_disable()
    duplex.eval()
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert checkpointed_grads.keys() == plain_grads.keys() and any(n.endswith("gate") for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_backchannel_changes_nothing(duplex):
    """An update the model decides is a backchannel leaves the workspace as it was: generation writes exactly what it
    writes without it, reports the decision, and a teacher-forced pass told the kind (training) agrees."""
    with torch.no_grad():
        duplex.update_encoder.decision.classifier.bias.fill_(-1e4)  # every update: a backchannel
    plain = generate(duplex)
    out = generate(duplex, updates=UPDATES)
    assert torch.equal(out.sequences, plain.sequences)
    assert [lnd.kind for lnd in out.update_landings[0]] == ["backchannel"] * len(UPDATES)
    with torch.no_grad():
        duplex.update_encoder.decision.classifier.bias.fill_(1e4)  # the model would write each one...
        positions = [update_position(PROMPT.shape[1], at) for at, _ in UPDATES]
        packed = pack_updates([[(p, ids) for p, (_, ids) in zip(positions, UPDATES, strict=True)]])
        told = duplex(plain.sequences, **packed, update_is_correction=torch.zeros(1, len(UPDATES), dtype=torch.bool))
        written = duplex(plain.sequences, **packed)
    assert torch.equal(told.logits, duplex(plain.sequences).logits)  # ...but told they are backchannels, it does not
    assert (written.logits - told.logits).abs().max() > 1e-3


def test_open_in_context_read_is_exactly_in_band(backbone):
    """`in_context` with the identity encoder and every gate fully open reads a correction exactly as the backbone
    reads the same tokens spliced in-band: the same logits from the landing on, teacher-forced and generated."""
    model = DuplexForCausalLM.from_backbone(
        backbone, num_slots=8, encoder_layers=0, workspace_update="in_context", inband_template="{text}"
    ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gate"):
                param.fill_(20.0)  # tanh(20) == 1 in fp32
    answer = [51, 32, 52, 32, 53, 32, 54]
    corrections = [(2, [83, 116, 111, 112]), (5, [120, 121])]  # new tokens `at` are the first to read each
    ids = torch.cat([PROMPT, torch.tensor([answer])], dim=1)
    prompt_len = PROMPT.shape[1]
    spliced, offsets = ids[0].tolist(), []
    for at, tokens in reversed(corrections):  # in-band: each correction follows the token before new token `at`
        spliced[prompt_len + at : prompt_len + at] = tokens
    shift = 0
    for t in range(ids.shape[1]):
        shift += sum(len(tokens) for at, tokens in corrections if update_position(prompt_len, at) + 1 == t)
        offsets.append(t + shift)  # where token t sits in the spliced sequence
    packed = pack_updates([[(update_position(prompt_len, at), tokens) for at, tokens in corrections]])
    with torch.no_grad():
        forced = model(ids, **packed).logits[0]
        inband = backbone(torch.tensor([spliced])).logits[0]
    for at, tokens in corrections:  # the token before new token `at` predicts as the correction's last token does
        p = update_position(prompt_len, at)
        torch.testing.assert_close(forced[p], inband[offsets[p] + len(tokens)], atol=1e-4, rtol=0)
    landings = {update_position(prompt_len, at) for at, _ in corrections}
    later = [t for t in range(min(landings) + 1, ids.shape[1]) if t not in landings]  # every token after the first
    torch.testing.assert_close(forced[later], inband[[offsets[t] for t in later]], atol=1e-4, rtol=0)
    generated = generate(model, updates=corrections).sequences
    inband_generated = generate(model, updates=corrections, update_mode="inband").sequences
    assert torch.equal(generated, inband_generated)
