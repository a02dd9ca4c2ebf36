"""generate() as users call it: update forms, live streams, ordinary options, and clear errors."""

import threading
import time

import pytest
import torch
from conftest import tiny_backbone
from transformers import StoppingCriteriaList, TextIteratorStreamer

from data import build_byte_tokenizer
from modeling_duplex import DuplexForCausalLM, DuplexUpdate, UpdateStream

TOK = build_byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    from conftest import perturb_duplex

    backbone = tiny_backbone("qwen3")
    return perturb_duplex(DuplexForCausalLM.from_backbone(backbone, num_slots=4, encoder_layers=1)).eval()


def prompt(text: str = "Count from 3 to 9.\n") -> dict:
    return TOK(text, return_tensors="pt")


def new_text(out, enc) -> torch.Tensor:
    return out[:, enc["input_ids"].shape[1] :]


def test_update_forms_are_equivalent(model):
    enc = prompt()
    kwargs = dict(max_new_tokens=8, do_sample=False, tokenizer=TOK)
    by_text = model.generate(**enc, updates=[(2, "Stop at 5.")], **kwargs)
    by_ids = model.generate(**enc, updates=[(2, TOK("Stop at 5.", add_special_tokens=False).input_ids)], **kwargs)
    by_dataclass = model.generate(**enc, updates=[DuplexUpdate(at=2, text="Stop at 5.")], **kwargs)
    assert torch.equal(by_text, by_ids) and torch.equal(by_text, by_dataclass)


def test_update_stream_from_another_thread_with_text_streamer(model):
    """A correction put while tokens stream lands before the next step; replaying it at that `at` is identical."""
    enc = prompt()
    stream, streamer = UpdateStream(), TextIteratorStreamer(TOK, skip_prompt=True)
    result = {}

    def run():
        result["out"] = model.generate(
            **enc,
            updates=stream,
            tokenizer=TOK,
            streamer=streamer,
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            return_dict_in_generate=True,
        )

    thread = threading.Thread(target=run)
    thread.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        if len(pieces) == 3:
            stream.put("Stop at 5.")
    thread.join()
    out = result["out"]
    (landing,) = out.update_landings[0]
    assert landing.applied and landing.requested_at is None and 1 <= landing.at < 12
    assert landing.arrived_time <= landing.landed_time
    replay = model.generate(
        **enc,
        updates=[(landing.at, "Stop at 5.")],
        tokenizer=TOK,
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
    )
    assert torch.equal(out.sequences, replay)
    assert "".join(pieces) == TOK.decode(new_text(out.sequences, enc)[0], skip_special_tokens=True)


def test_sampling_and_stopping_criteria_still_work(model):
    enc = prompt()
    torch.manual_seed(0)
    first = model.generate(**enc, updates=[(1, "ok")], tokenizer=TOK, do_sample=True, top_k=5, max_new_tokens=6)
    torch.manual_seed(0)
    second = model.generate(**enc, updates=[(1, "ok")], tokenizer=TOK, do_sample=True, top_k=5, max_new_tokens=6)
    assert torch.equal(first, second) and first.shape[1] == enc["input_ids"].shape[1] + 6
    stop_at = enc["input_ids"].shape[1] + 4
    stopper = StoppingCriteriaList([lambda ids, scores, **kw: torch.full((ids.shape[0],), ids.shape[1] >= stop_at)])
    stopped = model.generate(**enc, updates=[(1, "ok")], tokenizer=TOK, max_new_tokens=20, stopping_criteria=stopper)
    assert stopped.shape[1] == stop_at


def test_update_past_the_end_is_reported_not_lost(model):
    enc = prompt()
    with pytest.warns(UserWarning, match="never landed"):
        out = model.generate(
            **enc,
            updates=[(2, "Stop at 5."), (50, "Stop at 7.")],
            tokenizer=TOK,
            max_new_tokens=5,
            return_dict_in_generate=True,
        )
    late = out.update_landings[0][1]
    assert late.requested_at == 50 and late.at is None and not late.applied


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(updates=[(-1, "Stop at 5.")], tokenizer=TOK), "`at`"),
        (dict(updates=[(2, "Stop at 5.")]), "tokenizer"),
        (dict(updates=[(2, "  ")], tokenizer=TOK), "empty"),
        (dict(updates=[(2, [])]), "empty"),
        (dict(updates=[[(2, "a")], [(3, "b")]], tokenizer=TOK), "rows"),
        (dict(updates=[(2, "a")], update_mode="telepathy", tokenizer=TOK), "update_mode"),
        (dict(updates=[(2, "a")], num_beams=2, tokenizer=TOK), "num_beams"),
        (dict(updates=[(2, "a")], update_mode="inband", use_cache=False, tokenizer=TOK), "use_cache"),
    ],
)
def test_bad_input_raises_a_clear_error(model, kwargs, message):
    """Each refusal names what is wrong (the hypothesis properties in test_update_validation.py cover the rest)."""
    with pytest.raises(ValueError, match=message):
        model.generate(**prompt(), max_new_tokens=4, **kwargs)


