"""Streaming HTTP server for Duplex, OpenAI-compatible: a chat completion streams as any LLM server's does, and a
correction posted to it from another client lands mid-stream, while the model writes.

    python serve_duplex.py --trust-remote-code [--model checkpoints/duplex-tiny] [--host 127.0.0.1] [--port 8000]

Endpoints (JSON in; streams are Server-Sent Events, `data: {json}` lines):

    GET  /v1/models                                the served model, in OpenAI's list shape
    POST /v1/chat/completions                      OpenAI's request (`model`, `messages`, `max_tokens` /
                                                   `max_completion_tokens`, `temperature`, `top_p`, `stop`, `seed`,
                                                   `stream`, `stream_options`): a `chat.completion`, or a stream of
                                                   `chat.completion.chunk` events then `data: [DONE]`. Where each
                                                   correction landed travels in the extension field `duplex`
    POST /v1/chat/completions/{id}/updates         {"text"} -> 202; a correction for the live completion `id`
    POST /v1/generate                              the raw stream: {"prompt", "max_new_tokens", "update_mode",
                                                   "do_sample"} -> {"session": id}, {"token": str, "index": n},
                                                   {"landed": {...}}, {"done": true, ...} events
    POST /v1/sessions/{id}/updates                 {"text"} -> 202; a correction for the live session `id`
    GET  /health                                   {"status": "ok", "model": ..., "sessions": n}

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` with 400 (a bad field, named in `param`), 401
(no or a wrong API key), 403 (a foreign `Origin`), 404, 413 (body too large), 415 (not `application/json`), 421 (a
`Host` not served) or 429 (too many sessions or corrections). Every live session is a row of one batched decoding
loop (`engine_duplex.DuplexEngine`, shared with the Gradio demo `app.py`); each one's greedy output equals offline
`generate` with the same updates at the same tokens. A client that disconnects, or lets `max_buffered_events` of its
own events pile up unread, ends its own session only.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_duplex import (
    ContextLengthError,
    DuplexEngine,
    EngineSession,
    Event,
    SamplingOptions,
    SessionFinished,
    TooManyCorrections,
    check_text,
)
from generation_duplex import UPDATE_MODES

logger = logging.getLogger("serve_duplex")
DEFAULT_MODEL = str(Path(__file__).resolve().parent / "checkpoints" / "duplex-tiny")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


class RemoteCodeRefused(ValueError):
    """The checkpoint ships its own Python code and `trust_remote_code` was not given."""


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else the first GPU when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    backbone: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a checkpoint (local path or Hub id, at `revision`) and its tokenizer the way a user does, in eval mode;
    `backbone` loads an adapter-only checkpoint on a copy of its backbone stored elsewhere (`backbone_name_or_path`).

    Duplex checkpoints carry their modeling code (`auto_map`): it runs only with `trust_remote_code=True`, otherwise
    `RemoteCodeRefused`. `dtype="auto"` keeps the checkpoint's dtype on the CPU and uses bfloat16 on a GPU that
    supports it.
    """
    target = pick_device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if target.type == "cuda" and torch.cuda.is_bf16_supported() else None
    else:
        torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    model_kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    if backbone is not None:
        model_kwargs["backbone_name_or_path"] = backbone
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs, **model_kwargs)
    except ValueError as error:
        if not trust_remote_code and "trust_remote_code" in str(error):
            raise RemoteCodeRefused(
                f"{name_or_path} ships its own model code; read it, then pass --trust-remote-code to run it "
                "(and --revision to pin the version you read)"
            ) from None
        raise
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    return model.to(target).eval(), tokenizer


def served_name(name_or_path: str) -> str:
    """The model id clients see: a local folder's name (never its absolute path), or the Hub id."""
    path = Path(name_or_path)
    return path.name if path.exists() else name_or_path


