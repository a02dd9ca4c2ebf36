"""Tests for the Duplex task data: the task formats (README, Tasks), splits, scoring, tokenizer."""

import json
import random
import re

import pytest

from data import (
    CATEGORIES,
    CHAT_FAMILIES,
    DISTRACTORS,
    FAMILIES,
    LANDINGS,
    Instance,
    TaskUpdate,
    build_byte_tokenizer,
    build_dataset,
    in_split,
    instance_from_row,
    landing_kind,
    split_pool,
)
from data.tasks import ITEM_CATEGORIES, NAMES, OUTSIDE_CATEGORIES, TOPICS, WORDS

CASES = [
    {"n_updates": 0},
    {"n_updates": 1},
    {"n_updates": 2},
    {"n_updates": 3},
    {"distractor": True},
    {"word_index": 0},
]

CATS = "|".join(CATEGORIES)
CANONICAL = {  # (instruction, correction) regexes of the canonical formats
    "count": (r"Count from \d+ to \d+\.", r"Stop at \d+\."),
    "repeat": (r"Say [a-z]+ \d+ times\.", r"Say [a-z]+ instead\."),
    "spell": (r"Spell [a-z]+\.", r"Spell [a-z]+ instead\."),
    "add": (r"Add \d+ to each: \d+( \d+)+", r"Add \d+ instead\."),
    "list": (rf"Name \d+ ({CATS})\.", rf"Name ({CATS}) instead\."),
    "note": (r"Write to [A-Z][a-z]+ about [a-z]+\.", r"The (name|topic) is [A-Za-z]+\."),
    "case": (r"Uppercase:( [a-z]+)+|Lowercase:( [A-Z]+)+", r"(Uppercase|Lowercase) instead\."),
}


def test_segments_follow_word_boundary_convention():
    inst = Instance("count", "Count from 3 to 6.", "Count from 3 to 6.\n", "3 4 5 6", "3 4 5 6", [], [])
    for ks, segs in [
        ([2], ["3 4", " 5 6"]),
        ([0], ["", "3 4 5 6"]),
        ([4], ["3 4 5 6", ""]),
        ([1, 1], ["3", "", " 4 5 6"]),
    ]:
        inst.updates = [TaskUpdate(k, "ok", "distractor") for k in ks]
        assert inst.segments() == segs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_instances_are_consistent(name):
    fam = FAMILIES[name]
    rng = random.Random(0)
    for kw in CASES:
        for split in ("train", "test"):
            for _ in range(30):
                inst = fam.sample(rng, split, **kw)
                n = kw.get("n_updates", 1)
                assert len(inst.updates) == n and inst.prompt == inst.instruction + "\n"
                assert "".join(inst.segments()) == inst.response
                ks = [u.word_index for u in inst.updates]
                assert ks == sorted(ks) and (n == 0 or 0 <= ks[0] < len(inst.original_response.split(" ")))
                if "word_index" in kw:
                    assert ks[0] == 0
                if n:  # prefix invariant: the first update only changes what follows it
                    k = ks[0]
                    assert inst.words()[:k] == inst.original_response.split(" ")[:k]
                if kw.get("distractor"):
                    assert inst.response == inst.original_response and inst.invalidated == []
                    assert all(u.kind == "distractor" and u.text in DISTRACTORS for u in inst.updates)
                elif n:
                    assert inst.response != inst.original_response and inst.has_correction
                res = fam.score(inst, inst.response)
                assert res["correct"] and not res["contradiction"]
                assert fam.oracle_continuation(inst) == "".join(inst.segments()[1:]) or n == 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_canonical_phrasings(name):
    fam, (instr_re, upd_re) = FAMILIES[name], CANONICAL[name]
    rng = random.Random(1)
    for _ in range(50):
        inst = fam.sample(rng, "test", n_updates=2)
        assert re.fullmatch(instr_re, inst.instruction), inst.instruction
        assert all(re.fullmatch(upd_re, u.text) for u in inst.updates), inst.updates
        assert re.fullmatch(r"\S+( \S+)*", inst.response)  # single spaces


