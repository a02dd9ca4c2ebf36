"""Training end to end: resume after a kill, distillation from the in-band teacher, and a micro run that proves the
correction channel learns."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_backbone
from safetensors.torch import load_file
from transformers import AutoTokenizer, Trainer, TrainingArguments

import eval_duplex
import train_duplex
from data import build_dataset
from data.collate import DuplexCollator, tokenize_row
from modeling_duplex import DuplexForCausalLM

MICRO = [
    "--pretrain_backbone", "--phase0_steps", "6", "--phase0_batch_size", "4", "--duplex_steps", "6",
    "--train_size", "64", "--per_device_train_batch_size", "4", "--save_steps", "2", "--logging_steps", "2",
    "--skip_eval",
    "--encoder_layers", "1", "--num_slots", "4", "--phase0_eval_steps", "0",
]  # fmt: skip


MICRO_STEPS = "150"


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def kill_run_at_step(monkeypatch, output_dir: Path, step: int) -> None:
    """Run the micro job and kill it (KeyboardInterrupt) when its `step`-th training step begins, counting across
    phases (phase 0 has 6 steps)."""
    real_step, calls = Trainer.training_step, {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_duplex.main(["--output_dir", str(output_dir), *MICRO])
    monkeypatch.setattr(Trainer, "training_step", real_step)


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow
def test_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    train_duplex.main(["--output_dir", str(tmp_path / "straight"), *MICRO])
    expected = final_weights(tmp_path / "straight")

    killed = tmp_path / "killed"
    kill_run_at_step(monkeypatch, killed, 6 + 5)  # phase 0 (6) done, the duplex phase past its checkpoint-4
    assert (killed / "duplex" / "checkpoint-4").exists() and not (killed / "final").exists()
    # every checkpoint is complete: it decodes as it is (KV cache on, its tokenizer beside it)
    model, tokenizer = eval_duplex.load_checkpoint(killed / "duplex" / "checkpoint-4")
    assert model.generation_config.use_cache and model.config.get_text_config().use_cache
    assert tokenizer.eos_token_id is not None
    train_duplex.main(["--output_dir", str(killed), *MICRO, "--resume_from_checkpoint", "True"])
    assert_same_weights(final_weights(killed), expected)
    assert (killed / "duplex" / "loss.png").exists()

    # killed in phase 0 and resumed from that phase's checkpoint by path: the duplex phase must not inherit it
    killed_early = tmp_path / "killed-early"
    kill_run_at_step(monkeypatch, killed_early, 5)  # phase 0 past its checkpoint-4
    checkpoint = killed_early / "phase0" / "checkpoint-4"
    train_duplex.main(["--output_dir", str(killed_early), *MICRO, "--resume_from_checkpoint", str(checkpoint)])
    assert_same_weights(final_weights(killed_early), expected)


def test_resume_from_a_path_outside_the_run_is_refused(tmp_path):
    stray = tmp_path / "elsewhere" / "checkpoint-2"
    stray.mkdir(parents=True)
    with pytest.raises(SystemExit):
        train_duplex.parse_args(["--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", str(stray)])


@pytest.mark.slow
def test_tdm_checkpoint_names_its_tuned_backbone(tmp_path):
    """The tdm baseline fine-tunes the whole backbone: its checkpoint must name that tuned backbone, not the one it
    started from, so that loading by `backbone_name_or_path` gives the model that was evaluated."""
    out = tmp_path / "tdm"
    train_duplex.main([
        "--output_dir", str(out), "--method", "tdm", "--duplex_steps", "2", "--train_size", "16",
        "--per_device_train_batch_size", "4", "--save_steps", "100", "--families", "list",
    ])  # fmt: skip
    checkpoint = load_file(out / "tdm-final" / "model.safetensors")
    named = Path(json.loads((out / "tdm-final" / "config.json").read_text())["backbone_name_or_path"])
    backbone = load_file(named / "model.safetensors")
    shipped = load_file(train_duplex.SHIPPED_BACKBONE / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(backbone[key], checkpoint[key], atol=0, rtol=0)
    assert not torch.equal(backbone[key], shipped[key]), "the named backbone must be the tuned one"


@pytest.mark.slow
def test_micro_run_revises_on_held_out_instances(tmp_path):
    """A short run of the duplex modules on the shipped frozen backbone, one family (note: a new name or topic
    mid-letter). On held-out instances the correction gets through: per token, the workspace writes what follows the
    correction clearly more often than the ablation (corrections dropped), and greedy decoding revises answers the
    ablation never does. The update decision learns the rows' kinds: corrections are written, backchannels (the
    held-out ones included) change nothing."""
    out = tmp_path / "micro"
    train_duplex.main([
        "--output_dir", str(out), "--families", "note", "--duplex_steps", MICRO_STEPS, "--train_size", "2000",
        "--save_steps", "10000", "--logging_steps", "50", "--skip_eval", "--disable_tqdm", "True",
    ])  # fmt: skip
    model, tokenizer = eval_duplex.load_checkpoint(out / "final")
    results = eval_duplex.evaluate(
        model, tokenizer, n_per_family=8, families=["note"], modes=("workspace", "ignore"), progress=False
    )
    revision = {m: results["metrics"][m]["revision_accuracy"]["overall"]["rate"] for m in ("workspace", "ignore")}
    per_token = {m: v["post_update_token_accuracy"]["rate"] for m, v in results["teacher_forced"].items()}
    assert per_token["workspace"] > per_token["ignore"], per_token
    assert revision["workspace"] >= 0.5 > revision["ignore"] == 0.0, revision
    workspace = results["metrics"]["workspace"]
    decided = workspace["decision_accuracy"]["overall"]
    assert decided["n"] == 48 and decided["rate"] >= 0.9, decided  # 6 kinds of 8 rows
    assert workspace["held_out_distractor_stability"]["overall"]["rate"] >= 0.75, workspace


def test_distillation_teaches_only_where_the_in_band_teacher_knows_more():
    """The in-band teacher (the frozen backbone given the corrections as text, distractors dropped) and a zero-init
    duplex model (exactly that backbone, blind to updates) agree wherever the row holds no correction: KL 0 on
    rows without updates and on distractor rows. On corrected rows the teacher reads the correction and they
    differ. Off-by-one token matching would break the zero."""
    tokenizer = AutoTokenizer.from_pretrained(train_duplex.SHIPPED_BACKBONE)
    model = DuplexForCausalLM.from_backbone(str(train_duplex.SHIPPED_BACKBONE), num_slots=8, encoder_layers=1).eval()
    collator = DuplexCollator(tokenizer.pad_token_id)
    for kind, expect_zero in (("none", True), ("distractor", True), ("one", False), ("two", False)):
        rows = build_dataset("train", 7, seed=3, mix={kind: 1.0})
        batch = collator([tokenize_row(row, tokenizer, "duplex", teacher=True) for row in rows])
        taught = {key: batch.pop(key) for key in list(batch) if key.startswith("teacher_")}
        with torch.no_grad():
            student = model(**batch).logits
            teacher = model(input_ids=taught["teacher_input_ids"], attention_mask=taught["teacher_attention_mask"])
        kl = train_duplex.distillation_loss(student, batch["labels"], teacher.logits, taught["teacher_labels"])
        assert (kl.item() < 1e-6) == expect_zero, (kind, kl.item())


@pytest.mark.slow
def test_phase0_continues_from_a_backbone_and_scores_each_family(tmp_path):
    """A long pretraining run is built in pieces: phase 0 starts from a pretrained backbone's weights (at lr 0 it
    ends exactly there), and its curves score every family on both held-out splits at each evaluation step."""
    out = tmp_path / "pieces"
    train_duplex.main([
        "--output_dir", str(out), "--pretrain_backbone", "--pretrain_only", "--phase0_init",
        str(train_duplex.SHIPPED_BACKBONE), "--phase0_lr", "0", "--phase0_steps", "2", "--phase0_batch_size", "4",
        "--train_size", "32", "--families", "list,spell", "--phase0_eval_steps", "2", "--phase0_eval_per_family", "1",
        "--save_steps", "100", "--disable_tqdm", "True",
    ])  # fmt: skip
    shipped = load_file(train_duplex.SHIPPED_BACKBONE / "model.safetensors")
    assert_same_weights(load_file(out / "backbone" / "model.safetensors"), shipped)
    records = train_duplex.read_curves(out / "phase0" / "curves.jsonl")
    assert [r["step"] for r in records] == [0, 2]
    for record in records:
        assert set(record["splits"]) == {"test", "outside"}
        for columns in record["splits"].values():
            assert set(columns) == {"backbone", "inband", "restart"}
            assert set(columns["backbone"]["retention"]["per_family"]) == {"list", "spell"}
    assert records[0]["splits"] == records[1]["splits"]  # the same weights write the same answers
    assert (out / "phase0" / "curves.png").exists()


def test_a_deepened_backbone_computes_what_it_did():
    """scripts/grow_backbone.py adds decoder layers that start as the identity, so that phase 0 can go on from a
    pretrained backbone with more depth: the same logits and the same cached generation, and layers that train."""
    spec = importlib.util.spec_from_file_location("grow_backbone", ROOT / "scripts" / "grow_backbone.py")
    grow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grow)
    backbone = tiny_backbone("qwen3").eval()
    ids = torch.randint(0, backbone.config.vocab_size, (2, 12))
    with torch.no_grad():
        logits = backbone(ids).logits
        generated = backbone.generate(ids, max_new_tokens=6, do_sample=False)
        layers = len(backbone.model.layers)
        grown = grow.grow_backbone(backbone, after=[0, layers - 1])
        assert len(grown.model.layers) == grown.config.num_hidden_layers == layers + 2
        assert [layer.self_attn.layer_idx for layer in grown.model.layers] == list(range(layers + 2))
        assert torch.equal(grown(ids).logits, logits)
        assert torch.equal(grown.generate(ids, max_new_tokens=6, do_sample=False), generated)
    grown(ids, labels=ids).loss.backward()
    assert grown.model.layers[1].self_attn.o_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="after"):
        grow.grow_backbone(tiny_backbone("qwen3"), after=[layers])


def test_onpolicy_distillation_is_zero_where_the_teacher_knows_nothing_more():
    """On-policy distillation scores the model's own continuation after its update in two contexts: the workspace
    and the in-band teacher. Rollouts write the oracle's answer up to the update, then the model's own tokens; a
    zero-init duplex model (blind to updates) and the teacher agree on distractor rows (KL 0: the teacher leaves
    backchannels out) and differ on corrected rows. Misaligned contexts or tokens would break the zero."""
    tokenizer = AutoTokenizer.from_pretrained(train_duplex.SHIPPED_BACKBONE)
    model = DuplexForCausalLM.from_backbone(str(train_duplex.SHIPPED_BACKBONE), num_slots=64, encoder_layers=1).eval()
    collator = DuplexCollator(tokenizer.pad_token_id)
    for kind, expect_zero in (("distractor", True), ("one", False)):
        rows = build_dataset("train", 6, seed=5, mix={kind: 1.0})
        batch = collator([tokenize_row(row, tokenizer, "duplex", teacher=True) for row in rows])
        taught = {key: batch.pop(key) for key in list(batch) if key.startswith("teacher_")}
        rollouts = train_duplex.roll_out(model, batch, taught, max_rows=6, pad_token_id=tokenizer.pad_token_id)
        assert len(rollouts) == 6
        for rollout, row in zip(rollouts, rows, strict=True):
            assert tokenizer.decode(rollout.prefix) == row["segments"][0]  # the oracle's answer up to the update
            assert rollout.continuation  # and then the model's own tokens
        student, teacher = train_duplex.onpolicy_batches(rollouts, tokenizer.pad_token_id)
        labels = student.pop("labels")
        with torch.no_grad():
            kl = train_duplex.distillation_loss(
                model(**student).logits,
                labels,
                model(input_ids=teacher["input_ids"], attention_mask=teacher["attention_mask"]).logits,
                teacher["labels"],
            )
        assert (kl.item() < 1e-6) == expect_zero, (kind, kl.item())


def test_decision_tokens_are_where_each_correction_changes_the_answer():
    """The decision mask marks, for each correction, the token at its change offset (EOS for a count that now stops
    early), a token the model predicts after the correction has landed."""
    tokenizer = AutoTokenizer.from_pretrained(train_duplex.SHIPPED_BACKBONE)
    rows = build_dataset("train", 28, seed=5, mix={"one": 0.5, "two": 0.3, "distractor": 0.2})
    features = [tokenize_row(row, tokenizer, "duplex") for row in rows]
    batch = DuplexCollator(tokenizer.pad_token_id, decisions=True)(features)
    for b, (row, feature) in enumerate(zip(rows, features, strict=True)):
        offsets = [o for o in row["update_change_offsets"] if o >= 0]
        marked = batch["decision_mask"][b].nonzero()[:, 0].tolist()
        assert marked == sorted(feature["decision_positions"]) and len(marked) == len(offsets)
        for index, offset in zip(marked, sorted(offsets), strict=True):
            token = tokenizer.decode(batch["input_ids"][b, index])
            assert token == (row["response"][offset] if offset < len(row["response"]) else tokenizer.eos_token)
            assert index - 1 >= batch["update_positions"][b, 0]  # predicted from a position that reads an update


def test_held_out_curves_decode_without_the_trainers_autocast(duplex):
    """Under --bf16 accelerate wraps the model's forward in autocast; the held-out curves must decode in the weights'
    own precision (bf16 greedy scores are noise on a real backbone), and training goes on wrapped afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    ids = torch.tensor([[5, 9, 2, 7, 11]])
    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier Trainer here may have chosen fp32
    try:
        with torch.no_grad():
            expected = duplex(input_ids=ids).logits
            prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare_model(duplex)
            wrapped = prepared.forward
            assert not torch.equal(prepared(input_ids=ids).logits, expected)  # the wrapper does cast
            with train_duplex.decodable(prepared) as model:
                assert torch.equal(model(input_ids=ids).logits, expected)
        assert prepared.forward == wrapped
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # later Trainers choose their own precision