# ----------------------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one client may ask for; anything beyond is refused with a 4xx naming the field or the limit."""

    max_new_tokens: int = 256
    max_update_chars: int = 500
    max_sessions: int = 32
    max_buffered_events: int = 4096  # per session: a client this far behind is too slow, and its session ends
    max_corrections: int = 16  # per session, in all
    max_pending_corrections: int = 4  # per session, not yet landed (all land at the next step)
    max_messages: int = 64
    max_body_bytes: int = 256 * 1024
    prefill_tokens_per_step: int = 512  # prompt tokens prefilled between two decoding steps (at least one prompt)


class RequestError(Exception):
    """A request the server refuses: `status` (4xx), a message naming the offending field, and OpenAI's `param` and
    `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    421: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; a body over `limit` bytes is refused (413) without being read to its end."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    return bytes(body)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def json_object(body: bytes) -> dict:
    """The body as a JSON object; anything else (invalid JSON or UTF-8, NaN, numbers past 4,300 digits, nesting
    deeper than Python's recursion limit) is a 400."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise RequestError(400, f"the body is not valid JSON (line {error.lineno}, column {error.colno})") from None
    except (ValueError, RecursionError, UnicodeDecodeError):  # huge numbers, deep nesting, bad UTF-8, NaN
        raise RequestError(
            400, "the body is not JSON this server reads (bad UTF-8, NaN, a huge number or deep nesting)"
        ) from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(data).__name__}")
    return data


