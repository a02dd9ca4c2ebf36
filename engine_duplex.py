"""One batched decoding loop for every live session: the engine behind `serve_duplex.py` and `app.py`.

Sessions arrive at any time, each with its own prompt, update mode and length. The engine prefills newcomers
together, splices them into the running batch (left padding, per-row positions and masks, as TGI's causal-LM path
and mlx-lm's batch cache do), and decodes every live session in one forward pass per step. A correction posted to a
session lands in that session's row only, by the same rules as `model.generate` (the model's own
`DuplexGenerationState` lands it); finished, cancelled or disconnected sessions leave the batch between steps.

    engine = DuplexEngine(model, tokenizer).start()
    session = engine.submit("Count from 3 to 19.\\n", emit=print, max_new_tokens=32)
    session.correct("Stop at 12.")   # from any thread, while it writes
    session.wait()

Events go to each session's `emit` (called from the engine's thread; it must not block), in order:
  {"token": str, "index": n}                                   every new token (index counts new tokens from 0)
  {"landed": {"at", "text", "applied", "kind", "latency_ms"}}  just before token `at`, the first one conditioned on the
                                                               update; "kind" is the model's decision (correction or
                                                               backchannel); latency from `correct()` to the forward
                                                               pass that first read it
  {"done": true, "text", "tokens", "stopped", "landings"}      at the end (`stopped`: eos, length or cancelled);
                                                               `landings` includes corrections that came too late
  {"error": message}                                           if decoding failed
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

Event = dict[str, Any]
EmitFn = Callable[[Event], None]

# generation_config options the engine does not implement: refused rather than silently dropped
UNSUPPORTED_OPTIONS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0,
    "sequence_bias": None,
}


class SessionFinished(RuntimeError):
    """A correction arrived after its session had ended."""


def generation_state_class(model: torch.nn.Module) -> type | None:
    """The `DuplexGenerationState` class of the model's own generation code (a checkpoint loaded with
    `trust_remote_code` runs its own copy of `generation_duplex.py`), or None for a plain causal LM."""
    for cls in type(model).__mro__:  # the model's generation mixin lives in the module that defines the state
        state = getattr(sys.modules.get(cls.__module__), "DuplexGenerationState", None)
        if state is not None:
            return state
    return None


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


def landing_event(landing) -> dict[str, Any]:
    """An `UpdateLanding` as sessions report it; latency is from the correction's arrival to the forward pass that
    first read it (None for one that never landed)."""
    latency = None
    if landing.landed_time is not None and landing.arrived_time is not None:
        latency = round((landing.landed_time - landing.arrived_time) * 1000, 2)
    return {
        "at": landing.at,
        "text": landing.text,
        "applied": landing.applied,
        "kind": landing.kind,  # the model's decision in update_mode="workspace": "correction" or "backchannel"
        "latency_ms": latency,
    }


@dataclass
class EngineSession:
    """One live generation of the engine: its events go to `emit`; `correct` and `cancel` work from any thread."""

    engine: DuplexEngine
    prompt: str
    emit: EmitFn
    max_new_tokens: int = 64
    update_mode: str = "workspace"
    do_sample: bool = False
    min_new_tokens: int = 0
    started_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    tokens: int = 0  # new tokens so far (EOS included)
    last_token: int | None = None

    def __post_init__(self) -> None:
        self.decoder = IncrementalDecoder(self.engine.tokenizer)
        self.corrections: list[tuple[str, float]] = []  # arrived, not yet handed to the decoding loop
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.lock = threading.Lock()  # orders `correct()` against the end of the session

    def correct(self, text: str) -> None:
        """Queue a correction; it lands before the session's next token. Raises `SessionFinished` once it ended."""
        if not self.engine.takes_corrections:
            raise TypeError(f"{type(self.engine.model).__name__} takes no corrections")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("`text`: a correction must be a non-empty string")
        with self.lock:
            if self.done.is_set():
                raise SessionFinished("generation has ended")
            self.corrections.append((text, time.perf_counter()))
        self.engine.wake()

    def cancel(self) -> None:
        """Stop after the current step (the done event reports `stopped: "cancelled"`)."""
        self.cancelled.set()
        self.engine.wake()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the session has ended; False on timeout."""
        return self.done.wait(timeout)

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def _take_corrections(self) -> list[tuple[str, float]]:
        with self.lock:
            taken, self.corrections = self.corrections, []
        return taken


class DuplexEngine:
    """Decodes every live session in one batched forward pass per step (see the module docstring).

    `max_batch_size` sessions decode at once (later ones wait for a row); `pace_s` spaces the steps out to a
    human's reading speed (the demo), a correction cutting the pause short. A plain causal LM is served too (its
    sessions take no corrections).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, max_batch_size: int = 32, pace_s: float = 0.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.pace_s = max_batch_size, pace_s
        self.state_class = generation_state_class(model)
        self.takes_corrections = self.state_class is not None
        config = model.generation_config
        refused = [
            name for name, default in UNSUPPORTED_OPTIONS.items() if getattr(config, name, None) not in (None, default)
        ]
        if refused:
            raise ValueError(f"the engine does not implement generation_config options {refused}")
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.warpers = LogitsProcessorList()  # sampling rows only, in generate's order
        if config.temperature is not None and config.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            self.warpers.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(config.top_p))
        self.device = next(model.parameters()).device
        self._waiting: queue.SimpleQueue[EngineSession] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="duplex-engine", daemon=True)
        self._reset_batch()

    # -- the public side -----------------------------------------------------------------------------------------------

    def start(self) -> DuplexEngine:
        self._thread.start()
        return self

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the loop (live and waiting sessions end as cancelled)."""
        with self._submit_lock:
            self._closed.set()
        self.wake()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)

    def submit(
        self,
        prompt: str,
        *,
        emit: EmitFn,
        max_new_tokens: int = 64,
        update_mode: str = "workspace",
        do_sample: bool = False,
        min_new_tokens: int = 0,
    ) -> EngineSession:
        """A new session: it joins the batch at the next step (or as soon as a row is free)."""
        if not prompt:
            raise ValueError("`prompt` is empty")
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be positive, got {max_new_tokens}")
        if update_mode not in ("workspace", "ignore", "inband"):
            raise ValueError(f"`update_mode` must be workspace, ignore or inband, got {update_mode!r}")
        session = EngineSession(self, prompt, emit, max_new_tokens, update_mode, do_sample, min_new_tokens)
        with self._submit_lock:  # against `close`: a session is either refused or ended by the loop
            if self._closed.is_set():
                raise RuntimeError("the engine is closed")
            self._waiting.put(session)
        self.wake()
        return session

    def wake(self) -> None:
        self._wake.set()

    @property
    def live_sessions(self) -> int:
        return len(self.batch.rows) if self.batch is not None else 0

    # -- the decoding loop ---------------------------------------------------------------------------------------------

    def _reset_batch(self) -> None:
        self.batch: _Batch | None = None  # the live rows (None: no session is decoding)
        self._admitting: list[EngineSession] = []  # newcomers being prefilled

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.clear()
            try:
                with torch.inference_mode():
                    self._admit()
                    if self.batch is not None:
                        self._step()
            except Exception as error:  # every live session hears of it; the loop goes on for later ones
                live = self.batch.rows if self.batch is not None else []
                for session in [*live, *self._admitting]:
                    self._end(session, {"error": f"generation failed: {type(error).__name__}: {error}"})
                self._reset_batch()
            if self.batch is None:
                self._wake.wait(0.5)
            elif self.pace_s > 0:
                self._wake.wait(self.pace_s)  # a correction or a newcomer cuts the pause short
        if self.batch is not None:  # closed: live and waiting sessions end as cancelled
            for row, session in enumerate(self.batch.rows):
                session.cancelled.set()
                self._finish(session, self.batch.state, row)
        self._reset_batch()
        while True:
            try:
                with self._submit_lock:
                    session = self._waiting.get_nowait()
            except queue.Empty:
                break
            session.cancelled.set()
            self._finish(session)

    def _admit(self) -> None:
        """Prefill the sessions waiting for a row together, then splice them into the batch."""
        newcomers = []
        while self.live_sessions + len(newcomers) < self.max_batch_size:
            try:
                session = self._waiting.get_nowait()
            except queue.Empty:
                break
            if session.cancelled.is_set():
                self._finish(session)
            else:
                newcomers.append(session)
        if not newcomers:
            return
        self._admitting = newcomers
        encoded = [self.tokenizer(s.prompt, add_special_tokens=True)["input_ids"] for s in newcomers]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in encoded], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=self.device)
        state = None
        if self.state_class is not None:
            modes = [s.update_mode for s in newcomers]
            state = self.state_class(self.model, len(newcomers), None, modes, self.tokenizer)
            state.start(input_ids, mask)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
        group = _Batch(newcomers, DynamicCache(config=self.model.config.get_text_config()), mask, None, state)
        self._forward(group, inputs)
        if self._leave(group):
            self._merge(group)
        self._admitting = []

    def _step(self) -> None:
        """One decoding step of every live row; the rows that ended leave, and the columns no row uses any more."""
        batch = self.batch
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        positions = batch.mask.sum(-1, keepdim=True)  # (B, 1): the real tokens before each row's new one
        self._forward(batch, {"input_ids": batch.next_ids, "attention_mask": mask, "position_ids": positions})
        if not self._leave(batch):
            self._reset_batch()
        elif len(batch.rows) < mask.shape[0]:
            batch.trim_left()

    def _forward(self, batch: _Batch, inputs: dict) -> None:
        """Land the rows' due corrections, run the model over the step's tokens, pick and announce each row's next
        token. Updates `batch` in place."""
        if batch.state is not None:
            for row, session in enumerate(batch.rows):
                for text, arrived in session._take_corrections():
                    batch.state.put(row, text, arrived)
        inputs |= {"past_key_values": batch.cache, "use_cache": True, "logits_to_keep": 1}
        if batch.state is not None:
            batch.state.step([session.tokens for session in batch.rows], inputs)
        logits = self.model(**inputs).logits[:, -1, :].float()  # (B, V)
        landed = batch.state.after_forward({}) if batch.state is not None else []
        batch.mask = inputs["attention_mask"]  # in-band rows spliced their corrections in
        next_ids = self._pick(batch.rows, logits)
        for row, landing in landed:
            batch.rows[row].emit({"landed": landing_event(landing)})
        now = time.perf_counter()
        for session, token_id in zip(batch.rows, next_ids.tolist(), strict=True):
            session.first_token_time = session.first_token_time or now
            session.emit({"token": session.decoder.push(token_id), "index": session.tokens})  # EOS: ""
            session.tokens += 1
            session.last_token = token_id
        batch.next_ids = next_ids[:, None]

    def _pick(self, rows: Sequence[EngineSession], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token: greedy, or sampled with the model's generation_config warpers."""
        for row, session in enumerate(rows):
            if session.tokens < session.min_new_tokens:
                logits[row, list(self.eos_ids)] = float("-inf")
        picked = logits.argmax(dim=-1)
        sampled = [row for row, session in enumerate(rows) if session.do_sample]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            warped = self.warpers(None, logits[index])
            picked[index] = torch.multinomial(torch.softmax(warped, dim=-1), 1)[:, 0]
        return picked

    def _merge(self, group: _Batch) -> None:
        """Splice a prefilled group into the batch: the shorter side is padded on the left to the same columns."""
        if self.batch is None:
            self.batch = group
            return
        width = max(self.batch.mask.shape[1], group.mask.shape[1])
        self.batch.pad_left(width - self.batch.mask.shape[1])
        group.pad_left(width - group.mask.shape[1])
        self.batch.concat(group)

    def _leave(self, batch: _Batch) -> bool:
        """The sessions of `batch` that ended (EOS, length, cancelled) get their done event and leave it; False when
        none is left."""
        ended = [row for row, session in enumerate(batch.rows) if self._ended(session)]
        if not ended:
            return True
        for row in ended:
            self._finish(batch.rows[row], batch.state, row)
        keep = [row for row in range(len(batch.rows)) if row not in ended]
        if keep:
            batch.select(keep)
        return bool(keep)

    def _ended(self, session: EngineSession) -> bool:
        """EOS written, `max_new_tokens` reached, or cancelled (the client left)."""
        return (
            session.cancelled.is_set() or session.tokens >= session.max_new_tokens or session.last_token in self.eos_ids
        )

    def _finish(self, session: EngineSession, state=None, row: int | None = None) -> None:
        """The done event of a session (row `row` of `state`, or not admitted yet), with every correction it
        received (those that never landed: `at` None)."""
        landings = [landing_event(x) for x in state.take_landings(row)] if state is not None else []
        if session.cancelled.is_set():
            stopped = "cancelled"
        elif session.tokens >= session.max_new_tokens and session.last_token not in self.eos_ids:
            stopped = "length"
        else:
            stopped = "eos"
        self._end(session, None, landings, stopped)

    def _end(
        self, session: EngineSession, error: Event | None, landings: list | None = None, stopped: str = ""
    ) -> None:
        with session.lock:
            late = session.corrections
            session.corrections = []
            session.done.set()
        if error is not None:
            session.emit(error)
            return
        for text, _arrived in late:  # posted after the last step that could land them
            landings.append({"at": None, "text": text, "applied": False, "kind": None, "latency_ms": None})
        session.emit(
            {
                "done": True,
                "text": session.decoder.text(),
                "tokens": session.tokens,
                "stopped": stopped,
                "landings": landings,
            }
        )


