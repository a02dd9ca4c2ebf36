"""The streaming server's raw endpoint (`POST /v1/generate`), end to end: a real uvicorn on 127.0.0.1 serving the
shipped checkpoint, driven by a real HTTP client (httpx) that streams a generation and posts corrections to it
mid-stream. Sessions that must stay alive while a test acts on them run on a paced engine (one step every
`PACE_S`), so that no test races the model's speed."""

import importlib.util
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving import assert_refused, events, load_shipped, serve

from serve_duplex import Limits, create_app

pytestmark = pytest.mark.timeout(300)

LOAD_TEST = Path(__file__).resolve().parents[1] / "bench" / "load_serve.py"

PROMPT = "Name 5 tools.\n"
CORRECTION = "Name animals instead."
CORRECT_AFTER = 2  # post once "ham" has streamed: the correction lands inside a word, as a user sends it
LIMITS = Limits(max_new_tokens=300, max_update_chars=50, max_sessions=8, max_body_bytes=64 * 1024)
PACE_S = 0.02  # a paced session of 300 tokens lives at least 6 s


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


@pytest.fixture(scope="module")
def server(shipped) -> Iterator[tuple[str, object]]:
    """The shipped checkpoint served as `python serve_duplex.py` serves it; yields (base url, app)."""
    app = create_app(*shipped, model_name="duplex-tiny", limits=LIMITS)
    for base in serve(app):
        yield base, app


@pytest.fixture(scope="module")
def long_server(shipped) -> Iterator[tuple[str, object]]:
    """The same, made to write all of `max_new_tokens` (the tiny model's answers are short), one token every PACE_S:
    for stopping mid-way."""
    app = create_app(
        *shipped,
        limits=LIMITS,
        session_options={"min_new_tokens": LIMITS.max_new_tokens},
        engine_options={"pace_s": PACE_S},
    )
    for base in serve(app):
        yield base, app


def long_generation(client: httpx.Client):
    return client.stream("POST", "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": LIMITS.max_new_tokens})


def run_session(base: str, prompt: str, correct_after: int | None = None, text: str = CORRECTION, **body) -> dict:
    """Stream one generation; once token `correct_after` has arrived, post `text` to the session from a second client.
    Returns every event in order and the time the correction was posted."""
    seen: list[dict] = []
    with httpx.Client(base_url=base, timeout=60) as client, httpx.Client(base_url=base, timeout=60) as other:
        with client.stream("POST", "/v1/generate", json={"prompt": prompt, **body}) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            for event in events(response):
                seen.append(event)
                if correct_after is not None and event.get("index") == correct_after:
                    reply = other.post(f"/v1/sessions/{seen[0]['session']}/updates", json={"text": text})
                    assert reply.status_code == 202 and reply.json() == {"queued": True}
    return {"events": seen, "session": seen[0]["session"], "done": seen[-1]}


@pytest.mark.slow
def test_health(server):
    base, _ = server
    reply = httpx.get(f"{base}/health")
    assert reply.status_code == 200
    assert reply.json()["status"] == "ok" and reply.json()["model"] == "duplex-tiny"


