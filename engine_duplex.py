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
  {"done": true, "text", "tokens", "stopped", "landings"}      at the end (`stopped`: eos, stop, length or
                                                               cancelled); `landings` includes corrections that came
                                                               too late
  {"error": message}                                           if serving this session failed (no internal detail)

Every text is checked where it enters (`check_text`: a string, not empty, valid UTF-8, no lone surrogates) and the
prompt is tokenized in `submit`, in the caller's thread, so that a bad input is refused there and never reaches the
shared loop. Work per client is bounded: the prompt and its answer must fit the model's context, a session takes at
most `max_corrections` corrections of at most `max_correction_tokens` tokens in all (what its workspace row holds)
and at most `max_pending_corrections` not yet landed (`TooManyCorrections` beyond), and newcomers are prefilled
at most `prefill_tokens_per_step` prompt tokens per step, so that a long prompt delays the live sessions by one
prefill, not by a queue of them. A failure while prefilling or correcting one
session ends that session only; one in the shared decoding step ends the sessions of that step.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

logger = logging.getLogger(__name__)

Event = dict[str, Any]
EmitFn = Callable[[Event], None]
GENERATION_FAILED = "generation failed; the server log has the details"

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


class TooManyCorrections(RuntimeError):
    """A session already holds as many corrections as the engine lets one session send (in all, or not yet landed)."""


class ContextLengthError(ValueError):
    """A prompt (and the answer asked for) that does not fit the model's context."""

    def __init__(self, message: str, prompt_tokens: int, max_context: int):
        super().__init__(message)
        self.prompt_tokens, self.max_context = prompt_tokens, max_context


