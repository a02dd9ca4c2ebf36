"""Streaming HTTP server for Duplex: a generation streams its tokens as Server-Sent Events, and corrections posted to
its session from another client land mid-stream, while the model writes.

    python serve_duplex.py [--model checkpoints/duplex-tiny] [--host 127.0.0.1] [--port 8000]

Endpoints (JSON in, `data: {json}` events out):

    GET  /health                    200 {"status": "ok", "model": ..., "sessions": n}
    POST /v1/generate               {"prompt", "max_new_tokens", "update_mode", "do_sample"} -> text/event-stream:
                                    {"session": id}, then {"token": str, "index": n} per new token,
                                    {"landed": {"at": n, "text": ..., "applied": ..., "kind": ..., "latency_ms": ...}}
                                    when an update lands ("kind": the model's decision, "correction" or
                                    "backchannel"), last {"done": true, "text": ..., "landings": [...]}
    POST /v1/sessions/{id}/updates  {"text"} -> 202 {"queued": true}; 404 for an unknown or finished session

`index` and `at` count new tokens from 0, as `generate` does: token `at` is the first one conditioned on the
correction. Bad input is a 4xx with `{"error": message}` naming the field. Every session runs its own `generate` in
its own thread; a client that disconnects stops its generation and frees its session.

`LiveGeneration` (one streaming `generate` that takes corrections) is shared with the Gradio demo, `app.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_duplex import UPDATE_MODES

DEFAULT_MODEL = str(Path(__file__).resolve().parent / "checkpoints" / "duplex-tiny")

Event = dict[str, Any]
EmitFn = Callable[[Event], None]


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else the first GPU when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    name_or_path: str = DEFAULT_MODEL, device: str | None = None, dtype: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Duplex checkpoint (local path or Hub id) and its tokenizer the way a user does, in eval mode.

    `dtype="auto"` keeps the checkpoint's dtype on the CPU and uses bfloat16 on a GPU that supports it.
    """
    target = pick_device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if target.type == "cuda" and torch.cuda.is_bf16_supported() else None
    else:
        torch_dtype = getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=True, **kwargs).to(target).eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True)
    return model, tokenizer


def update_stream_class(model: torch.nn.Module) -> type | None:
    """The `UpdateStream` class that `model.generate` recognises, or None for a plain causal LM.

    A checkpoint loaded with `trust_remote_code` runs its own copy of `generation_duplex.py`, whose `UpdateStream` is
    a different class from the checkout's; `generate` only accepts its own, so it is looked up beside the model class.
    """
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "UpdateStream", None)


def _landing_event(landing) -> dict[str, Any]:
    """An `UpdateLanding` as the server reports it; latency is from the correction's arrival to the forward pass
    that first read it (None for one that never landed)."""
    latency = None
    if landing.landed_time is not None and landing.arrived_time is not None:
        latency = round((landing.landed_time - landing.arrived_time) * 1000, 2)
    return {
        "at": landing.at,
        "text": landing.text,
        "applied": landing.applied,
        "kind": getattr(landing, "kind", None),  # the model's decision: "correction" or "backchannel" (workspace)
        "latency_ms": latency,
    }


# ----------------------------------------------------------------------------------------------------------------------
# One live generation
# ----------------------------------------------------------------------------------------------------------------------


class SessionFinished(RuntimeError):
    """A correction arrived after its generation had ended."""


class _TokenStreamer(BaseStreamer):
    """Streamer that hands every new token id to a callback (the first `put` is the prompt, skipped)."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.on_token(int(token_id))

    def end(self) -> None:
        pass


class _StopWhen(StoppingCriteria):
    """Stops generation once `event` is set (a client went away, or a restart replaced the run)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, holding back an incomplete multi-byte character (as
    `TextIteratorStreamer` does), so that the pieces always join to the decoded text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes ("" while a character is still incomplete)."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.emitted) :]
        self.emitted = text
        return piece

    def text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)


