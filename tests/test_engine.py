"""The batched engine (`engine_duplex.py`): sessions that join, take corrections and leave mid-flight write exactly what
offline `generate` writes for each of them alone, with the same updates at the same tokens; bad input, too much work
and failures stay with the session that caused them."""

import threading
import time

import pytest
import torch
from conftest import perturb_duplex, tiny_backbone
from serving import load_shipped

from data import build_byte_tokenizer
from engine_duplex import (
    GENERATION_FAILED,
    ContextLengthError,
    DuplexEngine,
    SamplingOptions,
    SessionFinished,
    TooManyCorrections,
)
from modeling_duplex import DuplexForCausalLM

pytestmark = pytest.mark.timeout(600)


def random_duplex(workspace_update: str):
    model = DuplexForCausalLM.from_backbone(
        tiny_backbone("qwen3"), num_slots=4, encoder_layers=2, adapter_layers=[0, 2], workspace_update=workspace_update
    )
    return perturb_duplex(model).eval(), build_byte_tokenizer()


# Each plan: prompt, update mode, max_new_tokens, [(after token index, correction)], when to join (None: at once;
# (i, k): once session i has written token k). One of them is cancelled mid-way.
PLANS = [
    ("Count from 3 to 19.\n", "workspace", 30, [(4, "Stop at 12.")], None),
    ("Say apple 5 times.\n", "inband", 34, [(6, "Say pear instead.")], (0, 2)),
    ("Name 5 tools.\n", "workspace", 40, [(2, "Name animals instead."), (9, "Name colors instead.")], (0, 5)),
    ("Write to Anna about rain.\n", "ignore", 20, [(3, "The name is Tom.")], (0, 1)),
    ("Spell cat.\n", "workspace", 12, [(1, "ok")], (2, 3)),
    ("Uppercase: the red fox runs\n", "workspace", 26, [], (1, 8)),
    ("Add 3 to each: 4 10 7 1\n", "inband", 30, [(0, "Add 5 instead.")], (3, 4)),
]
CANCELLED, CANCEL_AFTER = 5, 6  # session 5 is cancelled once it has written token 6


def run_plans(model, tokenizer, plans=PLANS) -> tuple[dict, dict]:
    """Run every plan through one engine; corrections and joins are triggered from the event stream itself, so each
    lands at a known token. Returns the sessions and their events."""
    engine = DuplexEngine(model, tokenizer, max_batch_size=8).start()
    sessions, events = {}, {i: [] for i in range(len(plans))}
    all_submitted = threading.Event()

    def submit(j: int) -> None:
        prompt, mode, max_new, _, _ = plans[j]
        sessions[j] = engine.submit(prompt, emit=emitter(j), max_new_tokens=max_new, update_mode=mode)
        if len(sessions) == len(plans):
            all_submitted.set()

    def emitter(i: int):
        def emit(event: dict) -> None:  # on the engine's thread, between steps
            events[i].append(event)
            if "token" not in event:
                return
            for k, text in plans[i][3]:
                if event["index"] == k:
                    sessions[i].correct(text)
            if i == CANCELLED and event["index"] == CANCEL_AFTER:
                sessions[i].cancel()
            for j, plan in enumerate(plans):
                if plan[4] == (i, event["index"]):
                    submit(j)

        return emit

    for j, plan in enumerate(plans):
        if plan[4] is None:
            submit(j)
    try:
        assert all_submitted.wait(120), "a session that should have joined never did"
        for session in sessions.values():
            assert session.wait(120), "a session did not end"
    finally:
        engine.close()
    return sessions, events


