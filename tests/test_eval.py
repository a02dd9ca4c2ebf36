"""eval_duplex: statistics, the scoring plumbing (an oracle stands in for the model), identical instances across
modes, and the report/CLI on a tiny random checkpoint."""

import importlib.util
import itertools
import json
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from transformers import Qwen3ForCausalLM

import eval_duplex
from backbone_shapes import backbone_config
from data import FAMILIES, LANDINGS, build_byte_tokenizer
from data.collate import restart_response
from data.prompts import PromptFormat
from data.tasks import Instance, TaskUpdate
from modeling_duplex import DuplexForCausalLM

ALL_MODES = ("workspace", "ignore", "inband", "restart")


# ---- a model that answers with the oracle ---------------------------------------------------------------------------


def oracle_table(eval_set: dict) -> dict:
    """(prompt, updates) -> the oracle response; each `at` computed independently of eval_duplex (byte tokenizer:
    the UTF-8 length of the response up to the update's word boundary)."""
    table = {}

    def put(key, answer):
        # A model answers each prompt one way; the list family's picks hang on a hidden seed, so two rows with
        # one prompt may want different answers: such an eval set cannot be scored perfectly by any model.
        assert table.setdefault(key, answer) == answer, f"ambiguous oracle for {key}: pick other seeds"

    for kinds in eval_set.values():
        for rows in kinds.values():
            for row in rows:
                response, texts = row["response"], row["update_texts"]
                ats = list(itertools.accumulate(len(s.encode()) for s in row["segments"][:-1]))  # where they land
                put((row["prompt"], tuple(zip(ats, texts, strict=True))), response)
                put((row["prompt"], ()), row["original_response"])
                if len(texts) == 1:  # the restart baseline's prompt
                    corrected = row["update_kinds"][0] == "correction"
                    put(
                        (PromptFormat().restart_prompt(row["family"], row["instruction"], texts), ()),
                        restart_response(row) if corrected else row["original_response"],
                    )
    return table


class OracleLM:
    """Duck-typed stand-in for DuplexForCausalLM: looks up the oracle answer for each left-padded prompt and its
    updates (ignore mode: no updates), records what it was asked, and answers like `generate`."""

    def __init__(self, tokenizer, table: dict):
        self.tok, self.table, self.calls = tokenizer, table, []
        self.base = None

    def get_base_model(self) -> "OracleLM":
        self.base = self.base or OracleLM(self.tok, self.table)
        return self.base

    def generate(
        self,
        input_ids,
        attention_mask,
        max_new_tokens,
        pad_token_id,
        eos_token_id,
        updates=None,
        update_mode=None,
        tokenizer=None,
        **kwargs,
    ):
        assert (attention_mask[:, -1] == 1).all(), "batches must be left padded"
        new = []
        for b in range(input_ids.shape[0]):
            prompt = self.tok.decode(input_ids[b][attention_mask[b].bool()].tolist())
            asked = tuple(tuple(u) for u in updates[b]) if updates is not None else ()
            self.calls.append((update_mode, prompt, asked))
            response = self.table[(prompt, () if update_mode == "ignore" else asked)]
            ids = [*self.tok(response, add_special_tokens=False).input_ids, eos_token_id]
            assert len(ids) <= max_new_tokens, "max_new_tokens must fit the longest oracle response"
            new.append(ids + [pad_token_id] * (max_new_tokens - len(ids)))
        return SimpleNamespace(sequences=torch.cat([input_ids, torch.tensor(new)], dim=1))


@pytest.fixture(scope="module")
def oracle_run():
    tok = build_byte_tokenizer()
    kwargs = dict(n_per_family=1, seeds=(0,), sweep_per_family=2)  # seeds whose list rows are unambiguous
    eval_set = eval_duplex.build_eval_set(kwargs["seeds"], kwargs["n_per_family"], kwargs["sweep_per_family"])
    model, tdm = OracleLM(tok, oracle_table(eval_set)), OracleLM(tok, oracle_table(eval_set))
    results = eval_duplex.evaluate(model, tok, modes=ALL_MODES, tdm_model=tdm, batch_size=8, progress=False, **kwargs)
    return results, model, tdm, eval_set


def overall(results, mode, metric):
    return results["metrics"][mode][metric]["overall"]