def check_text(text: Any, name: str) -> str:
    """`text` if it is a non-empty string that encodes to UTF-8 (no lone surrogates), else a ValueError naming
    `name`: what a tokenizer is handed has passed here."""
    if not isinstance(text, str):
        raise ValueError(f"`{name}` must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"`{name}` is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"`{name}` is not valid Unicode (a lone surrogate at character {error.start})") from None
    return text


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
class SamplingOptions:
    """How a sampling session picks its tokens; None keeps the model's generation_config value."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def filled_from(self, default: SamplingOptions) -> SamplingOptions:
        """These options, their unset fields taken from `default` (the model's generation_config)."""
        return SamplingOptions(
            self.temperature if self.temperature is not None else default.temperature,
            self.top_p if self.top_p is not None else default.top_p,
            self.top_k if self.top_k is not None else default.top_k,
            self.seed,
        )


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
    prompt_ids: list[int] = field(default_factory=list)
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings (not included)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    started_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    tokens: int = 0  # new tokens so far (EOS included)
    last_token: int | None = None
    stopped: str | None = None  # once done: eos, stop, length or cancelled
    failure: str | None = None  # serving this session failed: it ends with an error event

    def __post_init__(self) -> None:
        self.decoder = IncrementalDecoder(self.engine.tokenizer)
        self.corrections: list[tuple[str, float]] = []  # arrived, not yet handed to the decoding loop
        self.accepted_corrections = 0
        self.correction_tokens = 0  # the workspace (or, in-band, the context) grows by the corrections' tokens
        self.streamed_chars = 0  # of the text so far, what went out in token events (stop strings hold some back)
        self.stop_hit = False
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.lock = threading.Lock()  # orders `correct()` against the end of the session
        self.generator = None
        if self.do_sample and self.sampling.seed is not None:  # its own random stream: the same seed, the same answer
            self.generator = torch.Generator(device=self.engine.device).manual_seed(self.sampling.seed)

    def correct(self, text: str) -> None:
        """Queue a correction; it lands before the session's next token. Raises `SessionFinished` once it ended,
        `TooManyCorrections` over the engine's caps, ValueError (naming `text`) for a text the tokenizer cannot take."""
        engine = self.engine
        if not engine.takes_corrections:
            raise TypeError(f"{type(engine.model).__name__} takes no corrections")
        check_text(text, "text")
        tokens = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        with self.lock:
            if self.done.is_set():
                raise SessionFinished("generation has ended")
            if self.accepted_corrections >= engine.max_corrections:
                raise TooManyCorrections(f"a completion takes at most {engine.max_corrections} corrections")
            if len(self.corrections) >= engine.max_pending_corrections:
                raise TooManyCorrections(
                    f"{engine.max_pending_corrections} corrections are already waiting to land; retry after the next "
                    "token"
                )
            if self.correction_tokens + tokens > engine.max_correction_tokens:  # what the row's workspace may hold
                raise TooManyCorrections(
                    f"a completion's corrections may hold at most {engine.max_correction_tokens} tokens in all"
                )
            if self.update_mode == "inband":
                needed = len(self.prompt_ids) + self.max_new_tokens + self.correction_tokens + tokens
                if needed > engine.max_context:
                    raise ContextLengthError(
                        f"`text`: spliced in-band, it would take the completion to {needed} tokens; the model's "
                        f"context is {engine.max_context}",
                        needed,
                        engine.max_context,
                    )
            self.correction_tokens += tokens
            self.accepted_corrections += 1
            self.corrections.append((text, time.perf_counter()))
        engine.wake()

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

    def _push(self, token_id: int) -> str:
        """Record a new token; the text it lets out (held back while it could still begin a stop string)."""
        self.decoder.push(token_id)
        self.tokens += 1
        self.last_token = token_id
        text = self.decoder.emitted
        if not self.stop:
            piece, self.streamed_chars = text[self.streamed_chars :], len(text)
            return piece
        found = [i for i in (text.find(s, max(0, self.streamed_chars - len(s) + 1)) for s in self.stop) if i >= 0]
        if found:
            self.stop_hit = True
            end = min(found)
        else:
            end = max(self.streamed_chars, len(text) - max(len(s) for s in self.stop) + 1)
        piece, self.streamed_chars = text[self.streamed_chars : end], end
        return piece

    def final_text(self) -> str:
        """The answer: the decoded tokens, cut before a stop string that was written."""
        text = self.decoder.text()
        return text[: self.streamed_chars] if self.stop_hit else text

    def ended(self, eos_ids: set[int]) -> bool:
        """EOS written, `max_new_tokens` reached, or cancelled (the client left)."""
        return (
            self.cancelled.is_set()
            or self.failure is not None
            or self.stop_hit
            or self.tokens >= self.max_new_tokens
            or self.last_token in eos_ids
        )

    def finish(self, eos_ids: set[int], state=None, row: int | None = None) -> None:
        """The done event of a session (row `row` of `state`, or not admitted yet), with every correction it
        received (those that never landed: `at` None)."""
        landings = [landing_event(x) for x in state.take_landings(row)] if state is not None else []
        if self.failure is not None:
            self.end({"error": self.failure})
            return
        if self.cancelled.is_set():
            stopped = "cancelled"
        elif self.stop_hit:
            stopped = "stop"
        elif self.tokens >= self.max_new_tokens and self.last_token not in eos_ids:
            stopped = "length"
        else:
            stopped = "eos"
        self.end(None, landings, stopped)

    def end(self, error: Event | None, landings: list | None = None, stopped: str = "") -> None:
        """Close the session: its final event (done, or the error), and the corrections that came too late."""
        with self.lock:
            late = self.corrections
            self.corrections = []
            self.stopped = stopped or "error"
            self.done.set()
        if error is not None:
            self.emit(error)
            return
        for text, _arrived in late:  # posted after the last step that could land them
            landings.append({"at": None, "text": text, "applied": False, "kind": None, "latency_ms": None})
        self.emit(
            {
                "done": True,
                "text": self.final_text(),
                "tokens": self.tokens,
                "stopped": stopped,
                "landings": landings,
            }
        )


def special_ids(config, tokenizer) -> tuple[set[int], int]:
    """The end-of-sequence ids and the padding id the engine decodes with, from the model's generation_config;
    refuses, naming them, the generation_config options the engine does not implement."""
    refused = [
        name for name, default in UNSUPPORTED_OPTIONS.items() if getattr(config, name, None) not in (None, default)
    ]
    if refused:
        raise ValueError(f"the engine does not implement generation_config options {refused}")
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    return eos_ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), 0)