@pytest.mark.slow
def test_correction_lands_mid_stream_and_changes_the_continuation(server, shipped):
    """A correction posted after token CORRECT_AFTER lands later in the same stream: the landing event comes right
    before the token number `at`, matches `generate`'s own record, and the text from there on is what `generate`
    writes with that update scheduled at `at`, and not what it writes without it."""
    base, _ = server
    model, tokenizer = shipped
    plain = run_session(base, PROMPT, max_new_tokens=48)["done"]
    session = run_session(base, PROMPT, correct_after=CORRECT_AFTER, max_new_tokens=48)
    stream, done = session["events"], session["done"]
    assert done["done"] is True and plain["landings"] == []

    landed = [e["landed"] for e in stream if "landed" in e]
    assert len(landed) == 1 and landed[0]["text"] == CORRECTION and landed[0]["applied"] is True
    assert landed[0]["kind"] == "correction"  # the model's decision
    at = landed[0]["at"]
    assert at > CORRECT_AFTER, "the correction was posted after that token arrived: it cannot condition it"
    position = next(i for i, e in enumerate(stream) if "landed" in e)
    assert stream[position - 1]["index"] == at - 1 and stream[position + 1]["index"] == at
    assert landed[0]["latency_ms"] > 0
    assert done["landings"] == landed

    tokens = [e for e in stream if "token" in e]
    assert [e["index"] for e in tokens] == list(range(len(tokens))) and len(tokens) == done["tokens"]
    assert "".join(e["token"] for e in tokens) == done["text"]

    enc = tokenizer(PROMPT, return_tensors="pt")
    offline = model.generate(**enc, max_new_tokens=48, do_sample=False, updates=[(at, CORRECTION)], tokenizer=tokenizer)
    assert done["text"] == tokenizer.decode(offline[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert done["text"][:at] == plain["text"][:at]  # byte-level tokenizer, ASCII text: token i is character i
    assert done["text"][at:] != plain["text"][at:], (done["text"], plain["text"])


@pytest.mark.slow
def test_concurrent_sessions_are_isolated(server):
    """Three sessions at once; only the middle one is corrected. The others see no landing and write exactly the
    uncorrected answer."""
    base, _ = server
    results: dict[int, dict] = {}

    def one(i: int) -> None:
        results[i] = run_session(base, PROMPT, correct_after=CORRECT_AFTER if i == 1 else None, max_new_tokens=48)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len({r["session"] for r in results.values()}) == 3
    assert [len(results[i]["done"]["landings"]) for i in range(3)] == [0, 1, 0]
    assert not any("landed" in e for i in (0, 2) for e in results[i]["events"])
    assert results[0]["done"]["text"] == results[2]["done"]["text"] != results[1]["done"]["text"]


@pytest.mark.slow
def test_every_update_mode_reports_its_landing(server):
    base, _ = server
    for mode, applied in (("ignore", False), ("inband", True)):
        done = run_session(base, PROMPT, correct_after=1, max_new_tokens=24, update_mode=mode)["done"]
        assert [(d["text"], d["applied"]) for d in done["landings"]] == [(CORRECTION, applied)], mode


@pytest.mark.slow
def test_a_client_that_disconnects_frees_its_session(long_server):
    """Close the stream after the first token of a long (paced) answer: the session is gone and its generation
    stopped, as cancelled, long before `max_new_tokens`."""
    base, app = long_server
    with httpx.Client(base_url=base, timeout=60) as client:
        with long_generation(client) as r:
            stream = events(r)
            session_id = next(stream)["session"]
            generation = app.state.sessions.get(session_id)
            assert next(stream)["index"] == 0
    assert generation.wait(30), "the session did not end"
    assert generation.stopped == "cancelled" and generation.tokens < LIMITS.max_new_tokens // 2
    deadline = time.monotonic() + 10
    while httpx.get(f"{base}/health").json()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.state.engine.live_sessions == 0  # its row left the batch
    assert app.state.sessions.get(session_id) is None
    reply = httpx.post(f"{base}/v1/sessions/{session_id}/updates", json={"text": CORRECTION})
    assert reply.status_code == 404


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{not json", 400, "JSON"),
        (b"[1, 2]", 400, "object"),
        (json.dumps({"max_new_tokens": 8}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "  "}).encode(), 400, "prompt"),
        (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "\ud800 lone"}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "x" * 500}).encode(), 400, "prompt"),  # 500 tokens + 64 new: over 512 positions
        (json.dumps({"prompt": PROMPT, "max_new_tokens": 301}).encode(), 400, "max_new_tokens"),
        (json.dumps({"prompt": PROMPT, "max_new_tokens": 0}).encode(), 400, "max_new_tokens"),
        (json.dumps({"prompt": PROMPT, "max_new_tokens": "8"}).encode(), 400, "max_new_tokens"),
        (json.dumps({"prompt": PROMPT, "update_mode": "shout"}).encode(), 400, "update_mode"),
        (json.dumps({"prompt": PROMPT, "do_sample": "yes"}).encode(), 400, "do_sample"),
        (json.dumps({"prompt": PROMPT, "temperature": 0.5}).encode(), 400, "temperature"),
        (json.dumps({"prompt": "x" * 100_000}).encode(), 413, "body"),
    ],
)
def test_bad_generate_requests_get_a_4xx_naming_the_field(server, body, status, field):
    base, app = server
    reply = httpx.post(f"{base}/v1/generate", content=body, headers={"content-type": "application/json"})
    assert_refused(reply, status, field)
    assert len(app.state.sessions) == 0


