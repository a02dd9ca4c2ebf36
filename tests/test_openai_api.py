"""The OpenAI-compatible API, driven by the official `openai` Python client and by curl against a real uvicorn serving
the shipped tiny checkpoint: models, chat completions (streaming and not), the correction channel, and errors raised
as the client's own exception classes."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import openai
import pytest
from serving import MODEL_NAME, error_of, load_shipped, serve
from transformers import AutoTokenizer

from data import build_byte_tokenizer
from data.prompts import PromptFormat
from data.tokenizer import CHAT_TEMPLATE
from serve_duplex import DEFAULT_MODEL, Access, Limits, create_app

pytestmark = pytest.mark.timeout(300)

COUNT = [{"role": "user", "content": "Count from 3 to 9."}]
TOOLS = [{"role": "user", "content": "Name 5 tools."}]
CORRECTION = "Name animals instead."
PACE_S = 0.05  # the streaming-correction server writes a token every 50 ms: a correction always lands mid-answer


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


@pytest.fixture(scope="module")
def base(shipped):
    app = create_app(*shipped, model_name=MODEL_NAME, limits=Limits(max_new_tokens=128, max_sessions=4))
    yield from serve(app)


@pytest.fixture(scope="module")
def paced_base(shipped):
    app = create_app(*shipped, model_name=MODEL_NAME, engine_options={"pace_s": PACE_S})
    yield from serve(app)


def client(base: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def offline(shipped, messages: list[dict], max_new_tokens: int, updates=None) -> str:
    """What `model.generate` writes for the chat-templated messages (greedy)."""
    model, tokenizer = shipped
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, updates=updates, tokenizer=tokenizer)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_the_chat_template_renders_a_user_turn_as_the_prompt_format(shipped, tmp_path):
    """The shipped tokenizer (AutoTokenizer on the checkpoint folder) and every byte tokenizer that training saves
    carry the template; the tasks' own prompts stay plain text."""
    _, tokenizer = shipped
    rendered = tokenizer.apply_chat_template(COUNT, tokenize=False, add_generation_prompt=True)
    assert rendered == "Count from 3 to 9.\n"
    assert (Path(DEFAULT_MODEL) / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    build_byte_tokenizer().save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    assert saved.apply_chat_template(COUNT, tokenize=False, add_generation_prompt=True) == "Count from 3 to 9.\n"
    follow_up = [*COUNT, {"role": "user", "content": "Stop at 6."}]  # the restart prompt's format
    assert saved.apply_chat_template(follow_up, tokenize=False) == "Count from 3 to 9.\nStop at 6.\n"
    assert not PromptFormat.for_tokenizer(saved).chat


def test_the_client_lists_the_served_model(base):
    models = client(base).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client(base).models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client(base).models.retrieve("gpt-4o")


def test_a_non_streaming_answer_equals_offline_generate(base, shipped):
    reply = client(base).chat.completions.create(model=MODEL_NAME, messages=COUNT, max_tokens=32, temperature=0)
    expected = offline(shipped, COUNT, 32)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected == "3 4 5 6 7 8 9"
    assert reply.choices[0].finish_reason == "stop"  # the model wrote its end-of-text token
    assert reply.usage.prompt_tokens == len("Count from 3 to 9.\n")  # byte-level: one token a byte
    assert reply.usage.completion_tokens == len(expected) + 1  # and the end-of-text token
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model_extra["duplex"] == {"landings": []}


def test_a_streamed_answer_is_the_same_text_in_chunks_of_one_id(base, shipped):
    stream = client(base).chat.completions.create(
        model=MODEL_NAME, messages=COUNT, max_tokens=32, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == offline(shipped, COUNT, 32)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text) + 1


def test_max_tokens_ends_with_length_and_stop_strings_cut_the_answer(base):
    api = client(base)
    short = api.chat.completions.create(model=MODEL_NAME, messages=COUNT, max_completion_tokens=5)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5
    assert short.choices[0].message.content == "3 4 5"
    stopped = api.chat.completions.create(model=MODEL_NAME, messages=COUNT, stop=["7", "x"])
    assert stopped.choices[0].message.content == "3 4 5 6 " and stopped.choices[0].finish_reason == "stop"
    stream = api.chat.completions.create(model=MODEL_NAME, messages=COUNT, stop="6 7", stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "3 4 5 "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_is_not_greedy(base):
    """The same seed writes the same answer; the seeds together write something greedy decoding does not. (A prompt
    outside the training formats: the tiny model is near-certain on those, and would write the same at any seed.)"""
    api = client(base)
    poem = [{"role": "user", "content": "Write a poem."}]
    greedy = api.chat.completions.create(model=MODEL_NAME, messages=poem, max_tokens=24, temperature=0)

    def sampled(seed: int) -> str:
        reply = api.chat.completions.create(model=MODEL_NAME, messages=poem, max_tokens=24, temperature=2, seed=seed)
        return reply.choices[0].message.content

    answers = {seed: sampled(seed) for seed in (1, 2, 3)}
    assert sampled(1) == answers[1] and sampled(3) == answers[3]
    assert len(set(answers.values())) > 1
    assert any(answer != greedy.choices[0].message.content for answer in answers.values())


def test_a_correction_from_a_second_client_lands_mid_stream(paced_base, shipped):
    """Stream `Name 5 tools.`; once `ham` has streamed, a second client posts a correction to the completion's id.
    Its landing shows in the stream (extension field `duplex`), and the answer from there on is what `generate`
    writes with that correction at the token where it landed, not the uncorrected answer."""
    reader, corrector = client(paced_base), client(paced_base)
    stream = reader.chat.completions.create(model=MODEL_NAME, messages=TOOLS, max_tokens=48, stream=True)
    text, landed, final, posted = "", [], None, None
    for chunk in stream:
        extra = chunk.model_extra.get("duplex") or {}
        if "landed" in extra:
            landed.append((extra["landed"], len(text)))
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if len(text) >= 3 and posted is None:
            posted = corrector.post(
                f"/chat/completions/{chunk.id}/updates", body={"text": CORRECTION}, cast_to=httpx.Response
            )
        if chunk.choices and chunk.choices[0].finish_reason:
            final = chunk
    assert posted is not None and posted.status_code == 202
    assert len(landed) == 1, landed
    landing, text_before = landed[0]
    assert landing["text"] == CORRECTION and landing["applied"] and landing["kind"] == "correction"
    assert landing["at"] == text_before >= 3  # byte-level tokens, ASCII text: token `at` is character `at`
    assert landing["latency_ms"] > 0
    assert final.model_extra["duplex"]["landings"] == [landing]
    assert text == offline(shipped, TOOLS, 48, updates=[(landing["at"], CORRECTION)])
    assert text[landing["at"] :] != offline(shipped, TOOLS, 48)[landing["at"] :]
    with pytest.raises(openai.NotFoundError):  # finished: the id is unknown now
        corrector.post(f"/chat/completions/{final.id}/updates", body={"text": CORRECTION}, cast_to=httpx.Response)


def test_client_errors_are_the_clients_exceptions(base):
    api = client(base)
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model=MODEL_NAME, messages=[])
    assert refused.value.status_code == 400 and refused.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model=MODEL_NAME, messages=COUNT, temperature=3)
    assert refused.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as refused:  # 4,000 emoji: 16,000 byte tokens, 512 positions
        api.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "\U0001f600" * 4000}])
    assert refused.value.body["code"] == "context_length_exceeded" and "512" in refused.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model="gpt-4o", messages=COUNT)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as missing:
        api.post("/chat/completions/chatcmpl-unknown/updates", body={"text": CORRECTION}, cast_to=httpx.Response)
    assert missing.value.body["type"] == "not_found_error"


