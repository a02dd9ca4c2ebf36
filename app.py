"""Duplex side by side: type a correction while the model writes, and watch where it lands.

A Gradio Blocks app, runnable as a Hugging Face Space:

    python app.py --trust-remote-code [--model checkpoints/duplex-tiny] [--host 127.0.0.1] [--port 7860]

Duplex checkpoints carry their own model code: it runs only with `--trust-remote-code` (pin a Hub model's code with
`--revision`).

One prompt runs four ways at once, each in its own pane:
  Duplex (workspace)  the correction is written into the latent workspace; decoding goes on from the same KV cache
  in-band             the correction's tokens are spliced into the live context (same model, same cache)
  restart             the half-duplex baseline: the frozen backbone stops, is re-prompted with
                      "{instruction}\\n{correction}\\n" and writes its answer from scratch (the duplex model with an
                      empty workspace, which is exactly its backbone)
  ignored             the same model with the correction dropped: what it would have written without it
Each correction is marked in the text where it landed, with its measured latency (from sending it to the first token
conditioned on it); the restart pane shows the time it takes to re-prefill and the tokens it throws away. The panes
are rows of one batched decoding loop (`engine_duplex.DuplexEngine`): a restart joins it mid-flight.
"""

from __future__ import annotations

import argparse
import html
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import gradio as gr
import torch

from engine_duplex import DuplexEngine, EngineSession, SessionFinished
from serve_duplex import DEFAULT_MODEL, RemoteCodeRefused, load_model

PANES = ("workspace", "inband", "restart", "ignore")
TITLES = {
    "workspace": "Duplex (workspace)",
    "inband": "In-band",
    "restart": "Restart (half-duplex)",
    "ignore": "Ignored (no correction)",
}
EXAMPLES = [
    ["Name 5 tools.", "Name animals instead."],
    ["Count from 3 to 19.", "Stop at 12."],
    ["Say apple 5 times.", "Say pear instead."],
    ["Write to Anna about rain.", "The name is Tom."],
]
CSS = """
.duplex-pane { font-family: ui-monospace, monospace; white-space: pre-wrap; border: 1px solid #d0d7de;
  border-radius: 8px; padding: 10px; min-height: 140px; }
.duplex-pane h4 { margin: 0 0 6px 0; font-family: sans-serif; }
.duplex-pane .state { font-weight: normal; color: #57606a; font-size: 0.85em; }
.landing { background: #fff3b0; border: 1px solid #d4a72c; border-radius: 4px; padding: 0 3px; margin: 0 2px;
  font-family: sans-serif; font-size: 0.8em; white-space: normal; }
.landing.ignored { background: #eeeeee; border-color: #999999; }
.landing.backchannel { background: #e6f4ff; border-color: #54aeff; }
.landing.restart { background: #ffd8d8; border-color: #cf222e; }
.discarded { color: #8c959f; text-decoration: line-through; }
"""


def restart_prompt(instruction: str, corrections: list[str]) -> str:
    """The half-duplex baseline's prompt, as the evaluation builds it in plain text
    (`data.prompts.PromptFormat.restart_prompt`)."""
    return "\n".join([instruction, *corrections]) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# One pane's text, with its landing markers
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Pane:
    """What one pane shows: the text pieces and markers in the order they streamed in."""

    pieces: list[tuple[str, Any]] = field(default_factory=list)  # ("text" | "discarded" | "mark", payload)
    tokens: int = 0
    done: bool = False
    note: str = ""

    def add_text(self, text: str) -> None:
        if self.pieces and self.pieces[-1][0] == "text":
            self.pieces[-1] = ("text", self.pieces[-1][1] + text)
        else:
            self.pieces.append(("text", text))

    def discard_text(self) -> int:
        """Strike through everything written so far (a restart throws it away); returns how many tokens that was."""
        self.pieces = [("discarded", payload) if kind == "text" else (kind, payload) for kind, payload in self.pieces]
        discarded, self.tokens = self.tokens, 0
        return discarded

    def render(self, name: str) -> str:
        state = f"done, {self.tokens} tokens" if self.done else "writing…"
        parts = [
            f'<div class="duplex-pane" data-pane="{name}" data-done="{str(self.done).lower()}">',
            f'<h4>{TITLES[name]} <span class="state">{state}</span></h4>',
        ]
        for kind, payload in self.pieces:
            if kind == "text":
                parts.append(f'<span class="out">{html.escape(payload)}</span>')
            elif kind == "discarded":
                parts.append(f'<span class="discarded">{html.escape(payload)}</span>')
            else:
                parts.append(render_marker(payload))
        if self.note:
            parts.append(f'<div class="state">{html.escape(self.note)}</div>')
        parts.append("</div>")
        return "".join(parts)


