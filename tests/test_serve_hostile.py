"""The server against hostile clients: with an ordinary session streaming beside each probe, a bad text, a flood of
corrections, odd JSON, an over-long prompt, a foreign page or a missing key harms no one and gets a 4xx; the door
(Host, Origin, API key, Content-Type, remote code) holds. Each test names the defect it guards against."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import httpx
import pytest
from serving import MODEL_NAME, assert_refused, error_of, events, load_shipped, serve

from engine_duplex import GENERATION_FAILED
from serve_duplex import (
    DEFAULT_MODEL,
    Access,
    EventChannel,
    Limits,
    RemoteCodeRefused,
    access_from_args,
    create_app,
    load_model,
    parse_args,
)

pytestmark = pytest.mark.timeout(300)

PROMPT = "Name 5 tools.\n"
JSON = {"content-type": "application/json"}
PACE_S = 0.02
LIMITS = Limits(max_new_tokens=200, max_corrections=8, max_pending_corrections=4)


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


@pytest.fixture(scope="module")
def base(shipped):
    """A paced server (a token every PACE_S): the ordinary session is still streaming while the probes run."""
    app = create_app(*shipped, model_name=MODEL_NAME, limits=LIMITS, engine_options={"pace_s": PACE_S})
    yield from serve(app)


def quiet_answer(base: str, max_new_tokens: int = 48) -> str:
    with httpx.Client(base_url=base, timeout=60) as client:
        body = {"prompt": PROMPT, "max_new_tokens": max_new_tokens}
        with client.stream("POST", "/v1/generate", json=body) as response:
            return list(events(response))[-1]["text"]


class Bystander:
    """An ordinary session streaming in a thread while a probe runs; `result()` is its last event."""

    def __init__(self, base: str, max_new_tokens: int = 48):
        self.events: list[dict] = []
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(base, max_new_tokens), daemon=True)
        self.thread.start()
        assert self.started.wait(60), "the bystander did not start"

    def _run(self, base: str, max_new_tokens: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as client:
            body = {"prompt": PROMPT, "max_new_tokens": max_new_tokens}
            with client.stream("POST", "/v1/generate", json=body) as response:
                for event in events(response):
                    self.events.append(event)
                    if "index" in event:
                        self.started.set()

    def result(self) -> dict:
        self.thread.join(120)
        return self.events[-1]


def test_lone_surrogates_are_refused_where_they_enter_and_harm_no_one(base):
    """Defect: a prompt or correction holding `\\ud800` was accepted, then the tokenizer raised inside the shared
    loop and every live session ended with an error."""
    expected = quiet_answer(base)
    bystander = Bystander(base)
    with httpx.Client(base_url=base, timeout=60) as client:
        prompt = b'{"prompt": "Name 5 tools.\\ud800\\n"}'
        assert_refused(client.post("/v1/generate", content=prompt, headers=JSON), 400, "prompt")
        chat = b'{"model": "duplex-tiny", "messages": [{"role": "user", "content": "a\\udc00b"}]}'
        assert_refused(client.post("/v1/chat/completions", content=chat, headers=JSON), 400, "messages[0].content")
        session = bystander.events[0]["session"]
        text = b'{"text": "Stop\\ud83d now"}'
        assert_refused(client.post(f"/v1/sessions/{session}/updates", content=text, headers=JSON), 400, "text")
    done = bystander.result()
    assert done.get("done") is True and done["text"] == expected and done["landings"] == []


def test_a_correction_flood_is_capped_and_the_others_finish(base):
    """Defect: 300 corrections into one session all got 202 and grew the server by 2.1 GiB. Now at most
    `max_pending_corrections` wait and `max_corrections` are taken per session; the rest get 429, and every other
    session finishes with its own answer."""
    expected = quiet_answer(base)
    bystander = Bystander(base)
    victim = Bystander(base, max_new_tokens=200)
    session = victim.events[0]["session"]
    statuses = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for i in range(300):
            reply = client.post(f"/v1/sessions/{session}/updates", json={"text": f"Stop at {i}."})
            statuses.append(reply.status_code)
            if reply.status_code == 429:
                assert error_of(reply)["code"] == "too_many_corrections"
    assert statuses.count(202) <= LIMITS.max_corrections
    assert set(statuses) <= {202, 429, 404} and statuses.count(429) >= 300 - LIMITS.max_corrections - 200
    assert bystander.result()["text"] == expected
    flooded = victim.result()
    assert flooded.get("done") is True and len(flooded["landings"]) == statuses.count(202)


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (b'{"prompt": "x", "max_new_tokens": ' + b"9" * 5000 + b"}", "a 5,000-digit number"),
        (b"[" * 1000 + b"]" * 1000, "1,000-deep nesting"),
        (b'{"prompt": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, "5,000-deep objects"),
        (b'{"prompt": "x", "max_new_tokens": NaN}', "NaN"),
        (b'{"prompt": "\xff\xfe"}', "invalid UTF-8"),
        (b"", "an empty body"),
    ],
)
def test_odd_json_is_a_400_and_keeps_the_connection(base, body, what):
    """Defect: a huge number or deep nesting raised past the parser: a plain-text 500 and the connection dropped."""
    with httpx.Client(base_url=base, timeout=60) as client:
        for path in ("/v1/generate", "/v1/chat/completions", "/v1/sessions/x/updates"):
            reply = client.post(path, content=body, headers=JSON)
            assert reply.status_code == 400, (what, path, reply.text)
            assert error_of(reply)["type"] == "invalid_request_error"
        assert client.get("/health").status_code == 200  # the same keep-alive connection still serves


def test_a_prompt_is_limited_in_tokens_against_the_context(base):
    """Defect: the limit was in characters; 4,000 emoji (16,000 byte tokens, 512 positions) were accepted and
    prefilled while every other session waited."""
    emoji = "\U0001f600" * 4000
    with httpx.Client(base_url=base, timeout=60) as client:
        error = assert_refused(client.post("/v1/generate", json={"prompt": emoji}), 400, "prompt")
        assert error["code"] == "context_length_exceeded" and "512" in error["message"]
        chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": emoji}]}
        error = assert_refused(client.post("/v1/chat/completions", json=chat), 400, "messages")
        assert error["code"] == "context_length_exceeded"
        ok = client.post("/v1/generate", json={"prompt": "x" * 440, "max_new_tokens": 64})  # 440 + 64 <= 512
        assert ok.status_code == 200


def test_a_foreign_page_cannot_post(base):
    """Defect: `Content-Type` was ignored, so any web page could POST `text/plain` cross-origin without a preflight;
    any `Host` was accepted (DNS rebinding)."""
    body = json.dumps({"prompt": PROMPT}).encode()
    with httpx.Client(base_url=base, timeout=60) as client:
        page = {"content-type": "text/plain", "origin": "http://evil.example"}
        assert client.post("/v1/generate", content=body, headers=page).status_code == 403
        assert_refused(
            client.post("/v1/generate", content=body, headers={"content-type": "text/plain"}), 415, "Content-Type"
        )
        assert client.post("/v1/generate", content=body).status_code == 415  # no Content-Type at all
        json_page = {**JSON, "origin": "http://evil.example"}
        assert client.post("/v1/generate", content=body, headers=json_page).status_code == 403
        assert client.post("/v1/generate", content=body, headers={**JSON, "origin": "null"}).status_code == 403
        assert client.get("/health", headers={"host": "evil.example"}).status_code == 421
        assert client.get("/health", headers={"host": "attacker.example:8000"}).status_code == 421
        assert client.get("/health", headers={"host": "localhost:1234"}).status_code == 200
        own_origin = {**JSON, "origin": base}
        with client.stream("POST", "/v1/generate", content=body, headers=own_origin) as response:
            assert response.status_code == 200


def test_no_docs_and_no_local_paths_unless_asked(base, shipped):
    """Defect: /docs and /openapi.json were served unannounced and /health showed the model's absolute path."""
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"{base}{path}").status_code == 404
    health = httpx.get(f"{base}/health").json()
    assert health["model"] == MODEL_NAME and "/" not in json.dumps(health)
    for url in serve(create_app(*shipped, docs=True)):
        assert httpx.get(f"{url}/openapi.json").status_code == 200