def test_spec_examples():
    note = FAMILIES["note"]
    bob = [TaskUpdate(5, "The name is Bob.", "correction")]
    inst = note._build({"name": "Anna", "topic": "rain"}, [["name", "Bob"]], bob)
    assert inst.original_response == "Dear Anna, this is about rain. More on rain soon, Anna. Bye."
    assert inst.response == "Dear Anna, this is about rain. More on rain soon, Bob. Bye."
    assert inst.invalidated == ["Anna"]
    add = FAMILIES["add"]._build({"k": 3, "xs": [4, 10, 7, 1]}, [5], [TaskUpdate(2, "Add 5 instead.", "correction")])
    assert add.instruction == "Add 3 to each: 4 10 7 1"
    assert (add.original_response, add.response) == ("7 13 10 4", "7 13 12 6")
    spell = FAMILIES["spell"]._build({"w": "cat"}, ["dog"], [TaskUpdate(1, "Spell dog instead.", "correction")])
    assert spell.segments() == ["c", " d o g"]
    case = FAMILIES["case"]._build({"case": "Uppercase", "words": ["the", "red", "fox", "runs"]}, [], [])
    assert (case.instruction, case.response) == ("Uppercase: the red fox runs", "THE RED FOX RUNS")


def test_scorer_flags_old_values():
    count = FAMILIES["count"]
    inst = count._build({"a": 3, "b": 9}, [6], [TaskUpdate(2, "Stop at 6.", "correction")])
    assert inst.response == "3 4 5 6" and inst.invalidated == ["7", "8", "9"]
    good = count.score(inst, "3 4 5 6")
    assert good == {"correct": True, "contradiction": False, "post": " 5 6", "oracle_post": " 5 6"}
    bad = count.score(inst, inst.original_response)
    assert not bad["correct"] and bad["contradiction"]
    assert not count.score(inst, "3 4 5 6 17")["contradiction"]  # whole tokens, not substrings
    rng = random.Random(2)
    for name in ("repeat", "add", "note", "case", "list"):
        for _ in range(20):
            inst = FAMILIES[name].sample(rng, "test")
            res = FAMILIES[name].score(inst, inst.original_response)
            assert not res["correct"] and res["contradiction"], inst


def test_list_rule_accepts_alternatives():
    fam = FAMILIES["list"]
    upd = [TaskUpdate(2, "Name animals instead.", "correction")]
    inst = fam._build({"cat": "fruits", "n": 4}, ["animals"], upd)
    pre = inst.original_response.split(", ")[:2]
    used = set(inst.response.split(", "))
    alt = [a for a in CATEGORIES["animals"] if a not in used][:2]
    assert fam.score(inst, ", ".join(pre + alt))["correct"]
    fruit = next(f for f in CATEGORIES["fruits"] if f not in pre)
    assert fam.score(inst, ", ".join([pre[1], pre[0], *alt]))["correct"]  # any distinct members, by the rule
    for wrong in ([*pre, alt[0], alt[0]], [*pre, alt[0]], [pre[0], alt[0], *alt[1:], fruit], [*pre, alt[0], fruit]):
        assert not fam.score(inst, ", ".join(wrong))["correct"], wrong
    assert fam.score(inst, ", ".join([*pre, alt[0], fruit]))["contradiction"]
    assert not fam.score(inst, " ".join(pre + alt))["correct"]  # format