def test_oracle_model_scores_perfectly(oracle_run):
    """The oracle as the model: 100% revision, 0% contradiction, everywhere the mode hears the update."""
    results, *_ = oracle_run
    assert results["config"]["counts"]["one"] == len(FAMILIES)
    for mode in ("workspace", "inband", "restart", "tdm"):
        for metric, want in [
            ("revision_accuracy", 1.0),
            ("contradiction_rate", 0.0),
            ("distractor_stability", 1.0),
            ("retention", 1.0),
        ]:
            stat = overall(results, mode, metric)
            assert stat["n"] == len(FAMILIES) and stat["rate"] == want, (mode, metric, stat)
        per_family = results["metrics"][mode]["revision_accuracy"]["per_family"]
        assert all(s["rate"] == 1.0 and s["n"] == 1 for s in per_family.values())
        curve = results["sweep"]["modes"][mode]
        assert sum(s["n"] for s in curve) > len(FAMILIES) and all(s["rate"] in (1.0, None) for s in curve)
    for mode in ("workspace", "inband", "tdm"):  # wherever the update lands: after the space, inside a word
        after_space = overall(results, mode, "revision_accuracy_after_space")
        assert after_space["rate"] == 1.0 and after_space["n"] == len(FAMILIES)
        assert overall(results, mode, "revision_accuracy_in_word")["n"] == len(FAMILIES) - 1  # spell: single letters
        assert overall(results, mode, "revision_accuracy_in_word")["rate"] == 1.0
        landings = results["sweep"]["landings"][mode]
        assert all(landings[kind]["rate"] == 1.0 and landings[kind]["n"] > 0 for kind in LANDINGS), landings
    for mode in ("workspace", "inband", "tdm"):
        assert overall(results, mode, "two_update_accuracy")["rate"] == 1.0
        assert overall(results, mode, "three_update_accuracy")["rate"] == 1.0
        assert overall(results, mode, "tokens_to_revision")["n"] == len(FAMILIES)
    assert overall(results, "restart", "two_update_accuracy")["n"] == 0  # restart: single corrections only
    assert overall(results, "backbone", "retention")["rate"] == 1.0
    # the ablation hears nothing: never revised, old values everywhere, trivially stable
    assert overall(results, "ignore", "revision_accuracy")["rate"] == 0.0
    assert overall(results, "ignore", "contradiction_rate")["rate"] > 0.5
    assert overall(results, "ignore", "distractor_stability")["rate"] == 1.0
    assert all(s["rate"] in (0.0, None) for s in results["sweep"]["modes"]["ignore"])


def test_modes_see_identical_instances(oracle_run):
    results, model, tdm, eval_set = oracle_run
    asked = {mode: {(p, u) for m, p, u in model.calls if m == mode} for mode in ("workspace", "ignore", "inband")}
    asked["tdm"] = {(p, u) for m, p, u in tdm.calls if m == "inband"}
    assert asked["workspace"] and asked["workspace"] == asked["ignore"] == asked["inband"] == asked["tdm"]
    instructions = {p.split("\n")[0] for _, p, _ in model.calls}
    assert {p.split("\n")[0] for _, p, _ in model.base.calls} <= instructions  # restart re-prompts the same ones
    assert eval_duplex.build_eval_set((0,), 1, 2) == eval_set  # deterministic
    assert results["config"]["instances"] == eval_duplex.fingerprint(eval_set)
    tok = build_byte_tokenizer()
    alone = eval_duplex.evaluate(
        OracleLM(tok, oracle_table(eval_set)),
        tok,
        n_per_family=1,
        seeds=(0,),
        sweep_per_family=2,
        modes=("ignore",),
        progress=False,
    )
    assert alone["config"]["instances"] == results["config"]["instances"]
    pooled = eval_duplex.build_eval_set((0, 1), 1, 0)  # seeds add instances, the first seed's stay the same
    assert pooled[0]["one"] == eval_set[0]["one"] and pooled[1]["one"] != pooled[0]["one"]


def test_wilson_interval():
    lo, hi = eval_duplex.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = eval_duplex.wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert eval_duplex.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = eval_duplex.wilson_interval(55, 100)
    small_lo, small_hi = eval_duplex.wilson_interval(11, 20)
    assert lo < 0.55 < hi and hi - lo < small_hi - small_lo  # more data, narrower interval
    assert eval_duplex.wilson_interval(0, 0) is None
    stat = eval_duplex.proportion([True, False, True, True])
    assert (stat["k"], stat["n"], stat["rate"]) == (3, 4, 0.75)
    assert stat["ci"] == list(eval_duplex.wilson_interval(3, 4))


def test_tokens_to_revision_known_value():
    """Count 3..9, `Stop at 6.` after "3 4": the pre-update course " 5 6 7 8 9" and the oracle " 5 6" part at the
    space after "6" (the oracle ends there): 4 tokens after `at`."""
    tok = build_byte_tokenizer()
    inst = FAMILIES["count"]._build({"a": 3, "b": 9}, [6], [TaskUpdate(2, "Stop at 6.", "correction")])
    assert isinstance(inst, Instance) and inst.response == "3 4 5 6"
    ids = tok(inst.response, add_special_tokens=False).input_ids
    assert eval_duplex.tokens_to_revision(tok, inst, 3, ids, ended=True) == 4