def test_a_failure_in_decoding_reaches_clients_without_internal_detail(shipped, monkeypatch):
    """Defect: error events carried internal exception text (`TypeError: TextEncodeInput must be ...`)."""
    model, tokenizer = shipped
    app = create_app(model, tokenizer, model_name=MODEL_NAME)
    original = type(model).forward

    def broken(self, *args, **kwargs):
        raise TypeError("internal detail /secret/path")

    for url in serve(app):
        monkeypatch.setattr(type(model), "forward", broken)
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                with client.stream("POST", "/v1/generate", json={"prompt": PROMPT}) as response:
                    last = list(events(response))[-1]
                reply = client.post(
                    "/v1/chat/completions",
                    json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "Name 5 tools."}]},
                )
        finally:
            monkeypatch.setattr(type(model), "forward", original)
    assert last == {"error": GENERATION_FAILED}
    assert reply.status_code == 500 and "secret" not in reply.text and "TypeError" not in reply.text


def test_the_api_key_guards_every_route_but_health(shipped):
    app = create_app(*shipped, model_name=MODEL_NAME, access=Access(api_key="k3y"))
    for url in serve(app):
        with httpx.Client(base_url=url, timeout=60) as client:
            assert_refused(client.post("/v1/generate", json={"prompt": PROMPT}), 401, "API key")
            assert client.post("/v1/sessions/x/updates", json={"text": "a"}).status_code == 401
            assert client.get("/v1/models", headers={"authorization": "Bearer k3y!"}).status_code == 401
            assert client.get("/v1/models", headers={"authorization": "Basic k3y"}).status_code == 401
            assert client.get("/v1/models", headers={"authorization": "Bearer k3y"}).status_code == 200
            assert client.get("/health").status_code == 200