@dataclass
class _Batch:
    """Rows decoded together: their sessions, KV cache, 0/1 mask over its columns, next input tokens and
    generation state. Row operations keep all of them aligned."""

    rows: list[EngineSession]
    cache: DynamicCache
    mask: torch.Tensor  # (B, C)
    next_ids: torch.Tensor | None  # (B, 1)
    state: Any

    def _layers(self):
        return [layer for layer in self.cache.layers if getattr(layer, "keys", None) is not None]

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.mask.device)
        self.rows = [self.rows[r] for r in rows]
        self.cache.batch_select_indices(index)
        self.mask, self.next_ids = self.mask[index], self.next_ids[index]
        if self.state is not None:
            self.state.select_rows(rows)

    def pad_left(self, columns: int) -> None:
        """`columns` masked columns before every row's first (keys/values of zeros, never read)."""
        if columns <= 0:
            return
        for layer in self._layers():
            pad = layer.keys.new_zeros(*layer.keys.shape[:2], columns, layer.keys.shape[3])
            layer.keys = torch.cat([pad, layer.keys], dim=2)
            layer.values = torch.cat([pad.to(layer.values.dtype), layer.values], dim=2)
        self.mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], columns), self.mask], dim=1)
        if self.state is not None:
            self.state.shift_columns(columns)

    def trim_left(self) -> None:
        """Cut the leading columns that no row uses (their sessions left)."""
        columns = int((self.mask.cumsum(-1) == 0).all(dim=0).sum())
        if columns == 0:
            return
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[:, :, columns:], layer.values[:, :, columns:]
        self.mask = self.mask[:, columns:]
        if self.state is not None:
            self.state.shift_columns(-columns)

    def concat(self, other: _Batch) -> None:
        """Append `other`'s rows (same number of columns)."""
        for mine, theirs in zip(self._layers(), other._layers(), strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.rows = self.rows + other.rows
        self.mask = torch.cat([self.mask, other.mask])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        if self.state is not None:
            self.state.concat(other.state)


__all__ = ["DuplexEngine", "EngineSession", "IncrementalDecoder", "SessionFinished", "landing_event"]
