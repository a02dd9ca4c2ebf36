"""The batched engine (`engine_duplex.py`): sessions that join, take corrections and leave mid-flight write exactly what
offline `generate` writes for each of them alone, with the same updates at the same tokens."""

import threading

import pytest
import torch
from conftest import perturb_duplex, tiny_backbone
from serving import load_shipped

from data import build_byte_tokenizer
from engine_duplex import DuplexEngine, SessionFinished
from modeling_duplex import DuplexForCausalLM


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


@pytest.mark.parametrize("which", ["shipped", "in_context", "fifo", "gated"])
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