def test_batch_of_rows_needs_one_update_list_per_row(model):
    enc = TOK(["Count from 3 to 9.\n", "Spell cat.\n"], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="one list of updates per row"):
        model.generate(**enc, updates=[(2, "Stop at 5.")], tokenizer=TOK, max_new_tokens=4)


def stream_while_generating(model, stream, on_piece, tokenizer=TOK, max_new_tokens=12):
    """Run generate with `stream` in a thread; call `on_piece(count)` in this thread as each new token streams."""
    streamer, result = TextIteratorStreamer(TOK, skip_prompt=True), {}

    def run():
        result["out"] = model.generate(
            **prompt(),
            updates=stream,
            tokenizer=tokenizer,
            streamer=streamer,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )

    thread = threading.Thread(target=run)
    thread.start()
    for count, _ in enumerate(streamer, start=1):
        on_piece(count)
    thread.join()
    return result["out"]


@pytest.mark.parametrize(
    ("bad_put", "tokenizer", "message"),
    [
        (lambda stream: stream.put(TOK("Stop at 5.").input_ids, row=5), TOK, "`row` 5 is out of range"),
        (lambda stream: stream.put("Stop at 5."), None, "needs `tokenizer=`"),
    ],
)
def test_bad_live_update_fails_in_the_putting_thread_and_landed_ones_are_reported(model, bad_put, tokenizer, message):
    """A live update that cannot land raises ValueError where it is put; generation goes on and reports the rest."""
    stream, errors = UpdateStream(), []
    good = TOK("Stop at 5.", add_special_tokens=False).input_ids

    def on_piece(count: int) -> None:
        if count == 2:
            stream.put(good)
        if count == 4:
            try:
                bad_put(stream)
            except ValueError as error:
                errors.append(str(error))

    out = stream_while_generating(model, stream, on_piece, tokenizer=tokenizer)
    assert len(errors) == 1 and message in errors[0]
    (landing,) = out.update_landings[0]
    assert landing.applied and landing.token_ids == good and out.sequences.shape[1] > prompt()["input_ids"].shape[1]


def test_bad_update_queued_before_generate_raises_before_decoding(model):
    stream = UpdateStream()
    stream.put("Stop at 5.", row=3)
    with pytest.raises(ValueError, match="`row` 3 is out of range"):
        model.generate(**prompt(), updates=stream, tokenizer=TOK, max_new_tokens=4)


def test_threads_feeding_one_stream_lose_nothing_and_apply_nothing_twice(model):
    """Four threads put five distinct corrections each while generate runs: every one is reported exactly once,
    landed or (arrived after the last poll) not; none is left behind in the stream."""
    stream, started, threads = UpdateStream(), threading.Event(), []
    sent = {(t, i): [100 + t, 110 + i] for t in range(4) for i in range(5)}

    def feed(t: int) -> None:
        started.wait()
        for i in range(5):
            stream.put(sent[(t, i)])
            time.sleep(0.001 * (t + 1))

    for t in range(4):
        threads.append(threading.Thread(target=feed, args=(t,)))
        threads[-1].start()
    out = stream_while_generating(model, stream, lambda count: started.set(), max_new_tokens=40)
    for thread in threads:
        thread.join()
    leftover = [tuple(ids) for ids, _, _ in stream.drain()]  # put after generate returned: for the next call
    reported = [tuple(landing.token_ids) for landing in out.update_landings[0]]
    assert sorted(reported + leftover) == sorted(tuple(ids) for ids in sent.values())
    assert any(landing.applied for landing in out.update_landings[0])
    landed_at = [landing.at for landing in out.update_landings[0] if landing.applied]
    assert landed_at == sorted(landed_at)


def test_on_landing_reports_each_update_before_the_token_it_conditions(model):
    """`UpdateStream(on_landing=...)` is told of each landing after the forward pass that read it and before the
    token it conditions is streamed: exactly `at` new tokens have been streamed by then."""
    streamed, seen = [], []

    class CountingStreamer:
        def put(self, value):
            streamed.append(value)

        def end(self):
            pass

    stream = UpdateStream(on_landing=lambda row, landing: seen.append((row, landing.at, len(streamed) - 1)))
    stream.put("Stop at 5.")
    out = model.generate(
        **prompt(), updates=stream, tokenizer=TOK, streamer=CountingStreamer(), max_new_tokens=6, min_new_tokens=6,
        return_dict_in_generate=True,
    )  # fmt: skip
    (landing,) = out.update_landings[0]
    assert seen == [(0, landing.at, landing.at)] and landing.landed_time is not None


@pytest.mark.parametrize(
    ("updates", "message"), [([(2, 12)], "got int 12"), ([(8, None)], "got NoneType"), ((8, "Stop"), "single update")]
)
def test_malformed_updates_are_refused_by_generate_naming_them(model, updates, message):
    with pytest.raises(TypeError, match=message):
        model.generate(**prompt(), updates=updates, tokenizer=TOK, max_new_tokens=4)


def test_a_live_update_that_is_not_text_or_token_ids_is_refused(model):
    with pytest.raises(TypeError, match="text or a list of token ids, got int 12345"):
        UpdateStream().put(12345)