def render_marker(mark: dict) -> str:
    """A correction's landing point: what it said, the token it landed before, and its measured latency."""
    text = html.escape(mark["text"])
    latency = "…" if mark.get("latency_ms") is None else f"{mark['latency_ms']:.0f} ms"
    if mark["kind"] == "restart":
        label = (
            f"⟲ “{text}”: restart from scratch, {mark['discarded']} tokens thrown away; "
            f"re-prefill of the {mark['prompt_tokens']}-token prompt + first token: {latency}"
        )
    elif mark["kind"] == "ignored":
        label = f"✕ “{text}” arrived at token {mark['at']} (dropped)"
    elif mark["kind"] == "late":
        label = f"✕ “{text}” arrived after the end"
    elif mark["kind"] == "backchannel":
        label = f"◦ “{text}” at token {mark['at']}: a backchannel, nothing changed ({latency})"
    else:
        label = f"▶ “{text}” landed at token {mark['at']}, {latency}"
    return f'<span class="landing {mark["kind"]}" data-at="{mark.get("at", "")}">{label}</span>'


# ----------------------------------------------------------------------------------------------------------------------
# One press of Start: four live generations
# ----------------------------------------------------------------------------------------------------------------------


class DemoRun:
    """The same prompt through the duplex model in three update modes plus the restart baseline, all streaming at
    once as rows of one engine; `correct` sends a correction to all four, `pump` folds their events into the panes."""

    def __init__(self, model, tokenizer, prompt: str, max_new_tokens: int, pace_s: float):
        self.model, self.tokenizer = model, tokenizer
        self.instruction = prompt.strip()
        self.max_new_tokens = max_new_tokens
        self.engine = DuplexEngine(model, tokenizer, max_batch_size=8, pace_s=pace_s)
        self.events: queue.Queue = queue.Queue()
        self.panes = {name: Pane() for name in PANES}
        self.live: dict[str, EngineSession] = {}
        self.corrections: list[str] = []
        self.restarts: list[tuple[EngineSession, dict | None]] = []  # (run, its marker), newest last
        self.lock = threading.Lock()
        self.shown_restart = 0  # the restart run the pane shows (the pump's own view: a newer run may be starting)

    def _generation(self, prompt: str, tag: tuple, update_mode: str) -> EngineSession:
        return self.engine.submit(
            prompt, emit=partial(self._emit, tag), max_new_tokens=self.max_new_tokens, update_mode=update_mode
        )

    def _emit(self, tag: tuple, event: dict) -> None:
        self.events.put((tag, event))

    def _restart(self, prompt: str, marker: dict | None) -> None:
        """A new restart run; no correction reaches it (the duplex model with an empty workspace is its backbone)."""
        run = self._generation(prompt, ("restart", len(self.restarts)), update_mode="ignore")
        self.restarts.append((run, marker))

    def start(self) -> DemoRun:
        self.engine.start()
        with self.lock:
            for mode in ("workspace", "inband", "ignore"):
                self.live[mode] = self._generation(self.instruction + "\n", ("live", mode), update_mode=mode)
            self._restart(self.instruction + "\n", None)
        return self

    def correct(self, text: str) -> bool:
        """Send `text` to every pane: into the live streams, and as a restart of the half-duplex baseline. False (and
        nothing sent) once the whole run has ended."""
        with self.lock:
            if self._ended():
                return False
            arrived = time.perf_counter()
            for mode, generation in self.live.items():
                try:
                    generation.correct(text)
                except SessionFinished:
                    self.events.put((("live", mode), {"late": text}))
            current, _ = self.restarts[-1]
            current.cancel()
            self.corrections.append(text)
            prompt = restart_prompt(self.instruction, self.corrections)
            marker = {
                "kind": "restart",
                "text": text,
                "arrived": arrived,
                "prompt_tokens": len(self.tokenizer(prompt)["input_ids"]),
                "latency_ms": None,
            }
            self.events.put((("restart", len(self.restarts)), {"restarting": marker}))
            self._restart(prompt, marker)
        return True

    def cancel(self) -> None:
        """Stop every run and the engine (the page closed, or Start was pressed again)."""
        for generation in [*self.live.values(), *(run for run, _ in self.restarts)]:
            generation.cancel()
        self.engine.close()

    @property
    def finished(self) -> bool:
        """Every generation has ended and every event is in its pane; from then on corrections are refused."""
        with self.lock:
            return self._ended()

    def _ended(self) -> bool:  # the caller holds `self.lock`
        ended = all(g.finished for g in [*self.live.values(), self.restarts[-1][0]])
        return ended and self.events.empty() and all(pane.done for pane in self.panes.values())

    def pump(self, timeout: float) -> None:
        """Fold the events that arrived within `timeout` seconds into the panes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                tag, event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if tag[0] == "live":
                self._live_event(self.panes[tag[1]], event)
            else:
                self._restart_event(tag[1], event)

    def _live_event(self, pane: Pane, event: dict) -> None:
        if "token" in event:
            pane.add_text(event["token"])
            pane.tokens += 1
        elif "landed" in event:
            landed = event["landed"]
            decided_backchannel = landed.get("kind") == "backchannel"  # the model's decision (workspace pane)
            marker = "ignored" if not landed["applied"] else "backchannel" if decided_backchannel else "applied"
            pane.pieces.append(("mark", {**landed, "kind": marker}))
        elif "late" in event:
            pane.pieces.append(("mark", {"kind": "late", "text": event["late"]}))
        elif "done" in event:
            pane.done = True
        elif "error" in event:
            pane.done, pane.note = True, event["error"]

    def _restart_event(self, index: int, event: dict) -> None:
        """Events of restart run `index`; those of a run a newer correction replaced are dropped."""
        pane = self.panes["restart"]
        if "restarting" in event:
            marker = event["restarting"]
            marker["discarded"] = pane.discard_text()
            pane.pieces.append(("mark", marker))
            pane.done = False
            self.shown_restart = index
            return
        if index != self.shown_restart:
            return
        run, marker = self.restarts[index]
        if "token" in event:
            if marker is not None and marker["latency_ms"] is None:
                marker["latency_ms"] = (run.first_token_time - marker["arrived"]) * 1000
            pane.add_text(event["token"])
            pane.tokens += 1
        elif "done" in event:
            pane.done = True
        elif "error" in event:
            pane.done, pane.note = True, event["error"]

    def render(self) -> list[str]:
        return [self.panes[name].render(name) for name in PANES]


# ----------------------------------------------------------------------------------------------------------------------
# The Gradio app
# ----------------------------------------------------------------------------------------------------------------------


class DemoRuns:
    """The run of each browser session (one at a time: Start again replaces it)."""

    def __init__(self) -> None:
        self._runs: dict[str, DemoRun] = {}
        self._lock = threading.Lock()

    def replace(self, key: str, run: DemoRun) -> None:
        with self._lock:
            old = self._runs.get(key)
            self._runs[key] = run
        if old is not None:
            old.cancel()

    def get(self, key: str) -> DemoRun | None:
        with self._lock:
            return self._runs.get(key)

    def drop(self, key: str) -> None:
        with self._lock:
            run = self._runs.pop(key, None)
        if run is not None:
            run.cancel()


class ChatRun:
    """One chat answer streaming from a shared engine, which takes corrections while it writes; each correction is
    marked in the answer where it landed, with its latency and the model's decision."""

    def __init__(self, engine: DuplexEngine, tokenizer, messages: list[dict], max_new_tokens: int):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        self.events: queue.Queue = queue.Queue()
        self.session = engine.submit(prompt, emit=self.events.put, max_new_tokens=max_new_tokens)
        self.text, self.marks, self.finished = "", [], False  # marks: (offset in text, what landed)

    def correct(self, text: str) -> bool:
        """Send a correction; False once the answer is complete."""
        try:
            self.session.correct(text)
        except SessionFinished:
            return False
        return True

    def pump(self, timeout: float) -> None:
        """Fold the events that arrived (waiting up to `timeout` for the first) into the answer."""
        try:
            event = self.events.get(timeout=timeout)
            while True:
                if "token" in event:
                    self.text += event["token"]
                elif "landed" in event:
                    self.marks.append((len(self.text), event["landed"]))
                elif "done" in event or "error" in event:
                    self.finished = True
                event = self.events.get_nowait()
        except queue.Empty:
            return

    def render(self) -> str:
        """The answer with each correction marked where it landed: ⟨text · decision, latency⟩."""
        out, start = [], 0
        for offset, landed in self.marks:
            latency = "" if landed["latency_ms"] is None else f", {landed['latency_ms']:.0f} ms"
            out += [self.text[start:offset], f"⟨{landed['text']} · {landed['kind'] or 'not read'}{latency}⟩"]
            start = offset
        return "".join([*out, self.text[start:]])