# ---- the real thing, tiny ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    backbone = Qwen3ForCausalLM(backbone_config("micro", vocab_size=258, num_hidden_layers=2)).eval()
    model = DuplexForCausalLM.from_backbone(backbone, num_slots=4, encoder_layers=1)
    path = tmp_path_factory.mktemp("tiny_duplex")
    model.save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    return path


def test_cli_writes_the_report(checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    results = eval_duplex.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--tdm-checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--families",
            "count",
            "case",
            "--n-per-family",
            "1",
            "--sweep-per-family",
            "1",
            "--max-new-tokens",
            "12",
            "--batch-size",
            "16",
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert "| metric | workspace | ignore | inband | restart | tdm | backbone |" in printed
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "sweep.png", "generations.jsonl"}
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    for mode in ALL_MODES:  # every output is there, scored: its flags give the report's revision accuracy
        flags = [g["correct"] for g in generations if g["mode"] == mode and g["kind"] == "one"]
        assert len(flags) == 2 and sum(flags) / 2 == results["metrics"][mode]["revision_accuracy"]["overall"]["rate"]
    for g in generations:  # where each update landed, in characters of the output: enough to score it again
        assert len(g["landed"]) == len(g["updates"]) and g["landed"] == sorted(g["landed"])
        assert all(0 <= cut <= len(g["generated"]) for cut in g["landed"])
    assert any(0 < g["landed"][0] < len(g["generated"]) for g in generations if g["kind"] == "one")
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["columns"] == [*ALL_MODES, "tdm", "backbone"] == results["columns"]
    assert set(saved) >= {"config", "metrics", "sweep", "reference", "timing", "examples"}
    for mode in ALL_MODES:
        assert set(saved["metrics"][mode]) == {*eval_duplex.PROPORTIONS, "tokens_to_revision"}
        stat = saved["metrics"][mode]["revision_accuracy"]["overall"]
        assert stat["n"] == 2 and stat["ci"][0] <= stat["rate"] <= stat["ci"][1]
        assert set(saved["metrics"][mode]["revision_accuracy"]["per_family"]) == {"count", "case"}
    assert set(saved["sweep"]["modes"]) == {*ALL_MODES, "tdm"}
    assert eval_duplex.render_markdown(saved) == (out / "results.md").read_text()
    assert "55.0% (ablation 4.4%)" in printed and "Per family: retention of the backbone alone" in printed


@pytest.mark.parametrize(
    "argv",
    [["--n-per-family", "0"], ["--modes", "bogus"], ["--modes", "tdm"], ["--batch-size", "x"], ["--seeds"]],
)
def test_cli_rejects_bad_arguments(checkpoint, argv):
    with pytest.raises(SystemExit) as exc:
        eval_duplex.main(["--checkpoint", str(checkpoint), *argv])
    assert exc.value.code == 2


def test_cli_rejects_a_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit) as exc:
        eval_duplex.main(["--checkpoint", str(tmp_path / "nope")])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="tdm"):
        eval_duplex.evaluate(None, build_byte_tokenizer(), modes=("tdm",))


def test_eval_set_on_values_outside_every_pool():
    """`split="outside"` evaluates on values no generator trains on; `kinds` limits the instance kinds built."""
    from data.tasks import OUTSIDE_POOLS

    rows = eval_duplex.build_eval_set((0,), 2, 0, ["repeat", "note"], split="outside", kinds=["one"])[0]
    assert set(rows) == {"one", "sweep"} and not rows["sweep"] and len(rows["one"]) == 4
    outside = set(OUTSIDE_POOLS["words"]) | set(OUTSIDE_POOLS["names"]) | set(OUTSIDE_POOLS["topics"])
    for row in rows["one"]:
        assert set(re.findall(r"[A-Za-z]+", row["instruction"])) & outside, row["instruction"]


