"""The backbone's own answers as training rows (data/own_answers.py), with a scripted stand-in for the backbone."""

import re

import torch

from data import build_byte_tokenizer, build_dataset, instance_from_row
from data.collate import tokenize_row, update_ats
from data.own_answers import own_answer_rows
from data.prompts import PromptFormat
from data.tasks import CATEGORY_MEMBERS, get_family


class ScriptedLM(torch.nn.Module):
    """Answers `Name n <category>.` with the category's first members, one per line (`1. Dog\n2. Cat`); where some
    answer is written already, it goes on from a new line, with that list (`follows=True`) or with a refusal."""

    def __init__(self, tokenizer, follows: bool = False):
        super().__init__()
        self.tokenizer, self.follows = tokenizer, follows

    def answer(self, text: str) -> str:
        question, written = text.split("\n", 1)
        n, category = re.fullmatch(r"Name (\d+) (\w+)\.", question).groups()
        members = "\n".join(f"{i + 1}. {m.capitalize()}" for i, m in enumerate(CATEGORY_MEMBERS[category][: int(n)]))
        if not written:
            return members
        return "\n" + (members if self.follows else "I cannot.")

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **_):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = [t for t, m in zip(ids, mask, strict=True) if m]
            new = self.tokenizer(self.answer(self.tokenizer.decode(prompt)))["input_ids"] + [eos_token_id]
            new = (new + [pad_token_id] * max_new_tokens)[:max_new_tokens]
            rows.append(ids + new)
        return torch.tensor(rows)


def test_own_answers_follow_the_corrected_question_and_keep_what_the_rule_accepts():
    tokenizer = build_byte_tokenizer()
    rows = build_dataset("train", 24, 0, families=["items"], mix={"one": 3, "distractor": 1}, landing="any")
    own = own_answer_rows(rows, ScriptedLM(tokenizer, follows=True), tokenizer, PromptFormat(), max_new_tokens=200)
    assert len(own) == len(rows)  # every row answered right by the rule
    for row, before in zip(own, rows, strict=True):
        inst = instance_from_row(row)
        segments = row["segments"]
        assert "".join(segments) == row["response"] and row["ends_with_eos"]
        assert segments[0] == row["original_response"][: len(segments[0])]  # its own answer up to the landing
        assert update_ats(tokenizer, segments) == update_ats(tokenizer, before["segments"])  # lands where it did
        landed = [len(segments[0])]
        if inst.has_correction:
            assert get_family("items").score(inst, row["response"], landed)["correct"]
            assert instance_from_row(before).instruction == inst.instruction
        else:  # a backchannel changes nothing
            assert row["response"] == row["original_response"]


def test_a_corrected_answer_the_rule_rejects_is_answered_afresh_or_dropped():
    tokenizer = build_byte_tokenizer()
    rows = build_dataset("train", 12, 1, families=["items"], mix={"one": 1}, landing="before_space")
    stubborn = ScriptedLM(tokenizer)  # goes on with the old category: the rule rejects it
    own = own_answer_rows(rows, stubborn, tokenizer, PromptFormat(), max_new_tokens=200, samples=1)
    for row in own:  # asked afresh, it starts its answer over with the new category
        corrected = get_family("items").instruction_after(instance_from_row(row), 1)
        assert row["segments"][1] == stubborn.answer(corrected + "\n")
    short = own_answer_rows(rows, stubborn, tokenizer, PromptFormat(), max_new_tokens=30, samples=0)
    assert 0 < len(short) < len(own)  # too little budget left after the landing to name the new category: dropped
    assert {row["ends_with_eos"] for row in short} == {True, False}  # some cut at the budget
    for row in short:  # an answer cut at its budget is trained without EOS
        features = tokenize_row(row, tokenizer)
        assert row["ends_with_eos"] == (features["labels"][-1] == tokenizer.eos_token_id)


