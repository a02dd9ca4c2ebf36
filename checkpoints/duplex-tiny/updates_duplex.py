"""The updates a user passes to `DuplexForCausalLM.generate`, and how they are read and checked.

Plain data (`DuplexUpdate`, `UpdateLanding`, `PendingUpdate`), a thread-safe live source (`UpdateStream`) and plain
functions that turn every documented form of `updates` into per-row pending updates. Anything else is refused here,
before decoding starts, with a `TypeError` (wrong kind of object) or `ValueError` (right kind, wrong value) that
names the offending update and what is wrong with it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

UPDATE_MODES = ("workspace", "ignore", "inband")
UPDATE_FORMS = "(at, text), (at, token_ids) or DuplexUpdate(at, text=... | token_ids=...)"


@dataclass(frozen=True)
class DuplexUpdate:
    """A correction for `generate`: it lands after `at` new tokens (new token number `at` is the first to see it)."""

    at: int
    text: str | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass
class UpdateLanding:
    """Where an update landed in one row of a `generate` call (returned with `return_dict_in_generate=True`)."""

    at: int | None  # new tokens generated before it took effect (None: it never landed)
    requested_at: int | None  # the `at` asked for (None for a live `UpdateStream` update)
    text: str | None
    token_ids: list[int]
    applied: bool  # False for update_mode="ignore" and for updates past the end of generation
    arrived_time: float | None = None  # time.perf_counter() when it reached generate (UpdateStream.put)
    landed_time: float | None = None  # time.perf_counter() after the forward pass that first used it
    kind: str | None = None  # the model's decision in update_mode="workspace": "correction" or "backchannel"


@dataclass
class PendingUpdate:
    """A checked update waiting to land: `at` new tokens (None: live, before the next token), its token ids."""

    at: int | None
    token_ids: list[int]
    text: str | None
    arrived_time: float | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Reading and checking updates
# ----------------------------------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    """`value` as an error message shows it: its type and a short repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def is_single_update(item: Any) -> bool:
    """One update ((at, payload) with an int `at`, or a DuplexUpdate), as opposed to a row's list of updates."""
    if isinstance(item, DuplexUpdate):
        return True
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int) and not isinstance(item[0], bool)


def is_row(item: Any) -> bool:
    """A row's list of updates: a list, or a tuple holding only updates (a tuple with an `at` in it is one update)."""
    if isinstance(item, list):
        return True
    return isinstance(item, tuple) and all(isinstance(u, (tuple, list, DuplexUpdate)) for u in item)


def check_payload(payload: Any, where: str, vocab_size: int | None = None) -> None:
    """Refuse a payload that is neither non-empty text nor a non-empty 1-D sequence of token ids in the vocabulary."""
    if isinstance(payload, str):
        if not payload.strip():
            raise ValueError(f"{where}: the update text is empty")
        return
    if isinstance(payload, torch.Tensor):
        if payload.dim() != 1:
            raise ValueError(f"{where}: token ids must be a 1-D tensor, got shape {tuple(payload.shape)}")
        if payload.is_floating_point() or payload.is_complex() or payload.dtype == torch.bool:
            raise TypeError(f"{where}: token ids must be an integer tensor, got {payload.dtype}")
        payload = payload.tolist()
    if not isinstance(payload, (list, tuple)):
        raise TypeError(f"{where}: an update is text or a list of token ids, got {_describe(payload)}")
    if not payload:
        raise ValueError(f"{where}: the update token ids are empty")
    for token in payload:
        if not isinstance(token, int) or isinstance(token, bool):
            raise TypeError(f"{where}: token ids must be ints, got {_describe(token)}")
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            limit = f" [0, {vocab_size})" if vocab_size is not None else " (non-negative)"
            raise ValueError(f"{where}: token id {token} is outside the vocabulary{limit}")


def tokenize_update(
    payload: Any, tokenizer: Any = None, where: str = "`updates`", vocab_size: int | None = None
) -> tuple[list[int], str | None]:
    """(token ids, text) of a checked payload; text is encoded without special tokens, so it needs `tokenizer`."""
    check_payload(payload, where, vocab_size)
    if isinstance(payload, str):
        if tokenizer is None:
            raise ValueError(f"{where}: an update given as text needs `tokenizer=` in generate (or pass token ids)")
        token_ids = list(tokenizer(payload, add_special_tokens=False)["input_ids"])
        if not token_ids:
            raise ValueError(f"{where}: the update text {payload!r} encodes to no tokens")
        return token_ids, payload
    token_ids = payload.tolist() if isinstance(payload, torch.Tensor) else list(payload)
    return [int(t) for t in token_ids], None