def test_429_when_every_session_is_taken(shipped):
    app = create_app(
        *shipped,
        model_name=MODEL_NAME,
        limits=Limits(max_sessions=1),
        session_options={"min_new_tokens": 200},
        engine_options={"pace_s": PACE_S},
    )
    for url in serve(app):
        api = client(url)
        with api.chat.completions.create(model=MODEL_NAME, messages=TOOLS, max_tokens=200, stream=True) as stream:
            next(iter(stream))
            with pytest.raises(openai.RateLimitError) as busy:
                api.chat.completions.create(model=MODEL_NAME, messages=TOOLS)
            assert busy.value.body["code"] == "too_many_sessions"


def test_the_api_key_is_a_bearer_token(shipped):
    app = create_app(*shipped, model_name=MODEL_NAME, access=Access(api_key="s3cret"))
    for url in serve(app):
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert [m.id for m in client(url, api_key="s3cret").models.list().data] == [MODEL_NAME]
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # for load balancers: no key, nothing private


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_and_is_refused_like_any_client(base, shipped):
    body = json.dumps({"model": MODEL_NAME, "messages": COUNT, "stream": True, "max_tokens": 32})
    curl = ["curl", "-sN", f"{base}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", body]
    out = subprocess.run(curl, capture_output=True, text=True, timeout=120, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == offline(shipped, COUNT, 32)
    plain = ["curl", "-s", "-w", "\n%{http_code}", f"{base}/v1/chat/completions", "-d", body]  # form-encoded
    reply, status = subprocess.run(plain, capture_output=True, text=True, timeout=60).stdout.rsplit("\n", 1)
    assert status == "415" and json.loads(reply)["error"]["param"] == "Content-Type"


def test_concurrent_clients_get_their_own_answers(base, shipped):
    """Four clients at once, two prompts: each gets its own prompt's offline answer."""
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        messages = COUNT if i % 2 else TOOLS
        answers[i] = client(base).chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=40)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    expected = {0: offline(shipped, TOOLS, 40), 1: offline(shipped, COUNT, 40)}
    assert {i: a.choices[0].message.content for i, a in answers.items()} == {i: expected[i % 2] for i in range(4)}
    assert len({a.id for a in answers.values()}) == 4


def test_an_error_object_has_openais_four_fields(base):
    reply = httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL_NAME, "messages": COUNT, "n": 2})
    assert reply.status_code == 400 and error_of(reply)["param"] == "n"