def test_without_answers_afresh_every_kept_correction_goes_on_from_what_was_written():
    """`afresh="never"`: an answer that would start over from its first line is never a target; where the backbone does
    not follow the correction going on, the row is dropped."""
    tokenizer = build_byte_tokenizer()
    rows = build_dataset("train", 12, 1, families=["items"], mix={"one": 1}, landing="before_space")
    stubborn = ScriptedLM(tokenizer)  # followed only when asked afresh
    with_afresh = own_answer_rows(rows, stubborn, tokenizer, PromptFormat(), max_new_tokens=200, samples=0)
    going_on = own_answer_rows(rows, stubborn, tokenizer, PromptFormat(), 200, samples=0, afresh="never")
    assert len(going_on) < len(with_afresh)
    for row in going_on:  # the few its rule accepts going on: landing before the answer began
        assert row["segments"][0] == ""
    follows = ScriptedLM(tokenizer, follows=True)
    own = own_answer_rows(rows, follows, tokenizer, PromptFormat(), max_new_tokens=200, samples=0, afresh="never")
    assert len(own) == len(rows)
    for row in own:  # going on from what it wrote: a new line after the landing, never the answer asked afresh
        if not row["segments"][0]:
            continue  # (landing before the answer began: going on is answering afresh)
        corrected = get_family("items").instruction_after(instance_from_row(row), 1)
        assert row["segments"][1] != follows.answer(corrected + "\n")


def test_answers_afresh_last_come_only_where_no_going_on_passes_and_are_recorded():
    """`afresh="last"`: a correction the backbone follows going on keeps that answer; one it follows only asked afresh
    falls back to it, and `followed` says which kind each correction took (what `--own_answer_afresh never` drops)."""
    tokenizer = build_byte_tokenizer()
    rows = build_dataset("train", 12, 1, families=["items"], mix={"one": 1}, landing="before_space")
    follows, stubborn = ScriptedLM(tokenizer, follows=True), ScriptedLM(tokenizer)
    going_on = own_answer_rows(rows, follows, tokenizer, PromptFormat(), 200, samples=0, afresh="never")
    last = own_answer_rows(rows, follows, tokenizer, PromptFormat(), 200, samples=0, afresh="last")
    assert last["response"] == going_on["response"] and set(map(tuple, last["followed"])) == {("going on",)}
    first = own_answer_rows(rows, stubborn, tokenizer, PromptFormat(), 200, samples=0, afresh="first")
    fallback = own_answer_rows(rows, stubborn, tokenizer, PromptFormat(), 200, samples=0, afresh="last")
    assert fallback["response"] == first["response"]  # the stubborn backbone follows only asked afresh
    mid_text = [f for f, row in zip(fallback["followed"], fallback, strict=True) if row["segments"][0]]
    assert mid_text and all(f == ["afresh"] for f in mid_text)