def read_update(
    update: Any, tokenizer: Any = None, where: str = "`updates`", vocab_size: int | None = None
) -> PendingUpdate:
    """One scheduled update, checked: (at, text), (at, token_ids) or DuplexUpdate."""
    if isinstance(update, DuplexUpdate):
        if (update.text is None) == (update.token_ids is None):
            raise ValueError(f"{where}: a DuplexUpdate needs exactly one of `text` and `token_ids`, got {update!r}")
        at, payload = update.at, update.text if update.text is not None else update.token_ids
    elif isinstance(update, tuple) and len(update) == 2:
        at, payload = update
    elif isinstance(update, tuple):
        raise ValueError(f"{where}: an update has 2 items, got {len(update)} in {update!r}; use {UPDATE_FORMS}")
    else:
        raise TypeError(f"{where}: cannot read {_describe(update)} as an update; use {UPDATE_FORMS}")
    if not isinstance(at, int) or isinstance(at, bool):
        raise TypeError(f"{where}: `at` must be an int (new tokens before it lands), got {_describe(at)}")
    if at < 0:
        raise ValueError(f"{where}: `at` must be a non-negative int, got {at}")
    token_ids, text = tokenize_update(payload, tokenizer, where, vocab_size)
    return PendingUpdate(at=at, token_ids=token_ids, text=text)


def normalize_updates(
    updates: Any, batch_size: int, tokenizer: Any = None, vocab_size: int | None = None
) -> list[list[PendingUpdate]]:
    """Every documented form of scheduled `updates` as one list of checked updates per row, each sorted by `at`:
    None; a list of updates (every row of the batch gets it; only for a batch of one); one list per row."""
    if updates is None:
        return [[] for _ in range(batch_size)]
    if is_single_update(updates):
        raise TypeError(f"`updates` is a single update, not a list of them: pass [{updates!r}]")
    if not isinstance(updates, (list, tuple)):
        raise TypeError(f"`updates` must be None, a list of updates or an UpdateStream, got {_describe(updates)}")
    per_row = len(updates) > 0 and all(is_row(u) for u in updates)
    if not per_row:
        if batch_size != 1 and len(updates) > 0:
            raise ValueError(f"`updates` for a batch of {batch_size} must be a list with one list of updates per row")
        updates = [list(updates)] * batch_size
    if len(updates) != batch_size:
        raise ValueError(f"`updates` has {len(updates)} rows but the batch has {batch_size}")
    return [
        sorted(
            (
                read_update(update, tokenizer, f"`updates` row {b} item {i} ({update!r})", vocab_size)
                for i, update in enumerate(row)
            ),
            key=lambda p: p.at,
        )
        for b, row in enumerate(updates)
    ]


def has_updates(updates: Any, batch_size: int, update_mode: Any = "workspace", tokenizer: Any = None) -> bool:
    """Whether a `generate` call has updates to land (a live stream may get some at any time); without any, it is
    the backbone's own generate. Refuses malformed `updates` and an unknown `update_mode` either way."""
    modes = [update_mode] * batch_size if isinstance(update_mode, str) else list(update_mode)
    unknown = [mode for mode in modes if mode not in UPDATE_MODES]
    if unknown:
        raise ValueError(f"`update_mode` must be one of {UPDATE_MODES}, got {unknown[0]!r}")
    if isinstance(updates, UpdateStream):
        return True
    return any(normalize_updates(updates, batch_size, tokenizer))


REFUSED_WITH_UPDATES = {  # decoding option -> whether its value makes updates impossible to land as promised
    "num_beams": lambda v: v is not None and v > 1,
    "num_return_sequences": lambda v: v is not None and v > 1,
    "assistant_model": lambda v: v is not None,
    "prompt_lookup_num_tokens": lambda v: v is not None,
}