def test_gated_optimizer_gives_gates_and_the_encoder_their_own_learning_rates():
    """Gates open fast (`gate_lr`); with `encoder_lr` the update encoder's layers move slowly; the decision head and
    the rest keep the base rate. Every trainable parameter is in exactly one group."""
    model = DuplexForCausalLM.from_backbone(tiny_backbone("qwen3"), encoder_layers=1)
    args = TrainingArguments(output_dir="unused", learning_rate=1e-3, use_cpu=True, report_to=[])
    groups = train_duplex.gated_optimizer(model, args, gate_lr=0.3, encoder_lr=1e-4).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {g["lr"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert set(by_lr) == {1e-3, 0.3, 1e-4}
    assert by_lr[0.3] and all(n.endswith(".gate") for n in by_lr[0.3])
    assert by_lr[1e-4] and all(".update_encoder.layers." in f".{n}" for n in by_lr[1e-4])
    assert any("decision" in n for n in by_lr[1e-3])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(n for g in by_lr.values() for n in g) == sorted(trainable)
    without = train_duplex.gated_optimizer(model, args, gate_lr=0.3).param_groups
    assert [len(g["params"]) for g in without] == [len(by_lr[1e-3]) + len(by_lr[1e-4]), len(by_lr[0.3])]


def test_duplex_mix_sets_the_kinds_of_row_and_the_own_answer_cache_follows_the_rows(tmp_path, monkeypatch):
    """`--duplex_mix` weighs the kinds of instance (an unknown kind is refused, naming the flag); the own answers'
    cache is keyed by which instances were written, so other rows of the same count are written afresh."""
    with pytest.raises(SystemExit):
        train_duplex.parse_args(["--duplex_mix", "one=1,twice=2"])
    args, _ = train_duplex.parse_args(["--duplex_mix", "two=1", "--families", "items"])
    assert args.duplex_mix_weights == {"two": 1.0}
    assert train_duplex.parse_args([])[0].duplex_mix_weights == train_duplex.DUPLEX_MIX

    written = []

    def fake_own_answer_rows(rows, *_, **__):
        written.append(len(rows))
        return rows.add_column("followed", [[] for _ in range(len(rows))])

    monkeypatch.setattr(train_duplex, "own_answer_rows", fake_own_answer_rows)
    model = type("Frozen", (), {"get_base_model": lambda self: None})()

    def cached(rows):
        return train_duplex.cached_own_answers(args, rows, model, None, None, tmp_path, seed=0)

    two = build_dataset("train", 6, seed=0, families=["items"], mix=args.duplex_mix_weights)
    assert all(len(r["update_texts"]) == 2 for r in two)
    one = build_dataset("train", 6, seed=0, families=["items"], mix={"one": 1.0})
    assert cached(two)["prompt"] == two["prompt"] and cached(two)["prompt"] == two["prompt"]
    assert written == [6]  # the second call read the cache
    assert cached(one)["update_texts"] == one["update_texts"]
    assert written == [6, 6]
