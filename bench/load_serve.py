"""Load test of the streaming server: concurrent sessions, each correcting its answer twice while it streams.

    python bench/load_serve.py                                   # starts serve_duplex.py on 127.0.0.1 itself
    python bench/load_serve.py --sessions 1 8 32 --duration 30   # one load after the other, side by side
    python bench/load_serve.py --url http://127.0.0.1:8000       # a server that is already running
    python bench/load_serve.py --endpoint generate               # the raw /v1/generate stream instead of chat
    python bench/load_serve.py --abuse --sessions 8              # the same load quiet, then beside hostile clients

Sessions are OpenAI chat completions (`POST /v1/chat/completions`, streamed; corrections to
`/v1/chat/completions/{id}/updates`), or with `--endpoint generate` raw `/v1/generate` streams.

For each count of `--sessions`, that many clients run at once for `--duration` seconds; each starts a generation,
posts its first correction once token `--first-at` has streamed, its second once the first has landed and two more
tokens have streamed, reads the stream to its end, and starts over. Reported (p50 / p95 over all sessions and
corrections):
  time to first token   request sent -> first token event received
  correction latency    correction POST sent -> its landing event received (as a client sees it)
  tokens/s              per session (tokens after the first / time since the first) and in total, and the total
                        as a multiple of the first load's (run one session first to get "x one session")
Checked: every session's landings are exactly the corrections it sent (isolation: each client's texts are its own),
and every accepted correction is reported in its session's done event (nothing lost). Exit status 1 if either fails.

`--abuse` runs each load twice, quiet and then beside hostile clients: a flood of corrections (`--flood` of them, as
fast as they go, into live sessions), prompts and corrections holding lone surrogates, prompts over the model's
context (4,000 emoji) and malformed JSON. It prints the ordinary sessions' figures for both runs, what the hostile
requests got (every one should be a 4xx), and, when it started the server itself, the server's memory at the start
and at its peak. Exit status 1 also if an ordinary session failed or a hostile request got anything but a 4xx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Name 5 tools.\n", "Write to Anna about rain.\n", "Say apple 5 times.\n", "Name 4 fruits.\n"]
JSON = {"content-type": "application/json"}


@dataclass
class SessionResult:
    client: int
    session: str = ""
    ttft_s: float | None = None
    tokens: int = 0
    decode_s: float = 0.0
    sent: list[str] = field(default_factory=list)  # corrections accepted with 202
    latencies_s: list[float] = field(default_factory=list)
    landed: list[str] = field(default_factory=list)  # texts of the landing events it saw
    reported: list[dict] = field(default_factory=list)  # the done event's landings
    error: str | None = None


def corrections_for(client: int, round_: int) -> tuple[str, str]:
    """Two corrections that no other client sends (isolation is checked on their texts)."""
    return f"Stop at {12 + client}.", f"Say word{client}x{round_} instead."


async def post_correction(client: httpx.AsyncClient, url: str, text: str, result: SessionResult) -> float:
    started = time.perf_counter()
    reply = await client.post(url, json={"text": text})
    if reply.status_code == 202:
        result.sent.append(text)
    return started


async def one_session(client: httpx.AsyncClient, index: int, round_: int, args) -> SessionResult:
    """Stream one session, correcting it twice."""
    if args.endpoint == "chat":
        return await chat_session(client, index, round_, args)
    return await generate_session(client, index, round_, args)


async def generate_session(client: httpx.AsyncClient, index: int, round_: int, args) -> SessionResult:
    """Stream one generation, correcting it twice; the POSTs run as tasks so that reading the stream never waits."""
    result = SessionResult(client=index)
    first, second = corrections_for(index, round_)
    prompt = PROMPTS[(index + round_) % len(PROMPTS)]
    posted: dict[str, asyncio.Task] = {}
    started = time.perf_counter()
    first_token = None
    landed_index = None
    body = {"prompt": prompt, "max_new_tokens": args.max_new_tokens}
    async with client.stream("POST", "/v1/generate", json=body) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event, now = json.loads(line[len("data: ") :]), time.perf_counter()
            if "session" in event:
                result.session = event["session"]
            elif "token" in event:
                if first_token is None:
                    first_token = now
                    result.ttft_s = now - started
                result.tokens += 1
                url = f"/v1/sessions/{result.session}/updates"
                if event["index"] == args.first_at and first not in posted:
                    posted[first] = asyncio.create_task(post_correction(client, url, first, result))
                if landed_index is not None and event["index"] == landed_index + 2 and second not in posted:
                    posted[second] = asyncio.create_task(post_correction(client, url, second, result))
            elif "landed" in event:
                text = event["landed"]["text"]
                result.landed.append(text)
                if text in posted:  # anything else is another session's correction: `check` counts it
                    result.latencies_s.append(now - await posted[text])
                landed_index = event["landed"]["at"]
            elif "done" in event:
                result.reported = event["landings"]
                if first_token is not None:
                    result.decode_s = now - first_token
            elif "error" in event:
                result.error = event["error"]
    await asyncio.gather(*posted.values())
    return result


async def chat_session(client: httpx.AsyncClient, index: int, round_: int, args) -> SessionResult:
    """Stream one chat completion, correcting it twice, as `generate_session` does; tokens are counted from the
    usage chunk, and a content chunk comes for each new token (the byte-level tokens of ASCII answers)."""
    result = SessionResult(client=index)
    first, second = corrections_for(index, round_)
    messages = [{"role": "user", "content": PROMPTS[(index + round_) % len(PROMPTS)].strip()}]
    body = {"model": args.model_name, "messages": messages, "max_tokens": args.max_new_tokens, "stream": True}
    body["stream_options"] = {"include_usage": True}
    posted: dict[str, asyncio.Task] = {}
    started, first_token, landed_index, pieces = time.perf_counter(), None, None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk, now = json.loads(line[len("data: ") :]), time.perf_counter()
            if "error" in chunk:
                result.error = chunk["error"]["message"]
                continue
            result.session = chunk["id"]
            url = f"/v1/chat/completions/{result.session}/updates"
            duplex = chunk.get("duplex") or {}
            if "landed" in duplex:
                text = duplex["landed"]["text"]
                result.landed.append(text)
                if text in posted:
                    result.latencies_s.append(now - await posted[text])
                landed_index = duplex["landed"]["at"]
            if "landings" in duplex:
                result.reported = duplex["landings"]
                if first_token is not None:
                    result.decode_s = now - first_token
            if chunk.get("usage"):
                result.tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                if first_token is None:
                    first_token, result.ttft_s = now, now - started
                if pieces == args.first_at and first not in posted:
                    posted[first] = asyncio.create_task(post_correction(client, url, first, result))
                if landed_index is not None and pieces == landed_index + 2 and second not in posted:
                    posted[second] = asyncio.create_task(post_correction(client, url, second, result))
                pieces += 1
    await asyncio.gather(*posted.values())
    return result


async def client_loop(base: str, index: int, deadline: float, args) -> list[SessionResult]:
    results = []
    async with httpx.AsyncClient(base_url=base, timeout=args.timeout) as client:
        round_ = 0
        while time.perf_counter() < deadline:
            results.append(await one_session(client, index, round_, args))
            round_ += 1
    return results


def check(results: list[SessionResult]) -> dict[str, int]:
    """Isolation (a session's landings are its own corrections, in order) and loss (every accepted correction is in
    its done event, landed or reported as too late)."""
    counts = {"sessions": len(results), "sent": 0, "landed": 0, "late": 0, "lost": 0, "foreign": 0, "errors": 0}
    for r in results:
        counts["errors"] += r.error is not None
        counts["sent"] += len(r.sent)
        reported = [d["text"] for d in r.reported]
        counts["landed"] += sum(d["at"] is not None for d in r.reported)
        counts["late"] += sum(d["at"] is None for d in r.reported)
        counts["lost"] += sum(text not in reported for text in r.sent)
        counts["foreign"] += sum(text not in r.sent for text in [*reported, *r.landed])
    return counts


def percentiles(values: list[float], scale: float = 1.0) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * scale:.1f} / p95 {p95 * scale:.1f}"


def report(results: list[SessionResult], wall_s: float, sessions: int, args) -> dict:
    counts = check(results)
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    latency = [s for r in results for s in r.latencies_s]
    rates = [(r.tokens - 1) / r.decode_s for r in results if r.decode_s > 0 and r.tokens > 1]
    total_tokens = sum(r.tokens for r in results)
    print(
        f"{sessions} concurrent sessions for {args.duration:.0f} s ({wall_s:.1f} s wall), "
        f"{counts['sessions']} sessions done"
    )
    print(f"time to first token      ms  {percentiles(ttft, 1000)}")
    print(f"correction latency       ms  {percentiles(latency, 1000)}   (POST sent -> landing event received)")
    print(f"tokens/s per session         {percentiles(rates)}   total {total_tokens / wall_s:.1f} tok/s")
    print(
        f"corrections: {counts['sent']} accepted, {counts['landed']} landed, {counts['late']} reported too late, "
        f"{counts['lost']} lost; {counts['foreign']} seen by another session; {counts['errors']} errors"
    )
    total = total_tokens / wall_s
    return {"counts": counts, "ttft_s": ttft, "latency_s": latency, "tok_s": rates, "total_tok_s": total}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MemoryWatch:
    """The resident memory of a process, sampled every 50 ms in a thread: at the start and at its peak (MiB)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.start = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def rss(self) -> float:
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.rss())

    def reset(self) -> None:
        """Start a new window: the current memory is its start and its peak."""
        self.start = self.peak = self.rss()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1)