def refuse_options_with_updates(generation_config: Any, kwargs: dict) -> None:
    """Refuse, naming the option, the decoding modes in which updates would not land as promised (they all work
    without updates): beams and returned sequences multiply the rows, assistants draft tokens that never saw them."""
    for name, refused in REFUSED_WITH_UPDATES.items():
        value = kwargs.get(name, getattr(generation_config, name, None))
        if refused(value):
            shown = type(value).__name__ if name == "assistant_model" else repr(value)
            raise ValueError(
                f"`{name}={shown}` is not supported together with `updates`; without updates it works as usual"
            )


def check_row(row: Any, batch_size: int | None, where: str) -> None:
    """Refuse a `row` that is not None or an int in [0, batch_size)."""
    if row is None:
        return
    if not isinstance(row, int) or isinstance(row, bool):
        raise TypeError(f"{where}: `row` must be None or an int, got {_describe(row)}")
    if row < 0:
        raise ValueError(f"{where}: `row` must be None or a non-negative int, got {row}")
    if batch_size is not None and row >= batch_size:
        raise ValueError(f"{where}: `row` {row} is out of range for a batch of {batch_size}")


# ----------------------------------------------------------------------------------------------------------------------
# Live updates
# ----------------------------------------------------------------------------------------------------------------------


class UpdateStream:
    """Thread-safe source of live updates: `put` from any thread while `generate` runs; polled before every step.

    `put` checks each update (text or token ids, a valid `row`) and, while a `generate` call reads the stream, that
    call can land it (its batch size, whether it has a tokenizer); a bad update raises in the putting thread, so it
    never reaches the decoding loop and the updates that did land are still reported.
    """

    def __init__(self, on_landing: Callable[[int, UpdateLanding], None] | None = None) -> None:
        """`on_landing(row, landing)`, if given, is called from the generating thread as each update takes effect:
        after the forward pass that first reads it, before the token it conditions is sampled and streamed."""
        self.on_landing = on_landing
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # thread-safe on its own
        self._lock = threading.Lock()  # makes check-then-queue atomic against `open`
        self._batch_size: int | None = None  # set while a generate call reads the stream
        self._has_tokenizer = False

    def put(self, update: str | Sequence[int], row: int | None = None) -> None:
        """Queue a correction (text or token ids) for `row` (None: every row); it lands before the next token."""
        check_payload(update, "UpdateStream.put")
        check_row(row, None, "UpdateStream.put")
        with self._lock:
            if self._batch_size is not None:
                self._check(update, row)
            self._queue.put((update, row, time.perf_counter()))

    def _check(self, update: str | Sequence[int], row: int | None) -> None:
        """Refuse what the reading generate call cannot land: a row outside its batch, text without a tokenizer."""
        check_row(row, self._batch_size, "UpdateStream.put")
        if isinstance(update, str) and not self._has_tokenizer:
            raise ValueError("UpdateStream.put: a text `update` needs `tokenizer=` in generate; put token ids instead")

    def open(self, batch_size: int, has_tokenizer: bool) -> None:
        """Called by `generate` before decoding: later `put`s are checked against this call, and so is everything
        queued before it (a bad early update raises here, before anything is generated)."""
        with self._lock:
            self._batch_size, self._has_tokenizer = batch_size, has_tokenizer
            refused = None
            for update, row, arrived in self.drain():
                try:
                    self._check(update, row)
                except ValueError as error:  # dropped: it could never land in this call
                    refused = refused or error
                else:
                    self._queue.put((update, row, arrived))
            if refused is not None:
                self._batch_size = None
                raise refused

    def close(self) -> list[tuple[str | Sequence[int], int | None, float]]:
        """Called when `generate` returns: what is still queued belongs to that call (it arrived too late to land)
        and is handed back; later `put`s are no longer checked against it and wait for the next call."""
        with self._lock:
            self._batch_size = None
            return self.drain()

    def drain(self) -> list[tuple[str | Sequence[int], int | None, float]]:
        """Everything queued so far, oldest first (called by `generate` before each step)."""
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items


__all__ = [
    "UPDATE_MODES",
    "DuplexUpdate",
    "PendingUpdate",
    "UpdateLanding",
    "UpdateStream",
    "check_payload",
    "check_row",
    "has_updates",
    "is_row",
    "is_single_update",
    "normalize_updates",
    "read_update",
    "refuse_options_with_updates",
    "tokenize_update",
]