def test_held_out_split_is_disjoint():
    for pool in (WORDS, NAMES, TOPICS):
        test, train = set(split_pool(pool, "test")), set(split_pool(pool, "train"))
        assert test and train and not test & train and test | train == set(pool)
    rng = random.Random(3)
    pools = {"repeat": WORDS, "spell": WORDS, "case": WORDS}
    for name, fam in FAMILIES.items():
        for _ in range(40):
            inst = fam.sample(rng, "test", n_updates=rng.randint(0, 3))
            p, values = inst.meta["params"], inst.meta["values"]
            if name in ("repeat", "spell"):
                main = [p["w"], *values]
            elif name == "case":
                main = p["words"]
            elif name == "note":
                main = [p["name"], p["topic"]] + [v for _, v in values]
            else:  # numeric / category families: the hashed combination is held out
                assert in_split(fam._split_key(p, values), "test") and not in_split(fam._split_key(p, values), "train")
                continue
            test_pool = set(split_pool(pools.get(name, NAMES + TOPICS), "test"))
            assert set(main) <= test_pool, (name, main)


def test_determinism_and_sweep():
    for fam in FAMILIES.values():
        a = fam.sample(random.Random(9), "train", canonical=False)
        assert a == fam.sample(random.Random(9), "train", canonical=False)
        swept = fam.sweep(a)
        assert [s.updates[0].word_index for s in swept if s.updates[0].shift == 0] == fam.word_indices(a)
        landed = [len(s.segments()[0]) for s in swept]  # where each lands, in characters (byte-level: tokens)
        assert landed == sorted(set(landed))  # every landing point once, in text order
        for s in swept:  # wherever it lands, the correction applies from the same word: the oracle of that word
            assert s.response == fam.with_update_at(a, s.updates[0].word_index).response
        assert a.updates[0].word_index in fam.word_indices(a) and 0 in fam.word_indices(a)
        for k in fam.word_indices(a)[:3]:  # same seed, other position: same underlying values
            b = fam.sample(random.Random(9), "train", canonical=False, word_index=k)
            assert b.meta == a.meta and b == fam.with_update_at(a, k)
    assert build_dataset("train", 60, 4)[:] == build_dataset("train", 60, 4)[:]
    assert build_dataset("train", 60, 4)[:] != build_dataset("train", 60, 5)[:]


def test_dataset_rows_roundtrip(tmp_path):
    from datasets import load_from_disk

    ds = build_dataset("test", 70, 0)
    assert ds[:7]["family"] == list(FAMILIES)
    ds.save_to_disk(tmp_path / "ds")
    back = load_from_disk(str(tmp_path / "ds"))
    assert back[:] == ds[:]
    for row in back:
        inst = instance_from_row(row)
        assert inst.segments() == row["segments"] and "".join(row["segments"]) == row["response"]
        assert FAMILIES[inst.family].score(inst, row["response"])["correct"]
    kinds = {len(k) for k in ds["update_kinds"]}
    assert kinds == {0, 1, 2, 3}
    only = build_dataset("train", 10, 0, families=["count"], mix={"one": 1.0})
    assert set(only["family"]) == {"count"} and all(len(k) == 1 for k in only["update_word_indices"])


def test_byte_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = build_byte_tokenizer()
    assert len(tok) == 258 and (tok.eos_token_id, tok.pad_token_id, tok.bos_token) == (256, 257, None)
    assert tok("3 4", add_special_tokens=False).input_ids == [51, 32, 52] == tok("3 4").input_ids
    for s in ("Count from 3 to 9.\n3 4 5", "héllo 日本", " a  b ,c"):
        ids = tok(s).input_ids
        assert len(ids) == len(s.encode()) and tok.decode(ids) == s
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == 258 and loaded.eos_token_id == 256 and loaded.pad_token_id == 257
    assert loaded("héllo 日本").input_ids == tok("héllo 日本").input_ids
    assert loaded.decode([*tok("ok").input_ids, 256], skip_special_tokens=True) == "ok"


def test_families_pickle_and_are_their_classes():
    """Multi-process `datasets.map` and DataLoader workers pickle the families."""
    import pickle

    from data.tasks import ListFamily

    assert isinstance(FAMILIES["list"], ListFamily)
    assert list(pickle.loads(pickle.dumps(FAMILIES))) == list(FAMILIES)