def start_server(args) -> tuple[subprocess.Popen, str]:
    """`python serve_duplex.py` on a free port of 127.0.0.1; returns it once /health answers."""
    port = free_port()
    command = [sys.executable, str(ROOT / "serve_duplex.py"), "--trust-remote-code", "--port", str(port)]
    command += ["--model", args.model, "--served-model-name", args.model_name]
    if args.server_threads:
        command += ["--threads", str(args.server_threads)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve_duplex.py exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("serve_duplex.py did not answer within 240 s")


async def run(base: str, sessions: int, args, abusers: int = 0) -> dict:
    started = time.perf_counter()
    deadline = started + args.duration
    clients = [client_loop(base, i, deadline, args) for i in range(sessions)]
    hostile = [abuse_loop(base, kind, deadline, args) for kind in ABUSES for _ in range(abusers)]
    per_client = await asyncio.gather(*clients, *hostile)
    outcome = report(
        [r for results in per_client[:sessions] for r in results], time.perf_counter() - started, sessions, args
    )
    if abusers:
        statuses: dict[str, dict[int, int]] = {}
        for kind, counts in per_client[sessions:]:
            for status, n in counts.items():
                statuses.setdefault(kind, {}).setdefault(status, 0)
                statuses[kind][status] += n
        print("hostile requests (HTTP status: count): " + "; ".join(f"{k} {v}" for k, v in statuses.items()))
        outcome["hostile"] = statuses
    return outcome


# ----------------------------------------------------------------------------------------------------------------------
# Hostile clients (--abuse)
# ----------------------------------------------------------------------------------------------------------------------

ABUSES = ("flood", "surrogates", "oversized", "odd-json")


async def flood(client: httpx.AsyncClient, args, counts: dict[int, int]) -> None:
    """Start a long chat completion and post corrections into it as fast as they go, `--flood` in all per round."""
    body = {
        "model": args.model_name,
        "messages": [{"role": "user", "content": "Write to Anna about rain."}],
        "max_tokens": args.max_new_tokens,
        "stream": True,
    }
    posted = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.aiter_lines()
        completion = None
        async for line in lines:
            if line.startswith("data: {"):
                completion = json.loads(line[len("data: ") :])["id"]
                break
        while completion is not None and posted < args.flood:
            url = f"/v1/chat/completions/{completion}/updates"
            replies = await asyncio.gather(
                *(client.post(url, json={"text": f"Stop at {posted + i}."}) for i in range(10))
            )
            posted += len(replies)
            for reply in replies:
                counts[reply.status_code] = counts.get(reply.status_code, 0) + 1
            if any(reply.status_code == 404 for reply in replies):
                break  # it ended
        async for _ in lines:  # read it to its end
            pass


async def surrogates(client: httpx.AsyncClient, args, counts: dict[int, int]) -> None:
    bodies = [
        b'{"model": "%s", "messages": [{"role": "user", "content": "Name 5 tools.\\ud800"}]}'
        % args.model_name.encode(),
        b'{"prompt": "Name 5 tools.\\udfff\\n"}',
        b'{"text": "Stop at 5.\\ud83d"}',
    ]
    paths = ["/v1/chat/completions", "/v1/generate", "/v1/chat/completions/chatcmpl-x/updates"]
    for path, body in zip(paths, bodies, strict=True):
        reply = await client.post(path, content=body, headers=JSON)
        counts[reply.status_code] = counts.get(reply.status_code, 0) + 1


async def oversized(client: httpx.AsyncClient, args, counts: dict[int, int]) -> None:
    body = {"model": args.model_name, "messages": [{"role": "user", "content": "\U0001f600" * 4000}]}
    reply = await client.post("/v1/chat/completions", json=body)
    counts[reply.status_code] = counts.get(reply.status_code, 0) + 1


async def odd_json(client: httpx.AsyncClient, args, counts: dict[int, int]) -> None:
    for body in (b'{"max_tokens": ' + b"9" * 5000 + b"}", b"[" * 1000 + b"]" * 1000, b"{nope"):
        reply = await client.post("/v1/chat/completions", content=body, headers=JSON)
        counts[reply.status_code] = counts.get(reply.status_code, 0) + 1


async def abuse_loop(base: str, kind: str, deadline: float, args) -> tuple[str, dict[int, int]]:
    """One hostile client of `kind`, over and over until the deadline; returns the statuses it got."""
    attack = {"flood": flood, "surrogates": surrogates, "oversized": oversized, "odd-json": odd_json}[kind]
    counts: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=base, timeout=args.timeout) as client:
        while time.perf_counter() < deadline:
            await attack(client, args, counts)
            await asyncio.sleep(0.01)
    return kind, counts