@pytest.mark.slow
def test_bad_updates_get_a_4xx_naming_the_field(server, long_server):
    """Unknown session, finished session, bad JSON, missing, empty and oversized text."""
    base, _ = server
    assert_refused(httpx.post(f"{base}/v1/sessions/nope/updates", json={"text": CORRECTION}), 404, "session")
    finished = run_session(base, PROMPT, max_new_tokens=4)["session"]
    assert_refused(httpx.post(f"{base}/v1/sessions/{finished}/updates", json={"text": CORRECTION}), 404, "session")
    lone_surrogate = {"content": b'{"text": "\\ud800"}', "headers": {"content-type": "application/json"}}
    assert_refused(httpx.post(f"{base}/v1/sessions/{finished}/updates", **lone_surrogate), 400, "text")

    with httpx.Client(base_url=long_server[0], timeout=60) as client:
        with long_generation(client) as r:
            stream = events(r)  # kept: closing it would close the response
            session_id = next(stream)["session"]
            url = f"/v1/sessions/{session_id}/updates"
            assert client.post(url, json={"text": CORRECTION}).status_code == 202  # a live session
            json_type = {"content-type": "application/json"}
            assert_refused(client.post(url, content=b"{oops", headers=json_type), 400, "JSON")
            assert_refused(client.post(url, json={}), 400, "text")
            assert_refused(client.post(url, json={"text": " "}), 400, "text")
            assert_refused(client.post(url, json={"text": ["a"]}), 400, "text")
            assert_refused(client.post(url, json={"text": "x" * 51}), 400, "text")
            assert_refused(client.post(url, **lone_surrogate), 400, "text")
            assert_refused(client.post(url, json={"text": CORRECTION, "row": 1}), 400, "row")


@pytest.mark.slow
def test_unknown_route_is_a_json_404(server):
    base, _ = server
    assert_refused(httpx.get(f"{base}/v1/nothing"), 404, "Not Found")


@pytest.mark.slow
def test_load_test_reports_every_figure_and_loses_nothing(server, capsys):
    """bench/load_serve.py, briefly, against the running server: every figure printed, nothing lost or leaked."""
    spec = importlib.util.spec_from_file_location("load_serve", LOAD_TEST)
    load_serve = importlib.util.module_from_spec(spec)
    sys.modules["load_serve"] = load_serve  # its dataclasses look their module up there
    spec.loader.exec_module(load_serve)
    outcome = load_serve.main(["--url", server[0], "--sessions", "1", "3", "--duration", "2", "--max-new-tokens", "48"])
    results = outcome["loads"][3]
    assert outcome["ok"], results["counts"]
    counts = results["counts"]
    assert counts["sent"] == 2 * counts["sessions"] == counts["landed"] + counts["late"] and counts["lost"] == 0
    assert results["ttft_s"] and results["latency_s"] and results["tok_s"] and results["total_tok_s"] > 0
    printed = capsys.readouterr().out
    for figure in ("time to first token", "correction latency", "tokens/s per session", "0 lost", "| 3 |"):
        assert figure in printed


@pytest.mark.slow
def test_sessions_over_the_limit_are_refused_not_queued(shipped):
    app = create_app(
        *shipped,
        limits=Limits(max_sessions=1),
        session_options={"min_new_tokens": 200},
        engine_options={"pace_s": PACE_S},
    )
    for base in serve(app):
        with httpx.Client(base_url=base, timeout=60) as client:
            body = {"prompt": PROMPT, "max_new_tokens": 200}
            with client.stream("POST", "/v1/generate", json=body) as response:
                stream = events(response)  # kept: closing it would close the response
                assert "session" in next(stream)
                assert_refused(client.post("/v1/generate", json=body), 429, "sessions")