def test_outside_split_draws_only_values_no_generator_trains_on():
    """The "outside" split is what a new user types: words, names, topics and sentences outside every pool, never
    drawn for training (not even as random letter strings), so scoring on it measures copying, not recall."""
    from data.tasks import OUTSIDE_POOLS, OUTSIDE_SENTENCES

    pools = {w.lower() for w in WORDS + NAMES + TOPICS} | {m for ms in CATEGORIES.values() for m in ms}
    outside = {w.lower() for values in OUTSIDE_POOLS.values() for w in values}
    sentence_words = {w for sentence in OUTSIDE_SENTENCES for w in sentence.split()}
    assert not (outside | sentence_words) & pools
    train_words, train_texts = set(), set()
    for row in build_dataset("train", 1400, seed=0):
        text = (row["instruction"] + " " + row["response"]).lower()
        train_words |= set(re.findall(r"[a-z]+", text))
        train_texts.add(text)
    assert not outside & train_words
    assert not any(sentence in text for sentence in OUTSIDE_SENTENCES for text in train_texts)
    outside |= sentence_words
    rng = random.Random(0)
    for name, family in FAMILIES.items():
        inst = family.sample(rng, "outside", n_updates=1)
        words = {w.lower() for w in re.findall(r"[A-Za-z]+", inst.instruction + " " + inst.response)}
        if name in ("repeat", "spell", "note", "case"):
            assert words & outside, (name, inst.instruction)


def test_family_weights_set_the_mixture():
    rows = build_dataset("train", 700, seed=1, family_weights={"add": 6.0})
    counts = {name: sum(r["family"] == name for r in rows) for name in FAMILIES}
    assert counts["add"] > 3 * max(c for name, c in counts.items() if name != "add")
    with pytest.raises(ValueError, match="family_weights"):
        build_dataset("train", 7, seed=1, families=["list"], family_weights={"add": 2.0})


def test_landing_weights_set_where_updates_land():
    rows = build_dataset("train", 400, seed=1, mix={"one": 1.0}, landing={"in_word": 8.0})
    kinds = [landing_kind(r["update_shifts"][0]) for r in rows if r["update_word_indices"][0] > 0]
    assert kinds.count("in_word") > 3 * max(kinds.count("before_space"), kinds.count("after_space"))
    spelled = [landing_kind(r["update_shifts"][0]) for r in rows if r["family"] == "spell"]
    assert spelled and "in_word" not in spelled  # a spelling has no point inside a word: its kinds are drawn
    with pytest.raises(ValueError, match="landing"):
        build_dataset("train", 7, seed=1, landing={"mid_word": 2.0})


@pytest.mark.parametrize("name", list(FAMILIES))
def test_change_offsets_mark_where_each_correction_first_changes_the_answer(name):
    """A correction's change offset is the first character where the answer differs from the answer without it
    (the end of the answer when only its length changes); the text before it is the same either way."""
    fam, rng = FAMILIES[name], random.Random(1)
    for kw in CASES:
        for _ in range(20):
            inst = fam.sample(rng, "train", **kw)
            assert len(inst.change_offsets) == len(inst.updates)
            if kw.get("distractor"):
                assert inst.change_offsets == [-1] * len(inst.updates)
            if not inst.updates or kw.get("distractor"):
                continue
            offset = inst.change_offsets[0]
            if len(inst.updates) > 1 and offset == -1:  # the next correction landed before this one showed
                continue
            before, after = inst.original_response, inst.response
            assert after[:offset] == before[:offset] and 0 <= offset <= len(after)
            assert offset == len(after) or offset == len(before) or after[offset] != before[offset]
            assert offset >= len(" ".join(after.split(" ")[: inst.updates[0].word_index]))  # not before it lands