def summary_table(loads: dict[int, dict], reference: float | None = None) -> str:
    """One markdown row per load: latencies, throughput and its multiple of the first load's (or of `reference`
    tokens/s), what went wrong."""
    rows = [
        "| sessions | time to first token p50 / p95 (ms) | correction latency p50 / p95 (ms) | tok/s per session p50 "
        "| total tok/s | x first load | lost / foreign / errors |",
        "|---:|---|---|---:|---:|---:|---|",
    ]
    first = reference or next(iter(loads.values()))["total_tok_s"]
    for sessions, r in loads.items():
        c = r["counts"]
        ttft, latency = percentiles(r["ttft_s"], 1000), percentiles(r["latency_s"], 1000)
        per_session = statistics.median(r["tok_s"]) if r["tok_s"] else float("nan")
        rows.append(
            f"| {sessions} | {ttft} | {latency} | {per_session:.1f} | {r['total_tok_s']:.1f} | "
            f"{r['total_tok_s'] / first:.2f}x | {c['lost']} / {c['foreign']} / {c['errors']} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start serve_duplex.py)")
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "duplex-tiny"))
    parser.add_argument("--model-name", default="duplex-tiny", help="the model id the server serves")
    parser.add_argument("--endpoint", choices=("chat", "generate"), default="chat")
    parser.add_argument("--abuse", action="store_true", help="each load quiet, then beside hostile clients")
    parser.add_argument("--flood", type=int, default=300, help="corrections each flooding round posts")
    parser.add_argument("--server-threads", type=int, default=None, help="the server's --threads (default: its own)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[8], help="concurrent clients, one load per count")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds during which new sessions start")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--first-at", type=int, default=2, help="token index after which the first correction goes")
    parser.add_argument("--timeout", type=float, default=120.0, help="HTTP timeout per request, seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    process, base = (None, args.url) if args.url else start_server(args)
    memory, loads, abused = None, {}, {}
    try:
        memory = MemoryWatch(process.pid) if process is not None else None
        for sessions in args.sessions:
            if args.abuse:
                print("-- quiet --")
            loads[sessions] = asyncio.run(run(base, sessions, args))
            print()
            if args.abuse:
                print("-- beside hostile clients --")
                if memory is not None:
                    memory.reset()
                abused[sessions] = asyncio.run(run(base, sessions, args, abusers=1))
                if memory is not None:
                    abused[sessions]["memory_mib"] = (memory.start, memory.peak)
                    print(
                        f"server memory: {memory.start:.0f} MiB at the start, {memory.peak:.0f} MiB at its peak "
                        f"(+{memory.peak - memory.start:.0f} MiB)"
                    )
                print()
    finally:
        if memory is not None:
            memory.stop()
        if process is not None:
            process.terminate()
            process.wait(30)
    print(summary_table(loads))
    if abused:
        print("\nbeside hostile clients:")
        print(summary_table(abused, reference=next(iter(loads.values()))["total_tok_s"]))
    results = [*loads.values(), *abused.values()]
    ok = all(
        r["counts"]["lost"] == 0 and r["counts"]["foreign"] == 0 and r["counts"]["errors"] == 0 and r["counts"]["sent"]
        for r in results
    )
    # every hostile request refused with a 4xx; the flood's corrections within the caps are accepted (202)
    hostile_ok = all(
        400 <= status < 500 or (kind == "flood" and status == 202)
        for r in abused.values()
        for kind, statuses in r["hostile"].items()
        for status in statuses
    )
    return {"loads": loads, "abused": abused, "ok": ok and hostile_ok}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(0 if main()["ok"] else 1)