def test_a_public_bind_needs_an_api_key():
    with pytest.raises(SystemExit, match="--api-key"):
        access_from_args(parse_args(["--host", "0.0.0.0"]))
    keyed = access_from_args(parse_args(["--host", "0.0.0.0", "--api-key", "k"]))
    assert keyed.api_key == "k" and keyed.allowed_hosts is None
    assert access_from_args(parse_args(["--host", "0.0.0.0", "--insecure-no-api-key"])).api_key is None
    local = access_from_args(parse_args([]))
    assert local.api_key is None and "127.0.0.1" in local.allowed_hosts and "evil.example" not in local.allowed_hosts


def test_remote_code_runs_only_when_trusted(tmp_path):
    """Defect: `load_model` always passed `trust_remote_code=True`, so `--model SOME/HUB-ID` ran that repository's
    code without asking. A checkpoint whose code leaves a mark when imported is refused, and leaves none."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(DEFAULT_MODEL, checkpoint)
    mark = tmp_path / "code-ran"
    code = checkpoint / "configuration_duplex.py"
    code.write_text(f"open({str(mark)!r}, 'w').close()\n" + code.read_text())
    with pytest.raises(RemoteCodeRefused, match="--trust-remote-code"):
        load_model(str(checkpoint), device="cpu")
    assert not mark.exists()
    load_model(str(checkpoint), device="cpu", trust_remote_code=True)
    assert mark.exists()


def test_the_final_event_is_never_dropped_and_a_backlog_cancels_only_its_session():
    """Defect: on a full queue every event was dropped, the final `done` included. Now the queue keeps every event;
    a backlog over the limit cancels that session (and no other)."""

    class Session:
        cancels = 0

        def cancel(self):
            self.cancels += 1

    async def scenario():
        loop = asyncio.get_running_loop()
        slow, fast = EventChannel(loop, max_backlog=4), EventChannel(loop, max_backlog=4)
        slow.session, fast.session = Session(), Session()
        for i in range(20):
            slow.emit({"token": "a", "index": i})
            fast.emit({"token": "a", "index": i})
            await asyncio.sleep(0)
            await fast.queue.get()  # the fast client reads as the events come
        slow.emit({"done": True})
        await asyncio.sleep(0)

        async def read_all() -> list[dict]:
            return [event async for batch in slow.batches() for event in batch]

        try:
            received = await asyncio.wait_for(read_all(), 5)
        except TimeoutError:
            received = []  # the final event never came
        return received, slow.session.cancels, fast.session.cancels

    received, slow_cancels, fast_cancels = asyncio.run(scenario())
    assert received and received[-1] == {"done": True} and len(received) == 21
    assert slow_cancels > 0 and fast_cancels == 0