class ScriptedChannel(ScriptedLM):
    """A trained Duplex model's stand-in: after the forced answer so far, it goes on naming members of the category of
    the latest correction read through its channel (`, Apple, Pear`; `glues=True`: `Apple, Pear` stuck onto the word
    in progress)."""

    def __init__(self, tokenizer, glues: bool = False):
        super().__init__(tokenizer)
        self.glues, self.calls = glues, []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kwargs):
        self.calls.append(kwargs["updates"])
        forced = kwargs["logits_processor"][0].forced
        rows = []
        for b, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist(), strict=True)):
            question = self.tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]).split("\n")[0]
            n = re.fullmatch(r"Name (\d+) \w+\.", question).group(1)
            update = kwargs["updates"][b][-1][1]
            category = next(c for c in CATEGORY_MEMBERS if re.search(rf"\b{c}\b", update))
            answer = ", ".join(m.capitalize() for m in CATEGORY_MEMBERS[category][: int(n)])
            new = forced[b] + self.tokenizer(answer if self.glues else ", " + answer)["input_ids"] + [eos_token_id]
            rows.append(ids + (new + [pad_token_id] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)


def test_a_trained_channel_answers_first_and_must_join_cleanly():
    """`channel`: its own answer through the channel, where its update landed, is tried before the backbone's; one
    glued onto the word in progress is not a target (the backbone's answer going on is taken instead)."""
    tokenizer = build_byte_tokenizer()
    rows = build_dataset("train", 12, 1, families=["items"], mix={"one": 1}, landing="before_space")
    follows = ScriptedLM(tokenizer, follows=True)
    channel = ScriptedChannel(tokenizer)
    own = own_answer_rows(rows, follows, tokenizer, PromptFormat(), 200, samples=0, afresh="never", channel=channel)
    assert len(own) == len(rows) and set(map(tuple, own["followed"])) == {("channel",)}
    for row, before in zip(own, rows, strict=True):  # the update lands where the row's first segment ends
        assert [(len(tokenizer(row["segments"][0])["input_ids"]), before["update_texts"][0])] in channel.calls[0]
    glued = own_answer_rows(
        rows,
        follows,
        tokenizer,
        PromptFormat(),
        200,
        samples=0,
        afresh="never",
        channel=ScriptedChannel(tokenizer, True),
    )
    mid_word = [f for f, row in zip(glued["followed"], glued, strict=True) if row["segments"][0][-1:].isalnum()]
    assert mid_word and all(f == ["going on"] for f in mid_word)
    assert ["channel"] in glued["followed"]  # (where the answer so far ends between words, nothing is glued)


def test_a_channel_at_initialisation_writes_what_the_backbone_writes_after_the_forced_answer():
    """The channel's candidates run the real `generate` with the answer so far forced and the update in the channel:
    with zero-initialised gates that is exactly the backbone going on from the same text, as if nothing landed."""
    from transformers import Qwen3ForCausalLM

    from backbone_shapes import backbone_config
    from data.own_answers import _Row, _Writer
    from modeling_duplex import DuplexForCausalLM

    torch.manual_seed(0)
    tokenizer = build_byte_tokenizer()
    backbone = Qwen3ForCausalLM(backbone_config("micro", vocab_size=258, num_hidden_layers=2)).eval()
    channel = DuplexForCausalLM.from_backbone(backbone, num_slots=4, encoder_layers=1).eval()
    rows = build_dataset("train", 4, 2, families=["items"], mix={"one": 1}, landing="before_space")
    writer = _Writer(backbone, tokenizer, PromptFormat(), 12, 4, False, channel)
    todo = []
    for row in rows:
        r = _Row(instance_from_row(row), [3])
        r.pieces = [tokenizer(r.inst.instruction[:3])["input_ids"]]  # some answer written before the update
        todo.append(r)
    from_channel = writer.candidates("channel", todo)
    prompts = [tokenizer(r.inst.instruction + "\n")["input_ids"] + r.written for r in todo]
    alone = writer._generate(prompts, [12 - 3] * len(todo), sample=False)
    assert from_channel == alone


def test_an_interrupted_writing_resumes_after_its_last_finished_stage(tmp_path):
    """Writing own answers takes hours: each finished stage is kept in the journal, and a run started again writes
    only the stages that were not finished, to the same rows."""
    tokenizer = build_byte_tokenizer()
    rows = build_dataset("train", 12, 1, families=["items"], mix={"one": 1}, landing="before_space")
    journal = tmp_path / "journal"
    whole = own_answer_rows(rows, ScriptedLM(tokenizer), tokenizer, PromptFormat(), 200, samples=1, journal=journal)
    stages = sorted(path.stem for path in journal.glob("*.json"))
    assert stages == ["answers", "update-1-00-going-on", "update-1-01-afresh", "update-1-02-sampled"]
    for name in stages[2:]:  # interrupted while asking afresh
        (journal / f"{name}.json").unlink()
    calls = []

    class Counted(ScriptedLM):
        def generate(self, input_ids, *args, **kwargs):
            calls.append(len(input_ids))
            return super().generate(input_ids, *args, **kwargs)

    resumed = own_answer_rows(rows, Counted(tokenizer), tokenizer, PromptFormat(), 200, samples=1, journal=journal)
    assert resumed.to_list() == whole.to_list()
    assert len(calls) == 1  # only the answers afresh were written again (no row was left to sample)