def build_chat(model, tokenizer, max_new_tokens: int, pace_s: float) -> None:
    """The chat tab: a conversation in the model's chat template; a correction typed while the answer streams
    lands in it; the next turn carries each correction as a user turn after the answer it corrected."""
    engine = DuplexEngine(model, tokenizer, max_batch_size=8, pace_s=pace_s).start()
    runs: dict[str, ChatRun] = {}
    turns: dict[str, list[dict]] = {}  # what the model is sent, per browser session

    def chat(message: str, shown: list, request: gr.Request):
        if not message or not message.strip():
            raise gr.Error("Type a message first, e.g. “Name 5 fruits.”")
        history = turns.setdefault(request.session_hash, [])
        history.append({"role": "user", "content": message.strip()})
        run = runs[request.session_hash] = ChatRun(engine, tokenizer, history, max_new_tokens)
        shown = [*shown, {"role": "user", "content": message.strip()}, {"role": "assistant", "content": ""}]
        while not run.finished:
            run.pump(timeout=0.08)
            shown[-1] = {"role": "assistant", "content": run.render()}
            yield shown, ""
        history.append({"role": "assistant", "content": run.text})
        history += [{"role": "user", "content": landed["text"]} for _, landed in run.marks if landed["applied"]]
        yield shown, ""

    def correct(text: str, request: gr.Request) -> str:
        run = runs.get(request.session_hash)
        if run is None or not text or not text.strip():
            return "Send a message, then type a correction while the answer streams."
        return f"Sent “{text.strip()}”." if run.correct(text.strip()) else "The answer was complete."

    chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=360)
    message = gr.Textbox(label="Message", elem_id="chat-message", placeholder="Name 5 fruits.")
    with gr.Row():
        correction = gr.Textbox(label="Correction while it answers", elem_id="chat-correction", scale=3)
        send = gr.Button("Send correction", elem_id="chat-send")
    status = gr.Markdown(elem_id="chat-status")
    message.submit(chat, [message, chatbot], [chatbot, message], concurrency_limit=4)
    send.click(correct, [correction], [status], concurrency_limit=None)
    correction.submit(correct, [correction], [status], concurrency_limit=None)