def test_change_offsets_of_the_spec_examples():
    count = FAMILIES["count"]._build({"a": 3, "b": 9}, [6], [TaskUpdate(2, "Stop at 6.", "correction")])
    assert count.response == "3 4 5 6" and count.change_offsets == [7]  # the end: EOS where " 7" would follow
    repeat = FAMILIES["repeat"]._build(
        {"w": "apple", "n": 4}, ["pear"], [TaskUpdate(2, "Say pear instead.", "correction")]
    )
    assert repeat.response == "apple apple pear pear" and repeat.response[repeat.change_offsets[0] :] == "pear pear"


def test_held_out_backchannels_never_reach_training():
    """The evaluation's held-out backchannels are drawn only for held-out rows: no training row carries one, and
    asking for them in the training split is refused."""
    from data import EXTRA_DISTRACTORS, HELD_OUT_DISTRACTORS

    assert not set(HELD_OUT_DISTRACTORS) & set(DISTRACTORS + EXTRA_DISTRACTORS)
    train = build_dataset("train", 300, seed=0, mix={"distractor": 1.0}, canonical_prob=0.0)
    assert not {t for row in train for t in row["update_texts"]} & set(HELD_OUT_DISTRACTORS)
    held_out = build_dataset("test", 28, seed=0, mix={"held_out_distractor": 1.0})
    assert {t for row in held_out for t in row["update_texts"]} <= set(HELD_OUT_DISTRACTORS)
    assert all(kind == "distractor" for row in held_out for kind in row["update_kinds"])
    with pytest.raises(ValueError, match="held-out backchannels"):
        build_dataset("train", 7, seed=0, mix={"held_out_distractor": 1.0})


@pytest.mark.parametrize("landing", ["after_space", "in_word"])
def test_a_correction_after_the_space_or_inside_a_word_applies_from_the_next_word(landing):
    """SPEC section 4: the word in progress is finished as it would have been, then the update applies; so the
    oracle is the one for landing before the space that ends that word."""
    for fam in FAMILIES.values():
        if landing not in fam.landings:
            assert fam.name == "spell"  # single letters: nothing lands inside a word
            continue
        inst = fam.sample(random.Random(5), "test", landing=landing)
        update = inst.updates[0]
        assert landing_kind(update.shift) == landing and update.word_index >= 1
        before_space = fam.with_update_at(inst, update.word_index)
        assert inst.response == before_space.response
        head, tail = inst.segments()
        boundary = len(before_space.segments()[0])
        assert head == inst.original_response[: len(head)]  # what was written before it landed
        if landing == "after_space":
            assert len(head) == boundary + 1 and head.endswith(" ") and not tail.startswith(" ")
        else:
            assert len(head) < boundary and not head.endswith(" ") and not tail.startswith(" ")
            assert " " not in inst.response[len(head) : boundary]  # inside the word that ends at the boundary
    with pytest.raises(ValueError, match="landing"):
        FAMILIES["count"].sample(random.Random(0), "test", landing="mid_word")


def test_training_rows_land_at_every_kind_of_point():
    rows = build_dataset("train", 300, 0, mix={"one": 0.5, "two": 0.5}, landing="any")
    kinds = {landing_kind(shift) for row in rows for shift in row["update_shifts"]}
    assert kinds == set(LANDINGS)
    for row in rows:  # landings in text order, and the segments cut where they land
        instance = instance_from_row(row)
        assert "".join(row["segments"]) == row["response"] and row["segments"] == instance.segments()