def check_submission(prompt: str, max_new_tokens: int, update_mode: str, stop: Sequence[str]) -> None:
    """Refuse, naming the argument, a session the engine cannot run."""
    check_text(prompt, "prompt")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be positive, got {max_new_tokens}")
    if update_mode not in ("workspace", "ignore", "inband"):
        raise ValueError(f"`update_mode` must be workspace, ignore or inband, got {update_mode!r}")
    for text in stop:
        check_text(text, "stop")


def pick_tokens(rows: Sequence[EngineSession], logits: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """Each row's next token: greedy, or sampled with the model's generation_config warpers."""
    for row, session in enumerate(rows):
        if session.tokens < session.min_new_tokens:
            logits[row, list(eos_ids)] = float("-inf")
    picked = logits.argmax(dim=-1)
    for row, session in enumerate(rows):
        if session.do_sample:
            warped = _warpers(session.sampling)(None, logits[row : row + 1])
            probs = torch.softmax(warped, dim=-1)
            picked[row] = torch.multinomial(probs, 1, generator=session.generator)[0, 0]
    return picked


class DuplexEngine:
    """Decodes every live session in one batched forward pass per step (see the module docstring).

    `max_batch_size` sessions decode at once (later ones wait for a row); `pace_s` spaces the steps out to a
    human's reading speed (the demo), a correction cutting the pause short. A plain causal LM is served too (its
    sessions take no corrections). `max_corrections`, `max_pending_corrections` and `prefill_tokens_per_step` bound
    the work one client can cause (see the module docstring).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        max_batch_size: int = 32,
        pace_s: float = 0.0,
        max_corrections: int = 16,
        max_pending_corrections: int = 4,
        prefill_tokens_per_step: int = 512,
        max_correction_tokens: int = 2048,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.pace_s = max_batch_size, pace_s
        self.max_corrections, self.max_pending_corrections = max_corrections, max_pending_corrections
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.max_correction_tokens = max_correction_tokens  # per session: bounds the slots of its workspace row
        text_config = model.config.get_text_config()
        self.max_context = getattr(text_config, "max_position_embeddings", None) or tokenizer.model_max_length
        self.state_class = generation_state_class(model)
        self.takes_corrections = self.state_class is not None
        config = model.generation_config
        self.eos_ids, self.pad_id = special_ids(config, tokenizer)
        self.default_sampling = SamplingOptions(config.temperature, config.top_p, config.top_k)
        self.device = next(model.parameters()).device
        self._waiting: deque[EngineSession] = deque()  # in order of arrival; guarded by `_submit_lock`
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
        stop: Sequence[str] = (),
        sampling: SamplingOptions | None = None,
    ) -> EngineSession:
        """A new session: it joins the batch at the next step (or as soon as a row is free). The prompt is checked and
        tokenized here: ValueError naming `prompt`, or `ContextLengthError` when it and `max_new_tokens` do not fit
        the model's context."""
        check_submission(prompt, max_new_tokens, update_mode, stop)
        prompt_ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if len(prompt_ids) + max_new_tokens > self.max_context:
            raise ContextLengthError(
                f"the model's context is {self.max_context} tokens; the prompt has {len(prompt_ids)} and "
                f"{max_new_tokens} new tokens were asked for",
                len(prompt_ids),
                self.max_context,
            )
        sampling = (
            (sampling or SamplingOptions()).filled_from(self.default_sampling) if do_sample else SamplingOptions()
        )
        options = (max_new_tokens, update_mode, do_sample, min_new_tokens, prompt_ids, tuple(stop), sampling)
        session = EngineSession(self, prompt, emit, *options)
        with self._submit_lock:  # against `close`: a session is either refused or ended by the loop
            if self._closed.is_set():
                raise RuntimeError("the engine is closed")
            self._waiting.append(session)
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
            except Exception:  # the newcomers' prefill failed: they end; the live batch goes on
                logger.exception("prefill failed")
                for session in self._admitting:
                    session.end({"error": GENERATION_FAILED})
                self._admitting = []
            try:
                with torch.inference_mode():
                    if self.batch is not None:
                        self._step()
            except Exception:  # the shared step failed: its sessions end; the loop goes on for later ones
                logger.exception("decoding step failed")
                for session in self.batch.rows if self.batch is not None else []:
                    session.end({"error": GENERATION_FAILED})
                self._reset_batch()
            if self.batch is None:
                self._wake.wait(0.5)
            elif self.pace_s > 0:
                self._wake.wait(self.pace_s)  # a correction or a newcomer cuts the pause short
        if self.batch is not None:  # closed: live and waiting sessions end as cancelled
            for row, session in enumerate(self.batch.rows):
                session.cancelled.set()
                session.finish(self.eos_ids, self.batch.state, row)
        self._reset_batch()
        while True:
            session = self._pop_waiting()  # (`submit` takes no more: `_closed` is set)
            if session is None:
                break
            session.cancelled.set()
            session.finish(self.eos_ids)

    def _admit(self) -> None:
        """Prefill sessions waiting for a row together, then splice them into the batch: as many as fit in
        `prefill_tokens_per_step` prompt tokens (at least one), the rest at the next steps."""
        with self._submit_lock:  # waiting sessions that were cancelled end now, without waiting for a row
            cancelled = [s for s in self._waiting if s.cancelled.is_set()]
            if cancelled:
                self._waiting = deque(s for s in self._waiting if not s.cancelled.is_set())
        for session in cancelled:
            session.finish(self.eos_ids)
        newcomers, budget = [], self.prefill_tokens_per_step
        while self.live_sessions + len(newcomers) < self.max_batch_size:
            session = self._pop_waiting()
            if session is None:
                break
            if newcomers and len(session.prompt_ids) > budget:
                with self._submit_lock:
                    self._waiting.appendleft(session)  # over this step's budget: first in line at the next
                break
            newcomers.append(session)
            budget -= len(session.prompt_ids)
        if not newcomers:
            return
        self._admitting = newcomers
        encoded = [s.prompt_ids for s in newcomers]
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

    def _pop_waiting(self) -> EngineSession | None:
        with self._submit_lock:
            return self._waiting.popleft() if self._waiting else None

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
                    try:
                        batch.state.put(row, text, arrived)
                    except Exception:  # this session's correction cannot be taken: it ends, the others go on
                        logger.exception("a correction could not be queued")
                        session.failure = GENERATION_FAILED
        inputs |= {"past_key_values": batch.cache, "use_cache": True, "logits_to_keep": 1}
        if batch.state is not None:
            batch.state.step([session.tokens for session in batch.rows], inputs)
        logits = self.model(**inputs).logits[:, -1, :].float()  # (B, V)
        landed = batch.state.after_forward({}) if batch.state is not None else []
        batch.mask = inputs["attention_mask"]  # in-band rows spliced their corrections in
        next_ids = pick_tokens(batch.rows, logits, self.eos_ids)
        for row, landing in landed:
            batch.rows[row].emit({"landed": landing_event(landing)})
        now = time.perf_counter()
        for session, token_id in zip(batch.rows, next_ids.tolist(), strict=True):
            session.first_token_time = session.first_token_time or now
            index = session.tokens
            session.emit({"token": session._push(token_id), "index": index})  # EOS: ""
        batch.next_ids = next_ids[:, None]

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
        ended = [row for row, session in enumerate(batch.rows) if session.ended(self.eos_ids)]
        if not ended:
            return True
        for row in ended:
            batch.rows[row].finish(self.eos_ids, batch.state, row)
        keep = [row for row in range(len(batch.rows)) if row not in ended]
        if keep:
            batch.select(keep)
        return bool(keep)


def _warpers(sampling: SamplingOptions) -> LogitsProcessorList:
    """The logits warpers of a sampling row, in generate's order."""
    warpers = LogitsProcessorList()
    if sampling.temperature is not None and sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k is not None and sampling.top_k != 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers


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


__all__ = [
    "ContextLengthError",
    "DuplexEngine",
    "EngineSession",
    "IncrementalDecoder",
    "SamplingOptions",
    "SessionFinished",
    "TooManyCorrections",
    "check_text",
    "landing_event",
]
