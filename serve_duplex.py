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
correction. Bad input is a 4xx with `{"error": message}` naming the field. Every live session is a row of one batched
decoding loop (`engine_duplex.DuplexEngine`, shared with the Gradio demo `app.py`): sessions join and leave it
mid-flight, and each one's greedy output equals offline `generate` with the same updates. A client that disconnects,
or reads its events too slowly to keep up, ends its session and frees its row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_duplex import DuplexEngine, EngineSession, Event, SessionFinished
from generation_duplex import UPDATE_MODES

DEFAULT_MODEL = str(Path(__file__).resolve().parent / "checkpoints" / "duplex-tiny")


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
    max_buffered_events: int = 4096  # per session: a client this far behind is too slow, and its session ends

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
    """Live sessions by id; a session leaves when its stream ends (done, failed, or the client went away). A place
    is reserved before the session starts, so that no more than `capacity` run at once."""

    def __init__(self) -> None:
        self._sessions: dict[str, EngineSession | None] = {}
        self._lock = threading.Lock()

    def reserve(self, capacity: int) -> str | None:
        """A new session id with its place reserved; None when `capacity` sessions are already running."""
        with self._lock:
            if len(self._sessions) >= capacity:
                return None
            session_id = uuid.uuid4().hex
            self._sessions[session_id] = None
            return session_id

    def set(self, session_id: str, session: EngineSession) -> None:
        with self._lock:
            self._sessions[session_id] = session

    def get(self, session_id: str) -> EngineSession | None:
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
    session_options: dict[str, Any] | None = None,
) -> FastAPI:
    """The FastAPI app serving `model` (see the module docstring for the endpoints) from one `DuplexEngine`, started
    and stopped with the app; `session_options` go to every `DuplexEngine.submit` (e.g. `min_new_tokens`)."""
    limits = limits or Limits()
    sessions = SessionRegistry()
    engine = DuplexEngine(model, tokenizer, max_batch_size=limits.max_sessions)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="Duplex streaming server", lifespan=lifespan)
    app.state.sessions, app.state.engine = sessions, engine

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
        session_id = sessions.reserve(limits.max_sessions)
        if session_id is None:
            raise RequestError(429, f"{limits.max_sessions} sessions are already running; retry later")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue(maxsize=limits.max_buffered_events)
        holder: list[EngineSession] = []

        def enqueue(event: Event) -> None:  # on the event loop: never blocks the engine
            try:
                events.put_nowait(event)
            except asyncio.QueueFull:  # the client does not keep up: its session ends
                holder[0].cancel()

        def emit(event: Event) -> None:  # on the engine's thread
            try:
                loop.call_soon_threadsafe(enqueue, event)
            except RuntimeError:  # the server is shutting down
                pass

        session = engine.submit(
            params.prompt,
            emit=emit,
            max_new_tokens=params.max_new_tokens,
            update_mode=params.update_mode,
            do_sample=params.do_sample,
            **(session_options or {}),
        )
        holder.append(session)
        sessions.set(session_id, session)
        return StreamingResponse(
            _stream_session(session_id, session, events, sessions),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/sessions/{session_id}/updates", status_code=202)
    async def post_update(session_id: str, request: Request) -> dict:
        text = parse_update_request(await read_body(request, limits.max_body_bytes), limits)
        session = sessions.get(session_id)
        if session is None:
            raise RequestError(404, f"session `{session_id}`: unknown or finished")
        try:
            session.correct(text)
        except SessionFinished:
            raise RequestError(404, f"session `{session_id}`: unknown or finished") from None
        return {"queued": True}

    return app


def _ends(event: Event) -> bool:
    """Whether `event` is a session's last."""
    return "done" in event or "error" in event


async def _stream_session(session_id: str, session: EngineSession, events: asyncio.Queue, sessions):
    """The session's SSE body: its id, then the engine's events up to done. However it ends (done, or the client
    disconnecting and the body being cancelled), generation stops and the session is freed."""
    try:
        yield sse({"session": session_id})
        while True:
            batch = [await events.get()]
            while not events.empty() and not _ends(batch[-1]):  # what queued meanwhile goes out in one write
                batch.append(events.get_nowait())
            yield b"".join(sse(event) for event in batch)
            if _ends(batch[-1]):
                return
    finally:
        session.cancel()
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
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the decoding loop (default: torch's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    if args.threads:
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
