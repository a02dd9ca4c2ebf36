"""The gated workspace update (`workspace_update="gated"`): S learned slots rewritten by every update through
W~ = CrossAttn(W, e, e), delta = MLP(W~), g = sigmoid(Linear([W; W~])), W_new = W + g * delta. The properties that
hold for both rules (exact at init, teacher-forced == step by step, batch == each row alone) are parametrised in
test_equivalence.py and test_update_properties.py; this file holds what is particular to the gated rule."""

import json
import math

import pytest
import torch
from conftest import perturb_duplex, tiny_backbone

import train_duplex
from backbone_shapes import backbone_config
from configuration_duplex import WORKSPACE_UPDATES, DuplexConfig
from data import build_byte_tokenizer
from data.prompts import PromptFormat
from generation_duplex import NEVER, pack_updates, update_position, workspace_update_tokens
from modeling_duplex import ADAPTER_WEIGHTS_NAME, WORKSPACE_CLASSES, DuplexForCausalLM, GatedWorkspace, Workspace

TOK = build_byte_tokenizer()
PROMPT = torch.tensor([[72, 101, 108, 108, 111, 10, 51, 32, 52]])
GATED_PARAMETERS = {
    "workspace.initial_slots",
    "workspace.slot_norm.weight",
    "workspace.update_norm.weight",
    "workspace.cross_attn.q_proj.weight",
    "workspace.cross_attn.k_proj.weight",
    "workspace.cross_attn.v_proj.weight",
    "workspace.cross_attn.o_proj.weight",
    "workspace.mlp.0.weight",
    "workspace.mlp.0.bias",
    "workspace.mlp.2.weight",
    "workspace.write_gate.weight",
    "workspace.write_gate.bias",
}


def gated_model(backbone: torch.nn.Module | str, **kwargs) -> DuplexForCausalLM:
    """A trained-looking gated duplex model (every duplex weight moved off its initial value)."""
    model = DuplexForCausalLM.from_backbone(backbone, num_slots=4, encoder_layers=1, workspace_update="gated", **kwargs)
    return perturb_duplex(model).eval()


def gated_write_reference(workspace: GatedWorkspace, slots, encoded, attention_mask) -> torch.Tensor:
    """The rule written out by hand: slots (B, S, D), encoded (B, L, D), attention_mask (B, L) -> W_new (B, S, D)."""
    attn = workspace.cross_attn

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (attn.num_heads, attn.head_dim)).transpose(1, 2)  # (B, h, N, hd)

    query = heads(attn.q_proj(workspace.slot_norm(slots)))
    normed = workspace.update_norm(encoded)
    key, value = heads(attn.k_proj(normed)), heads(attn.v_proj(normed))
    scores = (query @ key.transpose(-1, -2)) / math.sqrt(attn.head_dim)  # (B, h, S, L)
    scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    read = attn.o_proj((scores.softmax(dim=-1) @ value).transpose(1, 2).flatten(2))  # W~ (B, S, D)
    gate = torch.sigmoid(workspace.write_gate(torch.cat([slots, read], dim=-1)))
    return slots + gate * workspace.mlp(read)