def test_checkpoint_curve_evaluates_each_checkpoint_once(checkpoint, tmp_path, monkeypatch):
    """scripts/checkpoint_curve.py: revision per saved step with intervals; a rerun reads the kept reports."""
    spec = importlib.util.spec_from_file_location("checkpoint_curve", ROOT / "scripts" / "checkpoint_curve.py")
    checkpoint_curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checkpoint_curve)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-0").symlink_to(checkpoint)  # closed gates: revises nothing
    (run / "checkpoint-40").symlink_to(ROOT / "checkpoints" / "duplex-tiny")
    argv = [str(run), "--out", str(tmp_path / "curve"), "--", "--families", "count", "--modes", "workspace"]
    argv += ["--kinds", "one", "--n-per-family", "4", "--sweep-per-family", "0", "--no-progress"]
    checkpoint_curve.main(argv)
    table = (tmp_path / "curve" / "curve.md").read_text().splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| 0", "| 40"]
    assert table[0].endswith("| clean join |") and table[1].count("---|") == 4  # corrections landed mid-answer
    assert table[2].split(" | ")[1].startswith("0.0% (0.0-")
    assert float(table[3].split(" | ")[1].split("%")[0]) >= 75.0
    assert (tmp_path / "curve" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(eval_duplex, "main", lambda argv: pytest.fail("evaluated again"))
    checkpoint_curve.main(argv)


def test_default_kinds_skip_what_the_families_cannot_have():
    """Spelling answers have no point inside a word: with the default kinds, `one_in_word` is skipped with a warning
    and every other kind is evaluated, instead of building an empty dataset."""
    tok = build_byte_tokenizer()
    kwargs = dict(n_per_family=1, seeds=(0,), sweep_per_family=1, families=["spell"])
    assert eval_duplex.possible_kinds(eval_duplex.KINDS, ["spell"])[1] == ["one_in_word"]
    eval_set = eval_duplex.build_eval_set(kwargs["seeds"], 1, 1, ["spell"], kinds=["one", "none"])
    model = OracleLM(tok, oracle_table(eval_set))
    with pytest.warns(UserWarning, match=r"skipping kinds \['one_in_word'\]"):
        results = eval_duplex.evaluate(model, tok, modes=("ignore",), batch_size=8, progress=False, **kwargs)
    assert results["metrics"]["ignore"]
    with pytest.raises(ValueError, match="none of"), pytest.warns(UserWarning):
        eval_duplex.evaluate(model, tok, modes=("ignore",), progress=False, kinds=["one_in_word"], **kwargs)


def test_join_check_tells_clean_joins_from_glued_and_restarted_ones():
    from data.joins import join_check
    from eval_duplex import join_excerpt

    assert join_check("1. Bananas\n2. Apples\n3. Dogs", [len("1. Bananas\n2. Apples\n")]) == "clean"
    assert join_check("I hope thisDear Ben, I hope", [len("I hope this")]) == "glued"
    assert join_check("since IRome was born", [len("since I")]) == "glued"
    assert join_check("1. Red: The1. Red: The most", [len("1. Red: The")]) == "glued"
    assert join_check("1. Red\n2. Blue\n1. Dogs\n2. Cats", [len("1. Red\n2. Blue\n")]) == "restart"
    assert join_check("Dear Anna, I hope this Dear Ben, hi", [len("Dear Anna, I hope this")]) == "restart"
    assert join_check("1. Bananas\n2. Ap", [len("1. Bananas\n2. Ap")]) == "ended"
    assert join_check("1. Bananas\n2. Apples\n3. Cats", [len("1. Bananas\n2. Ap")], in_word=True) == "clean"
    assert join_check("1. Bananas\n2. ApDogs", [len("1. Bananas\n2. Ap")], in_word=True) == "glued"
    assert join_excerpt("abc def", 3, "x") == "abc⟨x⟩ def"


def test_a_join_that_finishes_the_word_the_answer_was_writing_is_clean():
    """Updates land after a number of tokens, so in a model's own text the landing can fall inside a word
    (`bou|quet`): going on with the rest of that word as the answer would have written it is a clean join, anything
    else stuck onto it is glued."""
    from data.joins import join_check, word_in_progress

    reference = "The vibrant colors of a bouquet, a sight"
    cut = len("The vibrant colors of a bou")
    rest = word_in_progress(reference, "The vibrant colors of a bouquet, a perfect oven", cut)
    assert rest == "quet"
    assert join_check("The vibrant colors of a bouquet, a perfect oven", [cut], finishing=rest) == "clean"
    assert join_check("The vibrant colors of a bouI, a warm oven", [cut], finishing=rest) == "glued"
    assert join_check("The vibrant colors of a bouquets oven", [cut], finishing=rest) == "glued"  # not that word
    assert join_check("The vibrant colors of a bouquet, a perfect oven", [cut]) == "glued"  # (without the reference)
    assert word_in_progress(reference, "The vibrant colors of a bou", cut - 1) == "uquet"
    assert word_in_progress(reference, "The vibrant colors of X", cut) == ""  # the texts differ before the landing
    assert word_in_progress(reference, reference, len("The vibrant")) == ""  # between words