def test_items_rule_accepts_any_list_format_and_member():
    """A chat model's list is right in any format (numbered lines, bullets, commas), with any members of the asked
    category after the correction landed, up to the count asked; a member of the replaced category is not."""
    fam = CHAT_FAMILIES["items"]
    inst = fam._build({"cat": "fruits", "n": 4}, ["animals"], [TaskUpdate(2, "Name animals instead.", "correction")])
    numbered = "1. Bananas\n2. Apples\n3. Lions\n4. Polar bears"
    landed = [len("1. Bananas\n2. Apples\n")]
    assert fam.score(inst, numbered, landed)["correct"]
    assert fam.score(inst, "- Bananas\n- Apples\n- **Tigers** (big cats)\n- Wolves", landed)["correct"]
    assert fam.score(inst, "bananas, apples, dog and cats, cows, horses", [len("bananas, apples, ")])["correct"]
    wrong = fam.score(inst, "1. Bananas\n2. Apples\n3. Lions\n4. Cherries", landed)
    assert not wrong["correct"] and wrong["contradiction"]
    inside_a_word = [len("1. Bananas\n2. App")]  # `les` finishes the word in progress; the correction applies after
    assert fam.score(inst, "1. Bananas\n2. Apples\n3. Lions", inside_a_word)["correct"]
    assert not fam.score(inst, "1. Bananas\n2. Apples\n", landed)["correct"]  # nothing after the correction
    assert not fam.score(inst, "1. Bananas\n2. Apples\n3. Spectrum: a device", landed)["correct"]
    restart = fam.with_update_at(inst, 0)
    assert fam.score(restart, "1. Dogs\n2. Cats\n3. Geese\n4. Foxes", [0])["correct"]
    plain = fam._build({"cat": "colors", "n": 3}, [], [])
    assert fam.score(plain, "1. Red\n2. Blue\n3. Green")["correct"]
    assert not fam.score(plain, "Red is a color.\nBlue jays sing.")["correct"]


def test_letter_rule_needs_the_new_value_and_not_the_old():
    fam = CHAT_FAMILIES["letter"]
    params = {"name": "Anna", "topic": "flowers"}
    inst = fam._build(params, [["name", "Iris"]], [TaskUpdate(2, "The name is Iris.", "correction")])
    assert inst.instruction == "Write a short note to Anna about flowers."
    assert inst.response == "Dear Anna, Dear Iris, this is about flowers. More on flowers soon, Iris. Bye."
    landed = [len("Dear Anna,")]
    assert fam.score(inst, "Dear Anna, dear Iris, I hope you like the flower.", landed)["correct"]
    wrong = fam.score(inst, "Dear Anna, Iris told me, Anna, that ...", landed)
    assert not wrong["correct"] and wrong["contradiction"]
    assert not fam.score(inst, "Dear Anna, I hope this finds you well.", landed)["correct"]
    assert not fam.score(inst, "Dear Anna,The name is Iris.", landed)["correct"]  # the correction echoed back
    assert not fam.score(inst, "Dear Anna, I'mThe name is Iris.", [len("Dear Anna, I'm")])["correct"]  # in a word too
    plain = fam._build(params, [], [])
    assert fam.score(plain, "Dear Anna, the flowers bloom.")["correct"]
    assert not fam.score(plain, "Dear Anna, I hope this finds you well.")["correct"]


def test_letter_rule_takes_each_value_as_right_until_the_correction_that_replaces_it():
    """Two corrections: what was written between them follows the first (`Dear Iris` before `The name is Ben.`
    landed is right); a value named after the correction that replaced it landed is a contradiction. The oracle is
    right by the rule for any number of corrections."""
    fam = CHAT_FAMILIES["letter"]
    updates = [TaskUpdate(2, "The name is Iris.", "correction"), TaskUpdate(6, "The topic is snow.", "correction")]
    inst = fam._build({"name": "Anna", "topic": "flowers"}, [["name", "Iris"], ["topic", "snow"]], updates)
    text = "Dear Anna, dear Iris, about flowers: snow fell today, Iris."
    landed = [len("Dear Anna,"), len("Dear Anna, dear Iris, about flowers:")]
    assert fam.score(inst, text, landed)["correct"]
    late = fam.score(inst, "Dear Anna, dear Iris, about flowers: snow and flowers, Iris.", landed)
    assert not late["correct"] and late["contradiction"]  # the old topic after the correction that replaced it
    assert not fam.score(inst, "Dear Anna, dear Iris, about flowers: snow fell today, Anna.", landed)["correct"]
    assert fam.score(inst, "Dear Anna, dear Iris, about flowers: it snows.", landed)["correct"]  # Iris named already
    assert not fam.score(inst, "Dear Anna, I write about flowers: it snows, dear.", landed)["correct"]  # never Iris
    template_words = {word.strip(",.").lower() for word in fam.template}
    for split in ("train", "test", "outside"):
        for row in build_dataset(split, 40, 0, families=["letter"], mix={"two": 1.0, "three": 1.0}):
            inst = instance_from_row(row)
            cuts = [sum(map(len, row["segments"][: j + 1])) for j in range(len(inst.updates))]
            collides = inst.meta["params"]["topic"] in template_words  # a random training topic `on`: `More on`
            assert collides or fam.score(inst, inst.response, cuts)["correct"], row