def reject_unknown_fields(data: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RequestError(400, f"unknown field `{unknown[0]}` (accepted: {', '.join(known)})", param=unknown[0])


def text_field(data: dict, name: str, limit: int | None = None) -> str:
    """A required, non-empty, valid-Unicode string field of at most `limit` characters."""
    if name not in data:
        raise RequestError(400, f"`{name}` is required", param=name)
    try:
        value = check_text(data[name], name)
    except ValueError as error:
        raise RequestError(400, str(error), param=name) from None
    if limit is not None and len(value) > limit:
        raise RequestError(400, f"`{name}` has {len(value)} characters; the limit is {limit}", param=name)
    return value


def int_field(data: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    """An integer field in [low, high] (a bool is not an integer)."""
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(400, f"`{name}` must be an integer, got {type(value).__name__}", param=name)
    if not low <= value <= high:
        raise RequestError(400, f"`{name}` must be between {low} and {high}, got {value}", param=name)
    return value


def number_field(data: dict, name: str, low: float, high: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RequestError(400, f"`{name}` must be a number, got {type(value).__name__}", param=name)
    if not low <= value <= high:
        raise RequestError(400, f"`{name}` must be between {low} and {high}, got {value}", param=name)
    return float(value)


def bool_field(data: dict, name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(400, f"`{name}` must be true or false, got {type(value).__name__}", param=name)
    return value


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    max_new_tokens: int = 64
    update_mode: str = "workspace"
    do_sample: bool = False


def parse_generate_request(body: bytes, limits: Limits) -> GenerateRequest:
    """Validate a `POST /v1/generate` body; raises `RequestError` naming the first bad field."""
    data = json_object(body)
    reject_unknown_fields(data, ("prompt", "max_new_tokens", "update_mode", "do_sample"))
    prompt = text_field(data, "prompt")
    max_new_tokens = int_field(data, "max_new_tokens", GenerateRequest.max_new_tokens, 1, limits.max_new_tokens)
    update_mode = data.get("update_mode", GenerateRequest.update_mode)
    if update_mode not in UPDATE_MODES:
        raise RequestError(
            400, f"`update_mode` must be one of {', '.join(UPDATE_MODES)}, got {update_mode!r}", param="update_mode"
        )
    return GenerateRequest(prompt, max_new_tokens, update_mode, bool_field(data, "do_sample", False))


def parse_update_request(body: bytes, limits: Limits) -> str:
    """Validate a correction's body (`{"text": ...}`); returns the correction text."""
    data = json_object(body)
    reject_unknown_fields(data, ("text",))
    return text_field(data, "text", limits.max_update_chars)


CHAT_FIELDS = (
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "n",
    "user",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
)
ROLES = ("system", "developer", "user", "assistant")
SEED_LIMIT = 2**63 - 1


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def message_content(message: dict, where: str) -> str:
    """A message's text: a string, or OpenAI's list of `{"type": "text", "text": ...}` parts joined."""
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(400, f"`{where}.content[{j}]`: only text parts are supported", param=where)
            parts.append(part["text"])
        content = "".join(parts)
    if message.get("role") == "assistant" and content in (None, ""):
        return ""
    try:
        return check_text(content, f"{where}.content")
    except ValueError as error:
        raise RequestError(400, str(error), param=f"{where}.content") from None


def parse_chat_request(body: bytes, limits: Limits, model_name: str) -> ChatRequest:
    """Validate a `POST /v1/chat/completions` body as OpenAI does; raises `RequestError` naming the first bad field
    (404 for another model)."""
    data = json_object(body)
    reject_unknown_fields(data, CHAT_FIELDS)
    model = data.get("model")
    if not isinstance(model, str):
        raise RequestError(400, "`model` is required: the id that GET /v1/models lists", param="model")
    if model != model_name:
        raise RequestError(
            404,
            f"the model `{model[:100]}` does not exist; this server serves `{model_name}`",
            param="model",
            code="model_not_found",
        )
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "`messages` must be a non-empty list of messages", param="messages")
    if len(messages) > limits.max_messages:
        raise RequestError(
            400, f"`messages` has {len(messages)} messages; the limit is {limits.max_messages}", param="messages"
        )
    rendered = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(400, f"`{where}.role` must be one of {', '.join(ROLES)}", param=f"{where}.role")
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise RequestError(400, f"`{where}.{unknown[0]}` is not supported", param=f"{where}.{unknown[0]}")
        role = "system" if message["role"] == "developer" else message["role"]
        rendered.append({"role": role, "content": message_content(message, where)})
    if rendered[-1]["role"] == "assistant":
        raise RequestError(400, "the last message must not be the assistant's", param="messages")
    max_tokens = int_field(data, "max_completion_tokens", None, 1, limits.max_new_tokens)
    if max_tokens is None:
        max_tokens = int_field(data, "max_tokens", None, 1, limits.max_new_tokens)
    int_field(data, "n", 1, 1, 1)  # one choice per completion
    for name in ("frequency_penalty", "presence_penalty"):
        number_field(data, name, 0.0, 0.0)  # only the default, 0
    if bool_field(data, "logprobs", False):
        raise RequestError(400, "`logprobs` is not supported", param="logprobs")
    if "user" in data and not isinstance(data["user"], str):
        raise RequestError(400, "`user` must be a string", param="user")
    stop = data.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4:
        raise RequestError(400, "`stop` must be a string or a list of at most 4 strings", param="stop")
    for text in stop:
        try:
            check_text(text, "stop")
        except ValueError as error:
            raise RequestError(400, str(error), param="stop") from None
    options = data.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError(400, "`stream_options` takes only `include_usage`", param="stream_options")
    return ChatRequest(
        rendered,
        max_tokens,
        number_field(data, "temperature", 0.0, 2.0),
        number_field(data, "top_p", 0.0, 1.0),
        tuple(stop),
        int_field(data, "seed", None, -SEED_LIMIT, SEED_LIMIT),
        bool_field(data, "stream", False),
        bool_field(options, "include_usage", False),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Sessions and their event streams
# ----------------------------------------------------------------------------------------------------------------------


class SessionRegistry:
    """Live sessions by id; a session leaves when its stream ends (done, failed, or the client went away). A place
    is reserved before the session starts, so that no more than `capacity` run at once. An id is the capability to
    correct its session: 128 random bits, never listed."""

    def __init__(self) -> None:
        self._sessions: dict[str, EngineSession | None] = {}
        self._lock = threading.Lock()

    def reserve(self, capacity: int, prefix: str = "") -> str | None:
        """A new session id with its place reserved; None when `capacity` sessions are already running."""
        with self._lock:
            if len(self._sessions) >= capacity:
                return None
            session_id = prefix + uuid.uuid4().hex
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


def ends(event: Event) -> bool:
    """Whether `event` is a session's last."""
    return "done" in event or "error" in event


class EventChannel:
    """Carries one session's events from the engine's thread to its response. The queue is unbounded so that the
    final event is never dropped; a client that lets `max_backlog` events pile up unread has its own session
    cancelled (a few more events follow, then `done`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_backlog: int):
        self.loop, self.max_backlog = loop, max_backlog
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.session: EngineSession | None = None

    def emit(self, event: Event) -> None:
        """The engine's `emit` (its thread): hand the event to the event loop, never blocking."""
        try:
            self.loop.call_soon_threadsafe(self._put, event)
        except RuntimeError:  # the server is shutting down
            pass

    def _put(self, event: Event) -> None:
        self.queue.put_nowait(event)
        if self.queue.qsize() > self.max_backlog and self.session is not None and not ends(event):
            self.session.cancel()

    async def batches(self) -> AsyncIterator[list[Event]]:
        """The events as they come, what queued meanwhile in one batch, up to and including the last one."""
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and not ends(batch[-1]):
                batch.append(self.queue.get_nowait())
            yield batch
            if ends(batch[-1]):
                return


def sse(event: Event | str) -> bytes:
    """One Server-Sent Event: a `data:` line holding the event's JSON (or the literal `[DONE]`)."""
    data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}


# ----------------------------------------------------------------------------------------------------------------------
# The door: Host, Origin, API key and Content-Type, before any route
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """Who may talk to the server: `api_key` (bearer, None: anyone who reaches it), the `Host` names it answers to
    (None: any, for a public bind behind an API key) and the extra `Origin`s a browser may call it from (a page of the
    server's own origin always may)."""

    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_NAMES
    allowed_origins: tuple[str, ...] = ()


def host_name(value: str) -> str:
    """The host of a `Host` header value (`name:port`, `[v6]:port`), lowercased."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Door:
    """ASGI middleware: refuses, before routing, requests for another `Host` (DNS rebinding, 421), from a foreign
    `Origin` (a web page calling a local server, 403), without the API key (401), and POSTs that are not
    `application/json` (a cross-origin `text/plain` form needs no preflight, 415). `/health` needs no key."""

    def __init__(self, app: ASGIApp, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        allowed = self.access.allowed_hosts
        if allowed is not None and host_name(host) not in allowed:
            return error_response(421, "this server does not answer to that Host", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and origin != "null":
            parts = urlsplit(origin)
            if parts.netloc.lower() != host.lower() and origin.rstrip("/") not in self.access.allowed_origins:
                return error_response(
                    403, f"requests from the origin {origin[:100]} are not allowed", code="origin_not_allowed"
                )
        elif origin == "null":
            return error_response(403, "requests from an opaque origin are not allowed", code="origin_not_allowed")
        if self.access.api_key is not None and scope["path"] != "/health":
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.access.api_key.encode()
            ):
                return error_response(
                    401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key"
                )
        if scope["method"] == "POST":
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                return error_response(
                    415,
                    "the body must be sent as Content-Type: application/json",
                    param="Content-Type",
                    code="unsupported_media_type",
                )
        return None


# ----------------------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ServerContext:
    """What every route shares: the engine, the live sessions, the limits and the served model's id."""

    engine: DuplexEngine
    tokenizer: Any
    model_name: str
    limits: Limits
    session_options: dict[str, Any] = field(default_factory=dict)
    sessions: SessionRegistry = field(default_factory=SessionRegistry)
    created: int = field(default_factory=lambda: int(time.time()))

    def open_session(self, prompt: str, prefix: str, **submit: Any) -> tuple[str, EngineSession, EventChannel]:
        """Reserve a place (429 when full), submit to the engine (400 for a prompt it refuses), register the id."""
        session_id = self.sessions.reserve(self.limits.max_sessions, prefix)
        if session_id is None:
            raise RequestError(
                429, f"{self.limits.max_sessions} sessions are already running; retry later", code="too_many_sessions"
            )
        channel = EventChannel(asyncio.get_running_loop(), self.limits.max_buffered_events)
        try:
            session = self.engine.submit(prompt, emit=channel.emit, **submit, **self.session_options)
        except ContextLengthError as error:
            self.sessions.remove(session_id)
            raise RequestError(
                400,
                f"This model's maximum context length is {error.max_context} tokens: {error}",
                param="messages" if prefix else "prompt",
                code="context_length_exceeded",
            ) from None
        except Exception:
            self.sessions.remove(session_id)
            raise
        channel.session = session
        self.sessions.set(session_id, session)
        return session_id, session, channel

    def correct(self, session_id: str, body: bytes, what: str) -> None:
        """Queue a correction for a live session: 404 once it is unknown or finished, 429 over the caps."""
        text = parse_update_request(body, self.limits)
        session = self.sessions.get(session_id)
        gone = RequestError(404, f"{what} `{session_id[:100]}`: unknown or finished", code="not_found")
        if session is None:
            raise gone
        try:
            session.correct(text)
        except SessionFinished:
            raise gone from None
        except TooManyCorrections as error:
            raise RequestError(429, str(error), param="text", code="too_many_corrections") from None
        except ValueError as error:
            raise RequestError(400, str(error), param="text") from None


def create_app(
    model: torch.nn.Module,
    tokenizer,
    model_name: str = "duplex",
    limits: Limits | None = None,
    session_options: dict[str, Any] | None = None,
    access: Access | None = None,
    docs: bool = False,
    engine_options: dict[str, Any] | None = None,
) -> FastAPI:
    """The FastAPI app serving `model` as `model_name` (see the module docstring) from one `DuplexEngine`, started
    and stopped with the app. `session_options` go to every `DuplexEngine.submit` (e.g. `min_new_tokens`),
    `engine_options` to the engine (e.g. `pace_s`); `docs` serves /docs and /openapi.json."""
    limits = limits or Limits()
    engine = DuplexEngine(
        model,
        tokenizer,
        max_batch_size=limits.max_sessions,
        max_corrections=limits.max_corrections,
        max_pending_corrections=limits.max_pending_corrections,
        prefill_tokens_per_step=limits.prefill_tokens_per_step,
        **(engine_options or {}),
    )
    context = ServerContext(engine, tokenizer, model_name, limits, dict(session_options or {}))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        engine.close()

    urls = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Duplex streaming server", lifespan=lifespan, **urls)
    app.add_middleware(Door, access=access or Access())
    app.state.sessions, app.state.engine, app.state.context = context.sessions, engine, context

    @app.exception_handler(RequestError)
    async def refuse(_request: Request, error: RequestError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, _error: Exception) -> JSONResponse:
        return error_response(500, "internal server error; the server log has the details")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "sessions": len(context.sessions)}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(context)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != model_name:
            raise RequestError(404, f"the model `{model_id[:100]}` does not exist", code="model_not_found")
        return model_card(context)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> StreamingResponse | JSONResponse:
        chat = parse_chat_request(await read_body(request, limits.max_body_bytes), limits, model_name)
        return await start_chat(context, chat)

    @app.post("/v1/chat/completions/{completion_id}/updates", status_code=202)
    async def post_chat_update(completion_id: str, request: Request) -> dict:
        context.correct(completion_id, await read_body(request, limits.max_body_bytes), "completion")
        return {"id": completion_id, "queued": True}

    @app.post("/v1/generate")
    async def generate(request: Request) -> StreamingResponse:
        params = parse_generate_request(await read_body(request, limits.max_body_bytes), limits)
        session_id, session, channel = context.open_session(
            params.prompt,
            "",
            max_new_tokens=params.max_new_tokens,
            update_mode=params.update_mode,
            do_sample=params.do_sample,
        )
        return event_stream(raw_events(session_id, session, channel, context.sessions))

    @app.post("/v1/sessions/{session_id}/updates", status_code=202)
    async def post_update(session_id: str, request: Request) -> dict:
        context.correct(session_id, await read_body(request, limits.max_body_bytes), "session")
        return {"queued": True}

    return app


def model_card(context: ServerContext) -> dict:
    return {"id": context.model_name, "object": "model", "created": context.created, "owned_by": "duplex"}


def event_stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def raw_events(session_id: str, session: EngineSession, channel: EventChannel, sessions: SessionRegistry):
    """`/v1/generate`'s SSE body: the session's id, then the engine's events up to done. However it ends (done, or
    the client disconnecting and the body being cancelled), generation stops and the session is freed."""
    try:
        yield sse({"session": session_id})
        async for batch in channel.batches():
            yield b"".join(sse(event) for event in batch)
    finally:
        session.cancel()
        sessions.remove(session_id)


# ----------------------------------------------------------------------------------------------------------------------
# Chat completions
# ----------------------------------------------------------------------------------------------------------------------


async def start_chat(context: ServerContext, chat: ChatRequest) -> StreamingResponse | JSONResponse:
    """Render the messages with the chat template, start the session, and answer as a stream or at its end."""
    if getattr(context.tokenizer, "chat_template", None) is None:
        raise RequestError(
            400,
            "this model's tokenizer has no chat template: use POST /v1/generate with a prompt",
            param="messages",
            code="no_chat_template",
        )
    prompt = context.tokenizer.apply_chat_template(chat.messages, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(context.tokenizer(prompt, add_special_tokens=True)["input_ids"])
    room = context.engine.max_context - prompt_tokens
    if room < 1:
        raise RequestError(
            400,
            f"This model's maximum context length is {context.engine.max_context} tokens; the messages take "
            f"{prompt_tokens}",
            param="messages",
            code="context_length_exceeded",
        )
    max_tokens = chat.max_tokens or min(context.limits.max_new_tokens, room)
    do_sample = chat.temperature is not None and chat.temperature > 0
    completion_id, session, channel = context.open_session(
        prompt,
        "chatcmpl-",
        max_new_tokens=max_tokens,
        do_sample=do_sample,
        stop=chat.stop,
        sampling=SamplingOptions(chat.temperature, chat.top_p, None, chat.seed),
    )
    completion = ChatCompletion(completion_id, context, session, channel, chat, prompt_tokens)
    if chat.stream:
        return event_stream(completion.chunks())
    return JSONResponse(await completion.response())


@dataclass
class ChatCompletion:
    """One chat completion in OpenAI's shape, built from its session's events."""

    id: str
    context: ServerContext
    session: EngineSession
    channel: EventChannel
    chat: ChatRequest
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, delta: dict, finish_reason: str | None = None, **extra: Any) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        head = {"id": self.id, "object": "chat.completion.chunk", "created": self.created}
        return {**head, "model": self.context.model_name, "choices": [choice], **extra}

    def usage(self, done: Event) -> dict:
        completion = done["tokens"]
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    async def chunks(self) -> AsyncIterator[bytes]:
        """The SSE body: a role chunk, a content chunk per piece of text, a `duplex` chunk per landing, the final
        chunk with `finish_reason` and every landing, the usage chunk if asked for, then `[DONE]`."""
        try:
            yield sse(self.chunk({"role": "assistant", "content": ""}))
            sent = ""
            async for batch in self.channel.batches():
                out = []
                for event in batch:
                    if event.get("token"):
                        sent += event["token"]
                        out.append(self.chunk({"content": event["token"]}))
                    elif "landed" in event:
                        out.append(self.chunk({}, duplex={"landed": event["landed"]}))
                    elif "done" in event:
                        tail = event["text"][len(sent) :]  # text held back while it could begin a stop string
                        delta = {"content": tail} if tail else {}
                        reason = FINISH_REASONS[event["stopped"]]
                        out.append(self.chunk(delta, reason, duplex={"landings": event["landings"]}))
                        if self.chat.include_usage:
                            out.append({**self.chunk({}), "choices": [], "usage": self.usage(event)})
                    elif "error" in event:
                        out.append(error_body(500, event["error"]))
                yield b"".join(sse(chunk) for chunk in out)
            yield sse("[DONE]")
        finally:
            self.session.cancel()
            self.context.sessions.remove(self.id)

    async def response(self) -> dict:
        """The whole `chat.completion` once the session ends."""
        try:
            async for batch in self.channel.batches():
                last = batch[-1]
        finally:
            self.session.cancel()
            self.context.sessions.remove(self.id)
        if "error" in last:
            raise RequestError(500, last["error"])
        message = {"role": "assistant", "content": last["text"]}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": FINISH_REASONS[last["stopped"]]}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.context.model_name,
            "choices": [choice],
            "usage": self.usage(last),
            "duplex": {"landings": last["landings"]},
        }


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or Hub id")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model code the checkpoint ships (Duplex checkpoints need it; read it first)",
    )
    parser.add_argument("--revision", default=None, help="the Hub revision (commit) of --model to load")
    parser.add_argument("--backbone", default=None, help="for an adapter-only --model: where its backbone is stored")
    parser.add_argument("--served-model-name", default=None, help="the id clients use (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("DUPLEX_API_KEY"),
        help="require `Authorization: Bearer KEY` (default: $DUPLEX_API_KEY)",
    )
    parser.add_argument(
        "--insecure-no-api-key",
        action="store_true",
        help="serve a non-loopback --host without an API key (anyone who reaches it may use it)",
    )
    parser.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=None,
        help="Host names to answer to (default: loopback names; any, on a non-loopback --host)",
    )
    parser.add_argument("--allowed-origins", nargs="+", default=[], help="browser origins allowed besides the server's")
    parser.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--max-new-tokens", type=int, default=Limits.max_new_tokens, help="largest accepted request")
    parser.add_argument("--max-update-chars", type=int, default=Limits.max_update_chars)
    parser.add_argument("--max-sessions", type=int, default=Limits.max_sessions, help="concurrent sessions")
    parser.add_argument("--max-corrections", type=int, default=Limits.max_corrections, help="per session")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the decoding loop (default: torch's)")
    return parser.parse_args(argv)


def access_from_args(args: argparse.Namespace) -> Access:
    """The door the command line asks for; a non-loopback bind without an API key is refused unless insisted on."""
    if not is_loopback(args.host) and args.api_key is None:
        if not args.insecure_no_api_key:
            raise SystemExit(
                f"refusing to serve {args.host} without an API key: pass --api-key KEY (or set DUPLEX_API_KEY), "
                "or --insecure-no-api-key to let anyone who reaches it use it"
            )
        logger.warning("SERVING %s WITHOUT AN API KEY: anyone who can reach it can use it", args.host)
    hosts = args.allowed_hosts
    if hosts is None:
        hosts = [*LOOPBACK_NAMES, args.host.lower()] if is_loopback(args.host) else None
    return Access(args.api_key, tuple(h.lower() for h in hosts) if hosts else None, tuple(args.allowed_origins))


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO)
    args = parse_args(argv)
    access = access_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model(
            args.model, args.device, args.dtype, args.trust_remote_code, args.revision, args.backbone
        )
    except RemoteCodeRefused as error:
        raise SystemExit(str(error)) from None
    limits = Limits(
        max_new_tokens=args.max_new_tokens,
        max_update_chars=args.max_update_chars,
        max_sessions=args.max_sessions,
        max_corrections=args.max_corrections,
    )
    name = args.served_model_name or served_name(args.model)
    app = create_app(model, tokenizer, model_name=name, limits=limits, access=access, docs=args.docs)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def iter_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Parse the events of a Server-Sent Events response from its text lines (used by the client examples)."""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: ") :])


if __name__ == "__main__":
    main()