class LiveGeneration:
    """One `model.generate` call in its own thread that streams events and takes corrections while it writes.

    Events go to `emit` (called from the generation thread), in order:
      {"token": str, "index": n}                 every new token (index counts new tokens from 0)
      {"landed": {"at", "text", "applied", "kind", "latency_ms"}}   just before token `at`, the first one conditioned
                                                 on it; "kind" is the model's decision (correction / backchannel);
                                                 latency is from `correct()` to the forward pass that computed
                                                 that token's logits (`UpdateLanding` times, from `on_landing`)
      {"done": true, "text", "tokens", "stopped", "landings"}   at the end; `landings` are `generate`'s own record
                                                 (at, text, applied, latency_ms), plus any correction that arrived
                                                 too late to land (`at` None)
      {"error": message}                         if generation failed

    A plain causal LM (e.g. the frozen backbone) streams too but takes no corrections. `pace_s` slows the stream down
    to a human's reading speed (the demo uses it); a correction cuts the pause short, so it does not add latency.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        prompt: str,
        *,
        emit: EmitFn,
        max_new_tokens: int = 64,
        update_mode: str = "workspace",
        do_sample: bool = False,
        pace_s: float = 0.0,
        generate_kwargs: dict[str, Any] | None = None,
    ):
        self.model, self.tokenizer, self.prompt, self.emit = model, tokenizer, prompt, emit
        self.max_new_tokens = max_new_tokens
        self.update_mode = update_mode
        self.do_sample = do_sample
        self.pace_s = pace_s
        self.generate_kwargs = dict(generate_kwargs or {})
        stream_class = update_stream_class(model)
        self.stream = stream_class(on_landing=self._on_landing) if stream_class is not None else None
        self.decoder = IncrementalDecoder(tokenizer)
        self.cancelled = threading.Event()
        self.wake = threading.Event()  # cuts a pacing pause short
        self.lock = threading.Lock()  # orders `correct()` against the end of generation
        self.finished = False
        self.started_time: float | None = None
        self.first_token_time: float | None = None
        self.tokens = 0
        self.thread = threading.Thread(target=self._run, name="duplex-generate", daemon=True)

    def start(self) -> LiveGeneration:
        self.started_time = time.perf_counter()
        self.thread.start()
        return self

    def correct(self, text: str) -> None:
        """Queue a correction; it lands before the next token. Raises `SessionFinished` once generation has ended."""
        if self.stream is None:
            raise TypeError(f"{type(self.model).__name__} takes no corrections")
        with self.lock:
            if self.finished:
                raise SessionFinished("generation has ended")
            self.stream.put(text)
        self.wake.set()

    def cancel(self) -> None:
        """Stop generating after the current step (the done event reports `stopped: "cancelled"`)."""
        self.cancelled.set()
        self.wake.set()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    # -- the generation thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            output = self._generate()
        except Exception as error:  # reported to the client instead of vanishing with the thread
            with self.lock:
                self.finished = True
            self.emit({"error": f"generation failed: {type(error).__name__}: {error}"})
            return
        with self.lock:
            self.finished = True
            late = self.stream.drain() if self.stream is not None else []  # posted after generate returned
        self.emit(self._done_event(output, late))

    def _generate(self):
        device = next(self.model.parameters()).device
        encoded = self.tokenizer(self.prompt, return_tensors="pt").to(device)
        kwargs: dict[str, Any] = dict(self.generate_kwargs)
        if self.stream is not None:
            kwargs.update(updates=self.stream, update_mode=self.update_mode, tokenizer=self.tokenizer)
        with torch.inference_mode():
            return self.model.generate(
                **encoded,
                max_new_tokens=self.max_new_tokens,
                do_sample=self.do_sample,
                streamer=_TokenStreamer(self._on_token),
                stopping_criteria=StoppingCriteriaList([_StopWhen(self.cancelled)]),
                return_dict_in_generate=True,
                pad_token_id=self._pad_token_id(),
                **kwargs,
            )

    def _pad_token_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def _on_landing(self, row: int, landing) -> None:
        """`generate` reports a correction taking effect: announce it before the token it conditions."""
        self.emit({"landed": _landing_event(landing)})

    def _on_token(self, token_id: int) -> None:
        """Announce the token; then pause if the stream is paced."""
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.emit({"token": self.decoder.push(token_id), "index": self.tokens})
        self.tokens += 1
        if self.pace_s > 0 and not self.cancelled.is_set():
            self.wake.wait(self.pace_s)
            self.wake.clear()

    def _done_event(self, output, late: list) -> Event:
        """`generate`'s own record of where each correction landed (corrections that came after its last step have
        `at` None), plus those posted after it returned."""
        landings = [_landing_event(landing) for landing in (getattr(output, "update_landings", None) or [[]])[0]]
        for payload, _row, _arrived in late:
            landings.append({"at": None, "text": payload, "applied": False, "kind": None, "latency_ms": None})
        if self.cancelled.is_set():
            stopped = "cancelled"
        elif self.tokens >= self.max_new_tokens:
            stopped = "length"
        else:
            stopped = "eos"
        return {
            "done": True,
            "text": self.decoder.text(),
            "tokens": self.tokens,
            "stopped": stopped,
            "landings": landings,
        }


# ----------------------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is refused with a 4xx naming the field."""

    max_new_tokens: int = 256
    max_prompt_chars: int = 4000
    max_update_chars: int = 500
    max_sessions: int = 32

    @property
    def max_body_bytes(self) -> int:
        """Room for the longest accepted text, every character JSON-escaped (`\\uXXXX`), plus the other fields."""
        return 6 * max(self.max_prompt_chars, self.max_update_chars) + 1024


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    max_new_tokens: int = 64
    update_mode: str = "workspace"
    do_sample: bool = False