def encode(model: DuplexForCausalLM, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One update (L,) -> the update encoder's output (1, L, D) and its mask (1, L)."""
    input_ids, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
    return model.update_encoder(model.model.embed_tokens(input_ids), mask), mask


def test_unknown_workspace_update_is_refused_naming_the_field():
    assert set(WORKSPACE_UPDATES) == set(WORKSPACE_CLASSES)
    assert DuplexConfig(text_config=backbone_config("micro")).workspace_update == "in_context"
    with pytest.raises(ValueError, match="workspace_update"):
        DuplexConfig(text_config=backbone_config("micro"), workspace_update="lifo")
    with pytest.raises(ValueError, match="workspace_update"):
        DuplexForCausalLM.from_backbone(tiny_backbone("qwen3"), workspace_update="Gated")
    fifo = DuplexForCausalLM.from_backbone(
        tiny_backbone("qwen3"), num_slots=4, encoder_layers=1, workspace_update="fifo"
    )
    assert type(fifo.workspace) is Workspace and not list(fifo.workspace.parameters())


def test_gated_workspace_is_empty_until_the_first_update_then_all_slots_are_written_by_the_rule():
    """Row 0 gets two updates, row 1 none: version 0 is empty for both; row 0's first update rewrites W0, its second
    rewrites the first's slots, every slot valid from then on; row 1 stays empty and never reaches a new version."""
    model = gated_model(tiny_backbone("qwen3"))
    first, second = [83, 116, 111, 112], [97, 98]
    packed = pack_updates([[(3, first), (5, second)], []])
    with torch.no_grad():
        corrections = torch.ones(2, 2, dtype=torch.bool)  # both updates are corrections (the decision is not tested)
        versions, _ = model.workspace_versions(2, **packed, update_is_correction=corrections)
        w0 = model.workspace.initial_slots[None]
        after_first = gated_write_reference(model.workspace, w0, *encode(model, first))
        after_second = gated_write_reference(model.workspace, after_first, *encode(model, second))
    assert versions.slots.shape == (2, 3, 4, 64)
    assert not versions.slot_mask[:, 0].any()  # empty until the first update: the adapters read nothing
    assert versions.slot_mask[0, 1:].all() and not versions.slot_mask[1].any()
    assert versions.starts.tolist() == [[0, 3, 5], [0, NEVER, NEVER]]
    torch.testing.assert_close(versions.slots[0, 1], after_first[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(versions.slots[0, 2], after_second[0], atol=1e-4, rtol=1e-4)
    assert (versions.slots[0, 1] - model.workspace.initial_slots).abs().max() > 1e-2  # the update was written


def test_padding_of_an_update_changes_nothing():
    """The cross-attention reads only the update's real tokens, and the whole update (not cut to `num_slots`)."""
    model = gated_model(tiny_backbone("llama"))
    long_update = list(range(40, 50))  # longer than the 4 slots: a summary of all of it, not its newest tokens
    empty_slots, empty_mask = model.empty_workspace(2)
    ids = torch.tensor([[*long_update, 0, 0, 0], [*long_update[1:], 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 10 + [0] * 3, [1] * 9 + [0] * 4])
    with torch.no_grad():
        written = torch.ones(2, dtype=torch.bool)  # corrections (the decision is not tested here)
        padded, padded_mask, _ = model.apply_update(empty_slots, empty_mask, ids, mask, written)
        alone = []
        for b, length in enumerate(mask.sum(dim=-1).tolist()):
            row_ids, row_mask = ids[b : b + 1, :length], mask[b : b + 1, :length]
            alone.append(model.apply_update(empty_slots[:1], empty_mask[:1], row_ids, row_mask, written[:1])[0])
    assert padded_mask.all()
    torch.testing.assert_close(padded, torch.cat(alone), atol=5e-5, rtol=1e-5)  # fp32 kernels vary with the shape
    assert (alone[0] - alone[1]).abs().max() > 1e-3  # the oldest token, beyond the newest 4, counts


def test_untrained_gated_workspace_starts_at_token_scale_and_writes_the_identity():
    """W0 is drawn at the scale of the backbone's own token embeddings (here 4x the usual), and an untrained write
    changes nothing (W_new = W0): the rule starts neutral, and the model is exactly its backbone."""
    backbone = tiny_backbone("qwen3")
    with torch.no_grad():
        backbone.get_input_embeddings().weight.mul_(4.0)
    model = DuplexForCausalLM.from_backbone(backbone, num_slots=32, encoder_layers=1, workspace_update="gated")
    embedding_std = float(backbone.get_input_embeddings().weight.detach().std())
    slots_std = float(model.workspace.initial_slots.detach().std())
    assert abs(slots_std - embedding_std) < 0.1 * embedding_std, (slots_std, embedding_std)
    empty_slots, empty_mask = model.empty_workspace(1)
    with torch.no_grad():
        slots, slot_mask, _ = model.apply_update(
            empty_slots, empty_mask, torch.tensor([[83, 116, 111]]), torch.ones(1, 3)
        )
        assert torch.equal(slots[0], model.workspace.initial_slots) and slot_mask.all()
        assert torch.equal(model(PROMPT, **pack_updates([[(2, [65, 66])]])).logits, backbone(PROMPT).logits)


def test_gated_parameters_are_trainable_duplex_parameters(capsys):
    model = gated_model(tiny_backbone("qwen3"))
    fifo = DuplexForCausalLM.from_backbone(
        tiny_backbone("qwen3"), num_slots=4, encoder_layers=1, workspace_update="fifo"
    )
    named = dict(model.named_parameters())
    assert GATED_PARAMETERS <= set(model.duplex_state_dict())
    assert all(named[name].requires_grad for name in GATED_PARAMETERS)
    assert not any(p.requires_grad for p in [*model.model.parameters(), *model.lm_head.parameters()])
    gated_count = sum(named[name].numel() for name in GATED_PARAMETERS)
    assert model.get_nb_trainable_parameters()[0] == fifo.get_nb_trainable_parameters()[0] + gated_count
    model.print_trainable_parameters()
    assert f"trainable params: {fifo.get_nb_trainable_parameters()[0] + gated_count:,}" in capsys.readouterr().out
    model.train()
    corrections = torch.ones(1, 2, dtype=torch.bool)  # as in training, the kinds are known
    packed = pack_updates([[(2, [65, 66, 67]), (5, [70])]])
    model(PROMPT, labels=PROMPT, **packed, update_is_correction=corrections).loss.backward()
    for name in GATED_PARAMETERS:
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name


def test_full_checkpoint_round_trip_keeps_the_gated_parameters_and_the_config_field(tmp_path):
    model = gated_model(tiny_backbone("llama"))
    enc = TOK("Say apple 5 times.\n", return_tensors="pt")
    kwargs = dict(updates=[(0, "Say pear instead."), (3, "ok")], tokenizer=TOK, max_new_tokens=8, do_sample=False)
    expected = model.generate(**enc, **kwargs)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["workspace_update"] == "gated"
    reloaded = DuplexForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.workspace_update == "gated" and isinstance(reloaded.workspace, GatedWorkspace)
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():  # loaded weights are not re-initialised
        assert torch.equal(tensor, reloaded.state_dict()[key]), key
    assert torch.equal(reloaded.generate(**enc, **kwargs), expected)


def test_adapter_only_round_trip_keeps_the_gated_parameters_and_the_config_field(tmp_path):
    backbone_dir = tmp_path / "backbone"
    tiny_backbone("qwen3").save_pretrained(backbone_dir)
    model = gated_model(str(backbone_dir))
    model.save_pretrained(tmp_path / "adapter", adapter_only=True)
    reloaded = DuplexForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert reloaded.config.workspace_update == "gated" and isinstance(reloaded.workspace, GatedWorkspace)
    assert GATED_PARAMETERS <= set(reloaded.duplex_state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[key]), key
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME).exists()


def test_gated_weights_missing_from_a_checkpoint_are_initialised_by_the_rule(tmp_path):
    """A fifo checkpoint loaded as gated: the loaded weights stay as saved, and the new gated ones are initialised
    as `_init_weights` says (the custom-code init trap would leave them empty)."""
    fifo = perturb_duplex(
        DuplexForCausalLM.from_backbone(tiny_backbone("qwen3"), num_slots=4, encoder_layers=1, workspace_update="fifo")
    )
    fifo.save_pretrained(tmp_path)
    gated = DuplexForCausalLM.from_pretrained(tmp_path, workspace_update="gated")
    for key, tensor in fifo.state_dict().items():
        assert torch.equal(tensor, gated.state_dict()[key]), key
    workspace = gated.workspace
    embedding_std = float(gated.get_input_embeddings().weight.detach().std())
    assert torch.isfinite(workspace.initial_slots).all()
    assert abs(float(workspace.initial_slots.detach().std()) - embedding_std) < 0.3 * embedding_std
    assert torch.equal(workspace.mlp[2].weight, torch.zeros_like(workspace.mlp[2].weight))
    assert torch.equal(workspace.slot_norm.weight, torch.ones_like(workspace.slot_norm.weight))
    assert torch.equal(workspace.write_gate.bias, torch.zeros_like(workspace.write_gate.bias))
    assert 0 < float(workspace.write_gate.weight.detach().std()) < 0.05


def test_every_update_goes_through_apply_update_which_decides(monkeypatch):
    """One path: every update, backchannel or not, goes through `apply_update`, where the model decides what it is.
    Untrained, the decision counts every update as a correction, so "ok" rewrites the slots like one, in generation
    and in the teacher-forced pass alike."""
    model = gated_model(tiny_backbone("qwen3"))
    with torch.no_grad():  # the decision as initialised: every update a correction
        model.update_encoder.decision.classifier.weight.zero_()
        model.update_encoder.decision.classifier.bias.zero_()
    calls, apply_update = [], model.apply_update

    def counted_apply_update(*args):
        calls.append(args)
        return apply_update(*args)

    monkeypatch.setattr(model, "apply_update", counted_apply_update)
    enc = TOK("Count from 3 to 9.\n", return_tensors="pt")
    out = model.generate(
        **enc,
        updates=[(0, "Stop at 5."), (3, "ok")],
        tokenizer=TOK,
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    landings = out.update_landings[0]
    assert [(landing.at, landing.applied) for landing in landings] == [(0, True), (3, True)] and len(calls) == 2
    assert [landing.kind for landing in landings] == ["correction", "correction"]
    prompt = enc["input_ids"][0].tolist()
    written = [
        workspace_update_tokens(prompt, TOK(f"\n{landing.text}\n", add_special_tokens=False)["input_ids"], i == 0)
        for i, landing in enumerate(landings)
    ]
    positions = [update_position(len(prompt), landing.at) for landing in landings]
    packed = pack_updates([list(zip(positions, written, strict=True))])
    with torch.no_grad():
        versions, _ = model.workspace_versions(1, **packed)
        forced = model(out.sequences, **packed).logits[:, len(prompt) - 1 : len(prompt) + 5]
    assert (versions.slots[0, 2] - versions.slots[0, 1]).abs().max() > 1e-3  # "ok" rewrote the slots
    torch.testing.assert_close(forced, torch.stack(out.logits, dim=1), atol=1e-4, rtol=0)


def test_train_duplex_passes_the_workspace_update_flag(tmp_path):
    backbone_dir = tmp_path / "backbone"
    tiny_backbone("qwen3").save_pretrained(backbone_dir)
    for argv, expected in (([], "in_context"), (["--workspace_update", "gated"], "gated")):
        args, _ = train_duplex.parse_args(["--output_dir", str(tmp_path / "run"), "--encoder_layers", "1", *argv])
        model = train_duplex.build_model(args, backbone_dir, offline_default=False, prompt_format=PromptFormat())
        assert model.config.workspace_update == expected
        assert isinstance(model.workspace, WORKSPACE_CLASSES[expected])