def offline(model, tokenizer, prompt: str, mode: str, max_new_tokens: int, updates: list) -> tuple[str, list]:
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        updates=updates or None,
        update_mode=mode,
        tokenizer=tokenizer,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = tokenizer.decode(out.sequences[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return text, [(landing.at, landing.kind) for landing in out.update_landings[0]]


@pytest.mark.parametrize("which", ["shipped", "in_context"])
def test_batched_sessions_write_what_each_writes_alone(which):
    """Sessions join at different times, take corrections mid-flight (in every update mode, one of them inside a word
    of the shipped model's answer), end early or are cancelled; each one's text and landings equal offline `generate`
    of it alone with the updates at the tokens where they landed."""
    model, tokenizer = load_shipped() if which == "shipped" else random_duplex(which)
    torch.manual_seed(0)
    _, events = run_plans(model, tokenizer)
    for i, (prompt, mode, max_new, corrections, _) in enumerate(PLANS):
        done = events[i][-1]
        assert done.get("done") is True, events[i][-1]
        tokens = [e for e in events[i] if "token" in e]
        assert [e["index"] for e in tokens] == list(range(done["tokens"]))
        if "\ufffd" not in done["text"]:  # (a random model writes invalid UTF-8 too: its last piece is held back)
            assert "".join(e["token"] for e in tokens) == done["text"]
        landed = [(x["at"], x["kind"]) for x in done["landings"]]
        assert [e["landed"] for e in events[i] if "landed" in e] == done["landings"]
        text, expected = offline(
            model, tokenizer, prompt, mode, max_new, [(x["at"], x["text"]) for x in done["landings"]]
        )
        if i == CANCELLED:
            assert done["stopped"] == "cancelled" and done["tokens"] < max_new
            assert text.startswith(done["text"])
            continue
        assert done["text"] == text, (i, prompt)
        assert landed == expected
        if i != CANCELLED and corrections:  # every correction landed, right after the token it was posted at
            assert [x["at"] for x in done["landings"]] == [k + 1 for k, _ in corrections]


def test_a_plain_causal_lm_streams_but_takes_no_corrections():
    tokenizer = build_byte_tokenizer()
    backbone = tiny_backbone("qwen3")
    engine = DuplexEngine(backbone, tokenizer).start()
    try:
        events = []
        session = engine.submit("Count from 3 to 9.\n", emit=events.append, max_new_tokens=8)
        with pytest.raises(TypeError, match="takes no corrections"):
            session.correct("Stop at 5.")
        assert session.wait(60)
    finally:
        engine.close()
    enc = tokenizer("Count from 3 to 9.\n", return_tensors="pt")
    out = backbone.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert events[-1]["done"] and events[-1]["text"] == expected


def test_a_correction_after_the_end_is_refused_and_bad_arguments_are_named():
    model, tokenizer = random_duplex("in_context")
    engine = DuplexEngine(model, tokenizer).start()
    try:
        session = engine.submit("Spell cat.\n", emit=lambda event: None, max_new_tokens=3)
        assert session.wait(60)
        with pytest.raises(SessionFinished):
            session.correct("Spell dog instead.")
        with pytest.raises(ValueError, match="update_mode"):
            engine.submit("Spell cat.\n", emit=print, update_mode="sideways")
        with pytest.raises(ValueError, match="max_new_tokens"):
            engine.submit("Spell cat.\n", emit=print, max_new_tokens=0)
    finally:
        engine.close()


# -- behaviours of the engine on its own: limits, failures, the queue of waiting sessions ---------------------------


def collect(engine, prompt: str, **options):
    """Submit `prompt`; returns the session and the list its events go to."""
    seen: list[dict] = []
    return engine.submit(prompt, emit=seen.append, **options), seen


def test_a_correction_after_the_last_step_is_reported_with_at_none():
    """Posted after the forward pass that wrote the last token: it cannot land, and the done event says so."""
    model, tokenizer = random_duplex("in_context")
    engine = DuplexEngine(model, tokenizer).start()
    seen: list[dict] = []

    def emit(event: dict) -> None:
        seen.append(event)
        if event.get("index") == 4:  # the last of 5 tokens, before the session leaves the batch
            session.correct("Too late.")

    try:
        session = engine.submit("Spell cat.\n", emit=emit, max_new_tokens=5)
        assert session.wait(60)
    finally:
        engine.close()
    done = seen[-1]
    assert done["stopped"] == "length" and done["tokens"] == 5
    assert done["landings"] == [{"at": None, "text": "Too late.", "applied": False, "kind": None, "latency_ms": None}]


def test_seeded_sampling_repeats_per_session_whatever_else_is_in_the_batch():
    """Two sessions with the same seed write the same text while sharing the batch with a third; another seed
    writes something else; greedy writes a third thing (a random model samples widely)."""
    model, tokenizer = random_duplex("in_context")
    engine = DuplexEngine(model, tokenizer).start()
    try:
        runs = [
            collect(engine, "Spell cat.\n", max_new_tokens=16, do_sample=True, sampling=SamplingOptions(seed=seed))
            for seed in (7, 7, 8)
        ]
        greedy = collect(engine, "Spell cat.\n", max_new_tokens=16)
        for session, _ in [*runs, greedy]:
            assert session.wait(60)
    finally:
        engine.close()
    texts = [seen[-1]["text"] for _, seen in runs]
    assert texts[0] == texts[1] != texts[2]
    assert greedy[1][-1]["text"] not in texts
    assert greedy[1][-1]["text"] == offline(model, tokenizer, "Spell cat.\n", "workspace", 16, [])[0]


def test_a_prefill_that_fails_ends_only_its_session(monkeypatch):
    """The forward pass of one newcomer's prefill raises: that session ends with an error without internal detail;
    the live sessions go on and write what `generate` writes for them."""
    model, tokenizer = random_duplex("in_context")
    expected = offline(model, tokenizer, "Count from 3 to 19.\n", "workspace", 24, [])[0]
    bad = "Write to Anna about snow and rain.\n"
    forward = type(model).forward

    def fails_on_the_bad_prompt(self, input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[1] == len(bad):
            raise RuntimeError("internal detail")
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(model), "forward", fails_on_the_bad_prompt)
    engine = DuplexEngine(model, tokenizer).start()
    try:
        good, good_events = collect(engine, "Count from 3 to 19.\n", max_new_tokens=24, min_new_tokens=24)
        while good.tokens < 2:
            assert not good.finished
            time.sleep(0.01)
        failed, failed_events = collect(engine, bad, max_new_tokens=8)
        assert failed.wait(60) and good.wait(60)
    finally:
        engine.close()
    monkeypatch.setattr(type(model), "forward", forward)
    assert failed_events == [{"error": GENERATION_FAILED}]
    assert good_events[-1]["done"] is True and good_events[-1]["text"].startswith(expected[:20])


def test_a_correction_the_loop_cannot_take_ends_only_its_session(monkeypatch):
    """The generation state refuses one session's correction inside the loop: that session ends with an error, the
    other one in the same batch writes its answer."""
    model, tokenizer = random_duplex("in_context")
    state_class = DuplexEngine(model, tokenizer).state_class
    put = state_class.put

    def refuses_poison(self, row, payload, arrived=None):
        if payload == "poison":
            raise TypeError("TextEncodeInput must be ...")
        return put(self, row, payload, arrived)

    monkeypatch.setattr(state_class, "put", refuses_poison)
    expected = offline(model, tokenizer, "Count from 3 to 19.\n", "workspace", 20, [])[0]
    engine = DuplexEngine(model, tokenizer).start()
    try:
        both = [collect(engine, p, max_new_tokens=20) for p in ("Count from 3 to 19.\n", "Spell cat.\n")]
        poisoned, poisoned_events = both[1]
        poisoned.correct("poison")
        for session, _ in both:
            assert session.wait(60)
    finally:
        engine.close()
    assert poisoned_events[-1] == {"error": GENERATION_FAILED}
    assert both[0][1][-1]["text"] == expected


def test_more_sessions_than_rows_wait_and_each_writes_its_own_answer():
    model, tokenizer = random_duplex("in_context")
    prompts = ["Spell cat.\n", "Count from 3 to 19.\n", "Name 5 tools.\n", "Say apple 5 times.\n", "Spell dog.\n"]
    engine = DuplexEngine(model, tokenizer, max_batch_size=2).start()
    widest = []
    try:
        runs = [
            engine.submit(p, emit=lambda e: widest.append(engine.live_sessions), max_new_tokens=12) for p in prompts
        ]
        for session in runs:
            assert session.wait(60)
    finally:
        engine.close()
    assert max(widest) == 2
    for session, prompt in zip(runs, prompts, strict=True):
        assert session.final_text() == offline(model, tokenizer, prompt, "workspace", 12, [])[0]


def test_a_waiting_session_can_be_cancelled_and_close_ends_the_live_ones():
    model, tokenizer = random_duplex("in_context")
    engine = DuplexEngine(model, tokenizer, max_batch_size=1, pace_s=0.05).start()
    live, live_events = collect(engine, "Count from 3 to 19.\n", max_new_tokens=200, min_new_tokens=200)
    waiting, waiting_events = collect(engine, "Spell cat.\n", max_new_tokens=8)
    waiting.cancel()
    assert waiting.wait(30), "a cancelled waiting session must end without a row"
    assert waiting_events == [{"done": True, "text": "", "tokens": 0, "stopped": "cancelled", "landings": []}]
    assert not live.finished
    engine.close()
    assert live.wait(1) and live_events[-1]["stopped"] == "cancelled" and live_events[-1]["tokens"] < 200
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit("Spell cat.\n", emit=print)


def test_bad_texts_and_too_much_work_are_refused_where_they_enter():
    model, tokenizer = random_duplex("in_context")
    engine = DuplexEngine(model, tokenizer, max_corrections=3, max_pending_corrections=2, pace_s=0.05).start()
    try:
        with pytest.raises(ValueError, match=r"`prompt`.*surrogate"):
            engine.submit("Spell \ud800.\n", emit=print)
        with pytest.raises(ContextLengthError, match="512"):
            engine.submit("x" * 500, emit=print, max_new_tokens=13)
        engine.submit("x" * 500, emit=lambda e: None, max_new_tokens=12).cancel()  # 512: fits exactly
        session, _ = collect(engine, "Spell cat.\n", max_new_tokens=200, min_new_tokens=200)
        with pytest.raises(ValueError, match=r"`text`.*surrogate"):
            session.correct("Spell \udfff.")
        session.correct("one")
        session.correct("two")
        with pytest.raises(TooManyCorrections, match="waiting"):
            session.correct("three")  # two pending already
        while session.corrections:
            time.sleep(0.01)
        session.correct("three")
        with pytest.raises(TooManyCorrections, match="at most 3"):
            session.correct("four")
        session.cancel()
        assert session.wait(30)
    finally:
        engine.close()
    engine = DuplexEngine(model, tokenizer, max_correction_tokens=20, pace_s=0.05).start()
    try:
        session, _ = collect(engine, "Spell cat.\n", max_new_tokens=200, min_new_tokens=200)
        session.correct("x" * 15)
        with pytest.raises(TooManyCorrections, match="20 tokens"):
            session.correct("y" * 6)  # 21 tokens of corrections: more than the row's workspace may hold
        session.correct("y" * 5)
        session.cancel()
        assert session.wait(30)
    finally:
        engine.close()


def test_long_prompts_are_prefilled_one_step_budget_at_a_time(monkeypatch):
    """Three 300-token prompts arriving together with a budget of 512 prompt tokens per step are prefilled in three
    passes of one row each, decoding steps of the live session in between, not in one pass of 900 tokens."""
    model, tokenizer = random_duplex("in_context")
    forward = type(model).forward
    passes: list[tuple[int, int]] = []

    def recording(self, input_ids=None, **kwargs):
        passes.append(tuple(input_ids.shape))
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(model), "forward", recording)
    engine = DuplexEngine(model, tokenizer, prefill_tokens_per_step=512).start()
    try:
        live, _ = collect(engine, "Spell cat.\n", max_new_tokens=100, min_new_tokens=100)
        while live.tokens < 2:
            time.sleep(0.01)
        long = [collect(engine, f"{i}" + "y" * 299, max_new_tokens=4)[0] for i in range(3)]
        for session in [*long, live]:
            assert session.wait(60)
    finally:
        engine.close()
    prefills = [shape for shape in passes if shape[1] == 300]
    assert prefills == [(1, 300)] * 3
    first, last = passes.index((1, 300)), len(passes) - 1 - passes[::-1].index((1, 300))
    assert any(shape[1] == 1 for shape in passes[first:last]), "the live session must step between the prefills"
