"""The demo's engine (`app.DemoRun`) without a browser: the four panes of one prompt, corrected twice mid-stream."""

import time

import pytest
import torch

from app import DemoRun, restart_prompt
from serve_duplex import DEFAULT_MODEL, load_model

INSTRUCTION = "Name 5 tools."
FIRST, SECOND = "Name animals instead.", "Name fruits instead."


@pytest.fixture(scope="module")
def shipped():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as app.py does: one thread per generation, four at once
    yield load_model(DEFAULT_MODEL, device="cpu", trust_remote_code=True)
    torch.set_num_threads(threads)


def pump_until(run: DemoRun, condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, {name: pane.pieces for name, pane in run.panes.items()}
        run.pump(timeout=0.02)


def marks(run: DemoRun, pane: str) -> list[dict]:
    return [payload for kind, payload in run.panes[pane].pieces if kind == "mark"]


def written(run: DemoRun, pane: str) -> str:
    return "".join(payload for kind, payload in run.panes[pane].pieces if kind == "text")


@pytest.mark.slow
def test_two_corrections_land_in_every_pane_and_restart_starts_over_each_time(shipped):
    model, tokenizer = shipped
    run = DemoRun(model, tokenizer, INSTRUCTION, max_new_tokens=48, pace_s=0.05).start()
    pump_until(run, lambda: run.panes["workspace"].tokens >= 2)
    assert run.correct(FIRST)
    pump_until(run, lambda: run.shown_restart == 1 and run.panes["restart"].tokens >= 2)
    assert run.correct(SECOND)
    pump_until(run, lambda: run.finished)

    for pane, kind in (("workspace", "applied"), ("inband", "applied"), ("ignore", "ignored")):
        landed = marks(run, pane)
        assert [(m["kind"], m["text"]) for m in landed] == [(kind, FIRST), (kind, SECOND)], pane
        assert landed[0]["at"] < landed[1]["at"], pane
        assert all(m["latency_ms"] > 0 for m in landed), pane

    restarts = marks(run, "restart")
    assert [m["text"] for m in restarts] == [FIRST, SECOND]
    assert all(m["latency_ms"] > 0 for m in restarts) and restarts[1]["discarded"] >= 2
    prompt = restart_prompt(INSTRUCTION, [FIRST, SECOND])
    assert restarts[1]["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
    enc = tokenizer(prompt, return_tensors="pt")
    fresh = model.get_base_model().generate(**enc, max_new_tokens=48, do_sample=False)
    assert written(run, "restart") == tokenizer.decode(fresh[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    at = marks(run, "workspace")[0]["at"]
    assert at >= 2, "sent once two tokens had streamed, it cannot land before them"
    assert written(run, "workspace")[:at] == written(run, "ignore")[:at]  # one token per ASCII character
    assert not run.correct("Too late."), "a finished run refuses corrections"
    assert "Too late." not in str(run.panes)