def test_chat_families_split_their_categories_and_build_datasets():
    rows = build_dataset("outside", 40, 0, families=["items", "letter"], mix={"one": 1.0})
    outside = {json.loads(r["meta"])["params"]["cat"] for r in rows if r["family"] == "items"}
    assert outside and outside <= set(OUTSIDE_CATEGORIES)
    train = build_dataset("train", 40, 0, families=["items"], mix={"one": 1.0, "two": 1.0})
    assert {json.loads(r["meta"])["params"]["cat"] for r in train} <= set(ITEM_CATEGORIES)
    for row in train:  # the oracle itself is right by the rule, at its own landing points
        inst = instance_from_row(row)
        cuts = [sum(map(len, row["segments"][: j + 1])) for j in range(len(inst.updates))]
        assert CHAT_FAMILIES["items"].score(inst, inst.response, cuts)["correct"], row


def test_case_training_inputs_look_like_sentences_without_held_out_words():
    """Training case inputs include sentence-shaped random strings (one-letter words, words that come back), and no
    word a held-out split shows: the model learns to keep its place, not to recall the test sentences."""
    from data.tasks import OUTSIDE_POOLS, OUTSIDE_SENTENCES, POOLS

    rng = random.Random(0)
    inputs = [
        FAMILIES["case"].sample(rng, "train", n_updates=1, landing="any").meta["params"]["words"] for _ in range(400)
    ]
    assert any(len(w) == 1 for words in inputs for w in words)
    assert any(len(set(words)) < len(words) for words in inputs)
    held_out = {w.lower() for pool in POOLS.values() for w in split_pool(pool, "test")}
    held_out |= {w.lower() for pool in OUTSIDE_POOLS.values() for w in pool} | set(" ".join(OUTSIDE_SENTENCES).split())
    assert not held_out & {w.lower() for words in inputs for w in words}


def test_stop_rule_counts_the_members_the_last_correction_asked_for():
    """`Stop after three.` is right when the whole answer names exactly three members, in any list format; a lead-in
    or closing line is not an item; going on past the count is wrong (and a contradiction)."""
    fam = CHAT_FAMILIES["stop"]
    inst = fam._build({"cat": "animals", "n": 6}, [3], [TaskUpdate(1, "Stop after three.", "correction")])
    assert inst.response == "dog, cat, horse" and fam.instruction_after(inst, 1) == "Name 3 animals."
    landed = [len("1. Dogs\n")]
    assert fam.score(inst, "1. Dogs\n2. Cats\n3. Horses", landed)["correct"]
    assert fam.score(inst, "Here are some animals:\n- Dogs\n- Lions\n- Wolves\nThese are animals.", landed)["correct"]
    too_many = fam.score(inst, "1. Dogs\n2. Cats\n3. Horses\n4. Cows", landed)
    assert not too_many["correct"] and too_many["contradiction"]
    assert not fam.score(inst, "1. Dogs\n2. Cats", landed)["correct"]
    plain = fam._build({"cat": "colors", "n": 4}, [], [])
    assert fam.score(plain, "red, blue, green and yellow")["correct"]
    with pytest.raises(ValueError):  # a stop behind what is already written cannot apply
        fam._build({"cat": "animals", "n": 6}, [2], [TaskUpdate(3, "Stop after two.", "correction")])