def build_demo(model, tokenizer, max_new_tokens: int = 128, chat_pace_s: float = 0.06) -> gr.Blocks:
    """The side-by-side demo for `model` (a Duplex checkpoint) and its tokenizer."""
    runs = DemoRuns()

    def start(prompt: str, new_tokens: float, pace_ms: float, request: gr.Request):
        if not prompt or not prompt.strip():
            raise gr.Error("Type a prompt first, e.g. “Name 5 tools.”")
        run = DemoRun(model, tokenizer, prompt, int(new_tokens), pace_ms / 1000).start()
        runs.replace(request.session_hash, run)
        try:
            while not run.finished:
                run.pump(timeout=0.08)
                yield [*run.render(), "Writing… send a correction now."]
            yield [*run.render(), "Done."]
        finally:  # the page closed or Start was pressed again: stop writing for nobody
            run.cancel()

    def send(text: str, request: gr.Request):
        run = runs.get(request.session_hash)
        if run is None:
            raise gr.Error("Press Start first, then send the correction while the answer streams.")
        if not text or not text.strip():
            raise gr.Error("Type a correction first, e.g. “Name animals instead.”")
        if not run.correct(text.strip()):
            return "The answer is complete: press Start, then send the correction while it streams."
        return f"Sent “{text.strip()}”."

    def forget(request: gr.Request) -> None:
        """The tab closed: stop its run and let it go."""
        runs.drop(request.session_hash)

    with gr.Blocks(title="Duplex: corrections while it writes") as demo:
        gr.Markdown(
            "## Duplex: a language model that listens while it writes\n"
            "Start the answer, then send a correction **while it streams**. Duplex reads the correction into its "
            "workspace and goes on from the same KV cache; in-band splices it into the text; restart stops and starts "
            "over. Each correction is marked where it landed, with its measured latency."
        )
        with gr.Tab("Side by side"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0][0], elem_id="prompt", scale=3)
                new_tokens = gr.Slider(8, max_new_tokens, value=min(64, max_new_tokens), step=8, label="max new tokens")
                pace = gr.Slider(0, 300, value=80, step=10, label="ms per token (time to type)", elem_id="pace")
            start_button = gr.Button("Start", variant="primary", elem_id="start")
            with gr.Row():
                correction = gr.Textbox(label="Correction", value=EXAMPLES[0][1], elem_id="correction", scale=3)
                send_button = gr.Button("Send correction", elem_id="send")
            status = gr.Markdown(elem_id="status")
            sent = gr.Markdown(elem_id="sent")
            with gr.Row(equal_height=True):
                panes = [gr.HTML(Pane().render(name), elem_id=f"pane-{name}") for name in PANES]
            gr.Examples(EXAMPLES, [prompt, correction])
            start_button.click(start, [prompt, new_tokens, pace], [*panes, status], concurrency_limit=4)
            send_button.click(send, [correction], [sent], concurrency_limit=None)
            correction.submit(send, [correction], [sent], concurrency_limit=None)
        with gr.Tab("Chat"):
            build_chat(model, tokenizer, max_new_tokens, chat_pace_s)
        demo.unload(forget)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("DUPLEX_MODEL", DEFAULT_MODEL), help="path or Hub id")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=os.environ.get("DUPLEX_TRUST_REMOTE_CODE") == "1",
        help="run the model code the checkpoint ships (Duplex checkpoints need it; read it first)",
    )
    parser.add_argument("--revision", default=None, help="the Hub revision (commit) of --model to load")
    parser.add_argument("--backbone", default=None, help="an adapter-only --model's backbone, stored locally")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: a GPU if there is one)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the slider's maximum")
    parser.add_argument("--chat-pace-ms", type=float, default=60, help="chat tab: at least this long per token")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model(
            args.model, args.device, args.dtype, args.trust_remote_code, args.revision, args.backbone
        )
    except RemoteCodeRefused as error:
        raise SystemExit(str(error)) from None
    demo = build_demo(model, tokenizer, args.max_new_tokens, args.chat_pace_ms / 1000)
    demo.queue(default_concurrency_limit=None).launch(server_name=args.host, server_port=args.port, css=CSS)


if __name__ == "__main__":
    main()