class RequestError(Exception):
    """A request the server refuses: `status` (4xx) and a message naming the offending field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; a body over `limit` bytes is refused (413) without being read to its end."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"body: larger than {limit} bytes")
    return bytes(body)


def _json_object(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"body: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"body: expected a JSON object, got {type(data).__name__}")
    return data


def _text_field(data: dict, name: str, limit: int) -> str:
    if name not in data:
        raise RequestError(422, f"`{name}` is required")
    value = data[name]
    if not isinstance(value, str):
        raise RequestError(422, f"`{name}` must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RequestError(422, f"`{name}` is empty")
    if len(value) > limit:
        raise RequestError(422, f"`{name}` has {len(value)} characters; the limit is {limit}")
    return value


def _reject_unknown_fields(data: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RequestError(422, f"unknown field `{unknown[0]}` (accepted: {', '.join(known)})")


def parse_generate_request(body: bytes, limits: Limits) -> GenerateRequest:
    """Validate a `POST /v1/generate` body; raises `RequestError` naming the first bad field."""
    data = _json_object(body)
    _reject_unknown_fields(data, ("prompt", "max_new_tokens", "update_mode", "do_sample"))
    prompt = _text_field(data, "prompt", limits.max_prompt_chars)
    max_new_tokens = data.get("max_new_tokens", GenerateRequest.max_new_tokens)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise RequestError(422, f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}")
    if max_new_tokens > limits.max_new_tokens:
        raise RequestError(422, f"`max_new_tokens` is {max_new_tokens}; the limit is {limits.max_new_tokens}")
    update_mode = data.get("update_mode", GenerateRequest.update_mode)
    if update_mode not in UPDATE_MODES:
        raise RequestError(422, f"`update_mode` must be one of {', '.join(UPDATE_MODES)}, got {update_mode!r}")
    do_sample = data.get("do_sample", GenerateRequest.do_sample)
    if not isinstance(do_sample, bool):
        raise RequestError(422, f"`do_sample` must be true or false, got {do_sample!r}")
    return GenerateRequest(prompt, max_new_tokens, update_mode, do_sample)


def parse_update_request(body: bytes, limits: Limits) -> str:
    """Validate a `POST /v1/sessions/{id}/updates` body; returns the correction text."""
    data = _json_object(body)
    _reject_unknown_fields(data, ("text",))
    return _text_field(data, "text", limits.max_update_chars)


# ----------------------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------------------


class SessionRegistry:
    """Live sessions by id; a session leaves when its stream ends (done, failed, or the client went away)."""

    def __init__(self) -> None:
        self._sessions: dict[str, LiveGeneration] = {}
        self._lock = threading.Lock()

    def add(self, generation: LiveGeneration, capacity: int) -> str | None:
        """Register `generation` under a new id; None when `capacity` sessions are already running."""
        with self._lock:
            if len(self._sessions) >= capacity:
                return None
            session_id = uuid.uuid4().hex
            self._sessions[session_id] = generation
            return session_id

    def get(self, session_id: str) -> LiveGeneration | None:
        with self._lock:
            return self._sessions.get(session_id)

    def remove(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


def sse(event: Event) -> bytes:
    """One Server-Sent Event: a `data:` line holding the event's JSON."""
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def create_app(
    model: torch.nn.Module,
    tokenizer,
    model_name: str = "",
    limits: Limits | None = None,
    generate_kwargs: dict[str, Any] | None = None,
) -> FastAPI:
    """The FastAPI app serving `model` (see the module docstring for the endpoints); `generate_kwargs` are passed
    to every `generate` call (e.g. a `repetition_penalty` the checkpoint wants)."""
    limits = limits or Limits()
    sessions = SessionRegistry()
    app = FastAPI(title="Duplex streaming server")
    app.state.sessions = sessions

    @app.exception_handler(RequestError)
    async def refuse(_request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "sessions": len(sessions)}

    @app.post("/v1/generate")
    async def generate(request: Request) -> StreamingResponse:
        params = parse_generate_request(await read_body(request, limits.max_body_bytes), limits)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the server is shutting down
                pass

        generation = LiveGeneration(
            model,
            tokenizer,
            params.prompt,
            emit=emit,
            max_new_tokens=params.max_new_tokens,
            update_mode=params.update_mode,
            do_sample=params.do_sample,
            generate_kwargs=generate_kwargs,
        )
        session_id = sessions.add(generation, limits.max_sessions)
        if session_id is None:
            raise RequestError(429, f"{limits.max_sessions} sessions are already running; retry later")
        generation.start()
        return StreamingResponse(
            _stream_session(session_id, generation, events, sessions),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/sessions/{session_id}/updates", status_code=202)
    async def post_update(session_id: str, request: Request) -> dict:
        text = parse_update_request(await read_body(request, limits.max_body_bytes), limits)
        generation = sessions.get(session_id)
        if generation is None:
            raise RequestError(404, f"session `{session_id}`: unknown or finished")
        try:
            generation.correct(text)
        except SessionFinished:
            raise RequestError(404, f"session `{session_id}`: unknown or finished") from None
        return {"queued": True}

    return app


async def _stream_session(session_id: str, generation: LiveGeneration, events: asyncio.Queue, sessions):
    """The session's SSE body: its id, then the generation's events up to done. However it ends (done, or the client
    disconnecting and the body being cancelled), generation stops and the session is freed."""
    try:
        yield sse({"session": session_id})
        while True:
            event = await events.get()
            yield sse(event)
            if "done" in event or "error" in event:
                return
    finally:
        generation.cancel()
        sessions.remove(session_id)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or Hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--max-new-tokens", type=int, default=Limits.max_new_tokens, help="largest accepted request")
    parser.add_argument("--max-prompt-chars", type=int, default=Limits.max_prompt_chars)
    parser.add_argument("--max-update-chars", type=int, default=Limits.max_update_chars)
    parser.add_argument("--max-sessions", type=int, default=Limits.max_sessions, help="concurrent sessions")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per generation (default 1: sessions already run in parallel threads, and more threads per "
        "session oversubscribe the cores)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    limits = Limits(args.max_new_tokens, args.max_prompt_chars, args.max_update_chars, args.max_sessions)
    app = create_app(model, tokenizer, model_name=args.model, limits=limits)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def iter_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Parse the events of a Server-Sent Events response from its text lines (used by the client examples)."""
    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])


if __name__ == "__main__":
    main()