def test_include_rule_needs_the_word_after_the_correction_not_echoed():
    fam = CHAT_FAMILIES["include"]
    inst = fam._build({"topic": "rain"}, ["lantern"], [TaskUpdate(3, "Use the word lantern.", "correction")])
    assert fam.instruction_after(inst, 1) == "Write one sentence about rain. Use the word lantern."
    landed = [len("I love the")]
    assert fam.score(inst, "I love the sound of rain by my Lantern at night.", landed)["correct"]
    assert fam.score(inst, "I love the lanterns in the rain.", landed)["correct"]
    assert fam.score(inst, "I love the lantern's glow in the rain.", landed)["correct"]  # a possessive uses it
    assert fam.score(inst, "I love the lantern-lit rain.", landed)["correct"]  # so does a compound
    assert not fam.score(inst, "I love the lanterning rain.", landed)["correct"]  # another word
    assert not fam.score(inst, "I love the sound of rain.", landed)["correct"]
    assert not fam.score(inst, "I love theUse the word lantern.", landed)["correct"]  # the correction echoed back
    assert not fam.score(inst, "A lantern: I love the sound of rain.", landed)["correct"]  # only before the landing
    plain = fam._build({"topic": "rain"}, [], [])
    assert fam.score(plain, "Rain makes the garden green.")["correct"]


def test_new_chat_families_hold_out_phrasings_and_values():
    """The held-out splits phrase corrections only in ways training never does, and their values are not in the
    training rows; the oracle is right by the rule at its own landing points."""
    for name in ("stop", "include", "topic"):
        fam = CHAT_FAMILIES[name]
        train = build_dataset("train", 200, 0, families=[name], mix={"one": 1.0, "two": 1.0})
        test = build_dataset("test", 60, 0, families=[name], mix={"one": 1.0, "two": 1.0})
        outside = build_dataset("outside", 60, 0, families=[name], mix={"one": 1.0})
        train_texts = {t for r in train for t in r["update_texts"]}
        assert not train_texts & {t for r in [*test, *outside] for t in r["update_texts"]}
        held_out_starts = {p.split("{")[0] for p in fam.held_out_phrasings}
        held_out_texts = {t for r in [*test, *outside] for t in r["update_texts"]}
        assert all(any(t.startswith(s) for s in held_out_starts) for t in held_out_texts)
        assert not any(t.startswith(s) for t in train_texts for s in held_out_starts)
        for row in [*train, *test, *outside]:
            inst = instance_from_row(row)
            cuts = [sum(map(len, row["segments"][: j + 1])) for j in range(len(inst.updates))]
            assert fam.score(inst, inst.response, cuts)["correct"], row
    cats = {json.loads(r["meta"])["params"]["cat"] for r in build_dataset("outside", 20, 0, families=["stop"])}
    assert cats <= set(OUTSIDE_CATEGORIES)


def test_topic_rule_needs_the_new_topic_and_not_the_old():
    fam = CHAT_FAMILIES["topic"]
    inst = fam._build({"topic": "rain"}, ["cats"], [TaskUpdate(2, "Make it about cats instead.", "correction")])
    assert fam.instruction_after(inst, 1) == "Write one sentence about cats."
    landed = [len("I love")]
    assert fam.score(inst, "I love my cat, she sleeps all day.", landed)["correct"]
    wrong = fam.score(inst, "I love cats in the rain.", landed)
    assert not wrong["correct"] and wrong["contradiction"]
    assert not fam.score(inst, "I loveMake it about cats instead.", landed)["correct"]  # the correction echoed back
    assert fam.score(fam._build({"topic": "rain"}, [], []), "Rain is wet.")["correct"]
