"""Helpers of the server tests: the shipped checkpoint served by a real uvicorn on a port it binds itself, and
Server-Sent Events read back."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn

from serve_duplex import DEFAULT_MODEL, load_model

MODEL_NAME = "duplex-tiny"


def load_shipped():
    """The shipped tiny checkpoint, as `python serve_duplex.py --trust-remote-code` loads it."""
    return load_model(DEFAULT_MODEL, device="cpu", trust_remote_code=True)


def serve(app) -> Iterator[str]:
    """`app` on a real uvicorn in a thread, on a port of 127.0.0.1 that uvicorn binds itself (port 0: no race with
    another process for a port chosen beforehand); yields its base url."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def events(response: httpx.Response) -> Iterator[dict]:
    """The JSON events of a Server-Sent Events response (the `[DONE]` sentinel left out)."""
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: ") :])


def error_of(reply: httpx.Response) -> dict:
    """The OpenAI-shaped error object of a refused request."""
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def assert_refused(reply: httpx.Response, status: int, field: str) -> dict:
    """`reply` is a `status` whose error object names `field` (in its message or its `param`)."""
    assert reply.status_code == status, reply.text
    error = error_of(reply)
    assert field in error["message"] or field == error["param"], error
    return error
