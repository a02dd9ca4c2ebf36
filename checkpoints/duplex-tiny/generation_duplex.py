"""Duplex generation runtime: the updates a user passes, the one rule that maps them to sequence positions and
workspace versions, and the per-`generate` state that lands them between decoding steps.

`modeling_duplex.DuplexForCausalLM` owns the modules and `apply_update`; this file owns the bookkeeping that
teacher-forced `forward` and `generate` share (`pack_updates`, `update_position`, `WorkspaceVersions`) and the
generation state that `generate` threads through transformers' own decoding loop. A serving loop that batches live
sessions (`engine_duplex.py` in the repository) drives the same state, so its rows land updates by the same rules.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import GenerationMixin
from transformers.generation.utils import GenerateDecoderOnlyOutput

try:
    from .updates_duplex import (
        UPDATE_MODES,
        DuplexUpdate,
        PendingUpdate,
        UpdateLanding,
        UpdateStream,
        check_row,
        has_updates,
        normalize_updates,
        refuse_options_with_updates,
        tokenize_update,
    )
except ImportError:  # imported as a plain module from a checkout, not through trust_remote_code
    from updates_duplex import (
        UPDATE_MODES,
        DuplexUpdate,
        PendingUpdate,
        UpdateLanding,
        UpdateStream,
        check_row,
        has_updates,
        normalize_updates,
        refuse_options_with_updates,
        tokenize_update,
    )

NO_UPDATE = -1  # position of an empty update slot in a padded batch

# ----------------------------------------------------------------------------------------------------------------------
# Updates: what the user passes, and the one rule that maps them to positions and workspace versions
# ----------------------------------------------------------------------------------------------------------------------


def update_position(prompt_length: int, at: int) -> int:
    """Sequence index of the first position whose logits (for new token `at`) are conditioned on an update."""
    return prompt_length - 1 + at


def newest_column(model_inputs: dict) -> int:
    """Sequence index of a forward pass's last token (its logits pick the next token): `update_position` for the
    updates that land before that pass, counting every column of the cache (in-band insertions included)."""
    mask = model_inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.shape[1] - 1
    cache = model_inputs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None else 0
    return past + model_inputs["input_ids"].shape[1] - 1


def pack_updates(
    updates: Sequence[Sequence[tuple[int, Sequence[int]]]], pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """Per-row lists of (position, token_ids), sorted by position -> the padded tensors `forward` takes:
    update_input_ids (B, U, L), update_attention_mask (B, U, L), update_positions (B, U) with NO_UPDATE padding."""
    batch = len(updates)
    num = max((len(row) for row in updates), default=0)
    length = max((len(ids) for row in updates for _, ids in row), default=1)
    ids = torch.full((batch, num, length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, num, length), dtype=torch.long)
    positions = torch.full((batch, num), NO_UPDATE, dtype=torch.long)
    for b, row in enumerate(updates):
        if any(p1 > p2 for (p1, _), (p2, _) in itertools.pairwise(row)):
            raise ValueError(f"pack_updates: row {b}'s updates must be sorted by position, got {[p for p, _ in row]}")
        for u, (pos, tokens) in enumerate(row):
            ids[b, u, : len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
            mask[b, u, : len(tokens)] = 1
            positions[b, u] = pos
    return {"update_input_ids": ids, "update_attention_mask": mask, "update_positions": positions}


NEVER = torch.iinfo(torch.long).max  # start of a version that a row never reaches


def _shift_columns(starts: torch.Tensor, shift: int) -> torch.Tensor:
    """Sequence indices moved by `shift` columns (NEVER stays NEVER)."""
    return torch.where(starts == NEVER, NEVER, starts + shift)


@dataclass
class WorkspaceVersions:
    """The workspace states a sequence goes through, and from which position each is visible.

    One bookkeeping for teacher-forced `forward` and for generation: version 0 is the empty workspace (visible
    from position 0); each later version follows one update of its row (`starts` = NEVER where the row had none).
    Position t reads the newest version whose start is <= t.
    """

    slots: torch.Tensor  # (B, V, S, D)
    slot_mask: torch.Tensor  # (B, V, S) bool: which slots hold something
    starts: torch.Tensor  # (B, V) long

    @classmethod
    def empty(cls, slots: torch.Tensor, slot_mask: torch.Tensor) -> WorkspaceVersions:
        starts = torch.zeros(slots.shape[0], 1, dtype=torch.long, device=slots.device)
        return cls(slots[:, None], slot_mask[:, None], starts)

    def latest(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's newest version: slots (B, S, D), mask (B, S) and start (B,)."""
        version = self.newest_version(torch.full_like(self.starts[:, :1], NEVER - 1))[:, 0]
        rows = torch.arange(self.starts.shape[0], device=self.starts.device)
        return self.slots[rows, version], self.slot_mask[rows, version], self.starts[rows, version]

    def append(self, slots: torch.Tensor, slot_mask: torch.Tensor, start: torch.Tensor) -> WorkspaceVersions:
        """A new version per row (B, S, D) visible from `start` (B,) (NEVER for rows without an update)."""
        return WorkspaceVersions(
            torch.cat([self.slots, slots[:, None]], dim=1),
            torch.cat([self.slot_mask, slot_mask[:, None]], dim=1),
            torch.cat([self.starts, start[:, None]], dim=1),
        )

    def newest_version(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, T) sequence indices -> (B, T) index of the newest version started at or before each of them."""
        started = self.starts[:, None, :] <= positions[:, :, None]  # (B, T, V)
        index = torch.arange(self.starts.shape[1], device=positions.device)
        return torch.where(started, index, 0).amax(dim=-1)

    def newest_only(self) -> WorkspaceVersions:
        """The empty version and each row's newest (NEVER where a row has none): all that a position from the
        newest start on reads. Between decoding steps every later position is such a position, so generation keeps
        just these instead of a version per update ever made."""
        if self.starts.shape[1] <= 2:
            return self
        newest = self.newest_version(torch.full_like(self.starts[:, :1], NEVER - 1))[:, 0]  # (B,)
        rows = torch.arange(self.starts.shape[0], device=self.starts.device)
        start = torch.where(newest > 0, self.starts[rows, newest], NEVER)
        return WorkspaceVersions(
            torch.stack([self.slots[:, 0], self.slots[rows, newest]], dim=1),
            torch.stack([self.slot_mask[:, 0], self.slot_mask[rows, newest]], dim=1),
            torch.stack([self.starts[:, 0], start], dim=1),
        )

    def select(self, rows: torch.Tensor) -> WorkspaceVersions:
        """Only the batch rows `rows` (B',)."""
        return WorkspaceVersions(self.slots[rows], self.slot_mask[rows], self.starts[rows])

    def shift(self, columns: int) -> WorkspaceVersions:
        """The same versions after `columns` columns were added (> 0) or removed (< 0) on the left of the sequence."""
        return WorkspaceVersions(self.slots, self.slot_mask, _shift_columns(self.starts, columns))

    def concat(self, other: WorkspaceVersions) -> WorkspaceVersions:
        """The rows of both, over the same columns; the one with fewer versions gets versions that never start."""
        width = max(self.starts.shape[1], other.starts.shape[1])

        def padded(v: WorkspaceVersions) -> WorkspaceVersions:
            extra = width - v.starts.shape[1]
            if not extra:
                return v
            batch, _, num_slots, hidden = v.slots.shape
            return WorkspaceVersions(
                torch.cat([v.slots, v.slots.new_zeros(batch, extra, num_slots, hidden)], dim=1),
                torch.cat([v.slot_mask, v.slot_mask.new_zeros(batch, extra, num_slots)], dim=1),
                torch.cat([v.starts, v.starts.new_full((batch, extra), NEVER)], dim=1),
            )

        a, b = padded(self), padded(other)
        return WorkspaceVersions(
            torch.cat([a.slots, b.slots]), torch.cat([a.slot_mask, b.slot_mask]), torch.cat([a.starts, b.starts])
        )

    def placed_in_context(self, first_version: int = 1) -> ContextWorkspace:
        """The versions from `first_version` on as slots placed in the context (`workspace_update="in_context"`:
        each version holds one correction's slots): slots (B, M, D) entering the next forward pass, each read from
        its version's start. Slots that no row fills (padding, backchannels) are dropped."""
        slots = self.slots[:, first_version:].flatten(1, 2)  # (B, M, D)
        starts = torch.where(self.slot_mask[:, first_version:], self.starts[:, first_version:, None], NEVER)
        starts = starts.flatten(1)  # (B, M)
        keep = (starts != NEVER).any(dim=0).nonzero()[:, 0]
        return ContextWorkspace(starts.index_select(1, keep), slots.index_select(1, keep))


@dataclass
class ContextWorkspace:
    """The workspace of `workspace_update="in_context"`, as a forward pass reads it: every written correction's
    slots placed in the context where the correction landed, at the positions its text would take in-band.

    Like a KV cache, generation keeps one across steps: the slots of a new correction enter one forward pass
    (`new_slots`), which stores their per-layer keys and values (`store`); later steps read those. Teacher-forced
    training builds one whose slots all enter the single pass."""

    starts: torch.Tensor  # (B, M) long: sequence index from which each slot is read (NEVER: an unused column)
    new_slots: torch.Tensor | None = None  # (B, M_new, D): the last M_new slots, entering in the next forward pass
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, kv_heads, M - M_new, hd)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    keep: bool = False  # store the new slots' keys/values for later steps (generation)
    reads: bool | None = None  # whether the model's gates read it: decided once (the gates stay put while generating)
    empty: bool = field(init=False)  # no slot is read by any row (only backchannels so far): exactly the backbone

    def __post_init__(self) -> None:
        if self.new_slots is not None and self.new_slots.shape[1] == 0:
            self.new_slots = None
        self.empty = not bool((self.starts != NEVER).any())  # once per change, not per decoding step

    @property
    def num_new(self) -> int:
        return 0 if self.new_slots is None else self.new_slots.shape[1]

    def extend(self, entering: ContextWorkspace) -> ContextWorkspace:
        """This workspace plus the slots of `entering` (whose keys/values the next forward pass computes)."""
        if self.new_slots is not None:
            raise RuntimeError("the previous slots have not entered a forward pass yet")
        packed = self.packed()
        starts = torch.cat([packed.starts, entering.starts], dim=1)
        return ContextWorkspace(starts, entering.new_slots, packed.keys, packed.values, self.keep, self.reads)

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep one layer's keys/values of every slot so far (B, kv_heads, M, hd), when generating."""
        if self.keep:
            self.keys[layer], self.values[layer] = keys, values

    def entered(self) -> None:
        """After the forward pass: the new slots are in (their keys/values are stored)."""
        if self.keep:
            self.new_slots = None

    def packed(self) -> ContextWorkspace:
        """The same slots in fewer columns (between forward passes): each row's slots move left, in their order,
        and columns no row uses are dropped. Rows take corrections at different times, and each correction adds its
        slots as columns of every row: without this, the columns of a long-lived batch would only grow."""
        used = self.starts != NEVER  # (B, M)
        width = int(used.sum(-1).max()) if used.numel() else 0
        if width == self.starts.shape[1]:
            return self
        order = torch.sort((~used).long(), dim=1, stable=True).indices[:, :width]  # used columns first, in order
        keys = {layer: _gather_columns(k, order) for layer, k in self.keys.items()}
        values = {layer: _gather_columns(v, order) for layer, v in self.values.items()}
        starts = self.starts.gather(1, order)
        return ContextWorkspace(starts, None, keys, values, self.keep, self.reads)

    def select(self, rows: torch.Tensor) -> ContextWorkspace:
        """Only the batch rows `rows` (between forward passes), packed (`packed`)."""
        keys = {layer: k[rows] for layer, k in self.keys.items()}
        values = {layer: v[rows] for layer, v in self.values.items()}
        return ContextWorkspace(self.starts[rows], None, keys, values, self.keep, self.reads).packed()

    def shift(self, columns: int) -> ContextWorkspace:
        """The same slots after `columns` columns were added (> 0) or removed (< 0) on the left of the sequence."""
        return ContextWorkspace(
            _shift_columns(self.starts, columns), None, self.keys, self.values, self.keep, self.reads
        )

    def concat(self, other: ContextWorkspace) -> ContextWorkspace:
        """The rows of both, over the same columns (between forward passes); unused slot columns pad the narrower."""
        width = max(self.starts.shape[1], other.starts.shape[1])
        starts = torch.cat([_pad_dim(self.starts, 1, width, NEVER), _pad_dim(other.starts, 1, width, NEVER)])
        merged = []
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            layers = {}
            for layer, like in {**theirs, **mine}.items():  # a side without slots yet has no keys/values
                a = mine.get(layer, like.new_zeros(self.starts.shape[0], *like.shape[1:2], 0, like.shape[3]))
                b = theirs.get(layer, like.new_zeros(other.starts.shape[0], *like.shape[1:2], 0, like.shape[3]))
                layers[layer] = torch.cat([_pad_dim(a, 2, width), _pad_dim(b, 2, width)])
            merged.append(layers)
        reads = self.reads if self.reads is not None else other.reads
        return ContextWorkspace(starts, None, merged[0], merged[1], self.keep or other.keep, reads)


def _gather_columns(tensor: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(B, heads, M, hd) -> (B, heads, M', hd): per row, the slot columns `columns` (B, M')."""
    index = columns[:, None, :, None].expand(tensor.shape[0], tensor.shape[1], -1, tensor.shape[3])
    return tensor.gather(2, index)


def _pad_dim(tensor: torch.Tensor, dim: int, size: int, fill: int = 0) -> torch.Tensor:
    """`tensor` padded with `fill` at the end of dimension `dim` up to `size`."""
    extra = list(tensor.shape)
    extra[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_full(extra, fill)], dim=dim)


# ----------------------------------------------------------------------------------------------------------------------
# The generation state
# ----------------------------------------------------------------------------------------------------------------------


class UpdateWriter(Protocol):
    """What generation calls on the model: the empty workspace, the one place an update is written, and which
    decisions write (`DuplexForCausalLM` implements it)."""

    config: Any  # `inband_template`: how a correction is written as text

    def empty_workspace(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def apply_update(
        self,
        slots: torch.Tensor,
        slot_mask: torch.Tensor,
        update_input_ids: torch.Tensor,
        update_attention_mask: torch.Tensor,
        is_correction: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def writes(self, decision: torch.Tensor, is_correction: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass
class DuplexGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate`'s usual output plus, per row, where each update landed."""

    update_landings: list[list[UpdateLanding]] | None = None


@dataclass
class InbandSplice:
    """`update_mode="inband"` (the baseline): a correction's tokens, wrapped in the config's `inband_template`,
    follow the current input chunk of their row in the same cache. Rows are laid out [masked padding | usual chunk
    | inserted tokens], so every row's last position is real; the longer mask and positions persist afterwards."""

    template: str
    tokenizer: object = None
    inserted: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (mask, positions, chunk length) until persisted

    def tokens(self, update: PendingUpdate) -> list[int]:
        """The template around the correction, as token ids."""
        before, after = self.template.split("{text}")
        if self.tokenizer is None and (before or after):
            raise ValueError("`update_mode='inband'` needs `tokenizer=` to encode `config.inband_template`")
        if update.text is not None:
            return self.tokenizer(before + update.text + after, add_special_tokens=False)["input_ids"]
        encode = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        return encode(before) + update.token_ids + encode(after)

    def splice(self, inserts: list[list[int]], model_inputs: dict) -> None:
        """Each row's inserted tokens (possibly none) after its chunk, in `model_inputs`."""
        batch_size = len(inserts)
        chunk = model_inputs["input_ids"]  # (B, T)
        device, length = chunk.device, chunk.shape[1]
        position_ids = model_inputs.get("position_ids")
        if position_ids is None:
            cache = model_inputs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + length, device=device)[None].expand(batch_size, -1)
        full_mask = model_inputs.get("attention_mask")
        if full_mask is None:
            cache = model_inputs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None else 0
            full_mask = torch.ones((batch_size, past + length), dtype=torch.long, device=device)
        own_mask = full_mask[:, full_mask.shape[1] - length :]  # the chunk's own mask: the prompt's left padding
        width = max(len(ins) for ins in inserts)
        ids, mask, positions = [], [], []
        for b, ins in enumerate(inserts):
            lead = torch.zeros(width - len(ins), dtype=torch.long, device=device)
            inserted = torch.tensor(ins, dtype=torch.long, device=device)
            ids.append(torch.cat([lead, chunk[b], inserted]))
            mask.append(torch.cat([lead, own_mask[b].long(), torch.ones(len(ins), dtype=torch.long, device=device)]))
            positions.append(
                torch.cat([lead, position_ids[b], position_ids[b, -1] + 1 + torch.arange(len(ins), device=device)])
            )
        chunk_mask, chunk_positions = torch.stack(mask), torch.stack(positions)
        model_inputs["input_ids"] = torch.stack(ids)
        model_inputs["attention_mask"] = torch.cat([full_mask[:, : full_mask.shape[1] - length], chunk_mask], dim=1)
        model_inputs["position_ids"] = chunk_positions
        self.inserted = (model_inputs["attention_mask"], chunk_positions, length)

    def persist(self, model_kwargs: dict) -> None:
        """After the forward: generation goes on with the spliced mask and positions."""
        if self.inserted is None:
            return
        full_mask, chunk_positions, length = self.inserted
        model_kwargs["attention_mask"] = full_mask
        if (pos := model_kwargs.get("position_ids")) is not None:
            model_kwargs["position_ids"] = torch.cat([pos[:, : pos.shape[1] - length], chunk_positions], dim=1)
        self.inserted = None


class ServingRows:
    """How a serving loop changes a `DuplexGenerationState`'s rows between steps, as sessions join and leave (the
    filter / concatenate of TGI's `CausalLMBatch`): every per-row field follows its row."""

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only the batch rows `rows`, in that order (sessions that finished leave)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.versions.starts.device)
        for name in ("modes", "generated", "prompt_ids", "pending", "landings"):
            setattr(self, name, [getattr(self, name)[b] for b in rows])
        self.versions = self.versions.select(index)
        if self.context is not None:
            self.context = self.context.select(index)
        self.batch_size = len(rows)

    def shift_columns(self, columns: int) -> None:
        """`columns` columns were added (> 0: left padding) or removed (< 0) on the left of every row's sequence."""
        self.versions = self.versions.shift(columns)
        if self.context is not None:
            self.context = self.context.shift(columns)

    def concat(self, other: ServingRows) -> None:
        """Append the rows of `other` (same model, same number of columns): sessions that were prefilled apart join."""
        for name in ("modes", "generated", "prompt_ids", "pending", "landings"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.versions = self.versions.concat(other.versions)
        if self.context is not None:  # in_context: every row has stepped, so both sides have one
            self.context = self.context.concat(other.context)
        self.placed_versions = self.versions.starts.shape[1]
        self.batch_size += other.batch_size


@dataclass
class DuplexGenerationState(ServingRows):
    """Per-`generate` state: pending updates, the workspace versions of every row and the adapters' cached K/V.

    Lives in generate's model kwargs (a mutable object, like the KV cache), so it persists across steps. A serving
    loop drives the same state directly (`start`, `step`, `after_forward`) and changes its rows between steps
    (`select_rows`, `shift_columns`, `concat`), so every row's updates land by the same rules as in `generate`.
    `update_mode` may differ per row (a list of modes).
    """

    model: UpdateWriter  # the DuplexForCausalLM that generates
    batch_size: int
    updates: object = None
    update_mode: str | Sequence[str] = "workspace"
    tokenizer: object = None
    pending: list[list[_PendingUpdate]] = field(default_factory=list)
    landings: list[list[UpdateLanding]] = field(default_factory=list)

    def __post_init__(self) -> None:
        modes = [self.update_mode] * self.batch_size if isinstance(self.update_mode, str) else list(self.update_mode)
        for mode in modes:
            if mode not in UPDATE_MODES:
                raise ValueError(f"`update_mode` must be one of {UPDATE_MODES}, got {mode!r}")
        if len(modes) != self.batch_size:
            raise ValueError(f"`update_mode` has {len(modes)} rows but the batch has {self.batch_size}")
        self.modes = modes
        self.stream = self.updates if isinstance(self.updates, UpdateStream) else None
        scheduled = None if self.stream is not None else self.updates
        self.pending = self._normalize(scheduled)
        if self.has_updates and "inband" in modes and self.tokenizer is None:
            if self.model.config.inband_template != "{text}":
                raise ValueError("`update_mode='inband'` needs `tokenizer=` to encode `config.inband_template`")
        if self.stream is not None:  # from here on, `put` refuses what this call cannot land
            self.stream.open(self.batch_size, has_tokenizer=self.tokenizer is not None)
        self.landings = [[] for _ in range(self.batch_size)]
        self.prompt_length: int | None = None  # `generate`: the prompt's columns (the padded batch's)
        self.generated: list[int] = [0] * self.batch_size  # per row: new tokens before the current step
        self.versions: WorkspaceVersions | None = None
        self.landed_this_step: list[tuple[int, UpdateLanding]] = []  # (row, landing)
        self.inband = InbandSplice(self.model.config.inband_template, self.tokenizer)
        self.context: ContextWorkspace | None = None  # in_context: the slots placed so far, with their keys/values
        self.placed_versions = 1  # in_context: versions whose slots are in `context` (version 0 is empty)

    @property
    def has_updates(self) -> bool:
        return self.stream is not None or any(self.pending)

    # -- input validation ----------------------------------------------------------------------------------------------

    def check_decoding_options(self, generation_config, kwargs: dict) -> None:
        """Refuse, naming the option, what in-band splicing cannot do (the options every mode refuses are refused at
        `generate`'s entry: `updates_duplex.refuse_options_with_updates`)."""
        if not self.has_updates:
            return
        use_cache = kwargs.get("use_cache", getattr(generation_config, "use_cache", True))
        if "inband" in self.modes and use_cache is False:
            raise ValueError("`update_mode='inband'` needs `use_cache=True`: the correction is spliced into the cache")

    def _normalize(self, updates) -> list[list[_PendingUpdate]]:
        """Every documented form of scheduled `updates`, checked (`updates_duplex.normalize_updates`)."""
        return normalize_updates(updates, self.batch_size, self.tokenizer, self._vocab_size())

    def _vocab_size(self) -> int | None:
        """The backbone's vocabulary size: token ids at or past it are refused."""
        return getattr(self.model.config.get_text_config(decoder=True), "vocab_size", None)

    def _tokenize(self, payload) -> tuple[list[int], str | None]:
        return tokenize_update(payload, self.tokenizer, vocab_size=self._vocab_size())

    def put(self, row: int, payload: str | Sequence[int], arrived: float | None = None) -> None:
        """Queue a live update for `row`: it lands before the row's next token (a serving loop's corrections)."""
        check_row(row, self.batch_size, "put")
        token_ids, text = tokenize_update(payload, self.tokenizer, "put", self._vocab_size())
        self.pending[row].append(_PendingUpdate(None, token_ids, text, arrived or time.perf_counter()))

    # -- the generation loop -------------------------------------------------------------------------------------------

    def prepare_step(self, input_ids: torch.Tensor, model_inputs: dict) -> None:
        """`generate`'s hook before each forward: the first call starts the rows from the prompt; then `step`, every
        row having generated the tokens that `input_ids` holds beyond the prompt."""
        if self.prompt_length is None:
            mask = model_inputs.get("attention_mask")
            self.start(input_ids, mask if isinstance(mask, torch.Tensor) else None)
        self.step([input_ids.shape[1] - self.prompt_length] * self.batch_size, model_inputs)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Before the first forward: remember each row's prompt; the workspace starts empty."""
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(
                f"generate expanded the batch from {self.batch_size} to {input_ids.shape[0]} rows "
                "(num_return_sequences / beams); with DuplexForCausalLM pass repeated prompts instead"
            )
        self.prompt_length = input_ids.shape[1]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self.prompt_ids = [row[keep.bool()].tolist() for row, keep in zip(input_ids, mask, strict=True)]
        self.versions = WorkspaceVersions.empty(*self.model.empty_workspace(self.batch_size))

    def step(self, generated: Sequence[int], model_inputs: dict) -> None:
        """Before each forward, each row having generated `generated[row]` tokens: poll the stream, land the due
        updates of every row by its mode, and hand the model its workspace inputs. In-band rows splice first; the
        others' updates land at the sequence index of their newest token (`update_position`)."""
        self.generated = list(generated)
        cached = model_inputs.get("past_key_values") is not None  # (without a cache, each pass reads everything)
        if cached and self.versions.starts.shape[1] > 2:  # every version is placed, and every landing behind us
            self.versions = self.versions.newest_only()
            self.placed_versions = self.versions.starts.shape[1]
        if self.stream is not None:
            for payload, row, arrived in self.stream.drain():
                token_ids, text = self._tokenize(payload)
                for b in range(self.batch_size) if row is None else [row]:
                    self.pending[b].append(_PendingUpdate(None, token_ids, text, arrived))
        due = self._due_updates()
        spliced = [(b, update) for b, update in due if self.modes[b] == "inband"]
        if spliced:  # may lengthen the pass: every row's newest token moves to the new last column
            self._splice_inband(spliced, model_inputs)
        dropped = [(b, update) for b, update in due if self.modes[b] == "ignore"]
        if dropped:
            self._drop(dropped)
        written = [(b, update) for b, update in due if self.modes[b] == "workspace"]
        if written:
            self._land_in_workspace(written, newest_column(model_inputs))
        self._place_in_context(model_inputs)

    def _due_updates(self) -> list[tuple[int, _PendingUpdate]]:
        due, now = [], time.perf_counter()
        for b, row in enumerate(self.pending):
            while row and (row[0].at is None or row[0].at <= self.generated[b]):
                update = row.pop(0)
                update.arrived_time = update.arrived_time or now  # a scheduled update arrives when it falls due
                due.append((b, update))
        return due

    def _record(self, row: int, update: _PendingUpdate, applied: bool, kind: str | None = None) -> None:
        at = self.generated[row]
        landing = UpdateLanding(at, update.at, update.text, update.token_ids, applied, update.arrived_time, kind=kind)
        self.landings[row].append(landing)
        self.landed_this_step.append((row, landing))

    def _drop(self, due: list[tuple[int, _PendingUpdate]]) -> None:
        """`ignore` (the ablation): due updates are reported as arrived and not applied; nothing changes."""
        for b, update in due:
            self._record(b, update, applied=False)

    def _land_in_workspace(self, due: list[tuple[int, _PendingUpdate]], position: int) -> None:
        """`workspace`: apply due updates through `model.apply_update`, in rounds of at most one update per row;
        only the rows with an update are encoded (and later re-read). `position`: the sequence index whose logits
        are the first conditioned on them (`update_position`)."""
        device = self.versions.starts.device
        while due:
            this_round: dict[int, _PendingUpdate] = {}
            rest = []
            for b, update in due:
                if b in this_round:
                    rest.append((b, update))
                else:
                    this_round[b] = update
            due = rest
            rows = torch.tensor(sorted(this_round), device=device)
            slots, slot_mask, _ = self.versions.latest()
            tokens = [self._written_tokens(update) for _, update in sorted(this_round.items())]
            packed = pack_updates([[(position, ids)] for ids in tokens])
            new_slots, new_mask = slots.clone(), slot_mask.clone()
            new_slots[rows], new_mask[rows], decision = self.model.apply_update(
                slots[rows],
                slot_mask[rows],
                packed["update_input_ids"][:, 0].to(device),
                packed["update_attention_mask"][:, 0].to(device),
            )
            written = self.model.writes(decision)
            corrections = dict(zip(sorted(this_round), written.tolist(), strict=True))
            if any(corrections.values()):  # only backchannels: no new version, the rows read what they read
                start = torch.full((self.batch_size,), NEVER, dtype=torch.long, device=device)
                start[rows] = torch.where(written, position, NEVER)  # a backchannel's version is never read
                self.versions = self.versions.append(new_slots, new_mask, start)
            for b, update in this_round.items():
                kind = "correction" if corrections[b] else "backchannel"
                self._record(b, update, applied=True, kind=kind)

    def _place_in_context(self, model_inputs: dict) -> None:
        """`in_context`: the slots of versions written since the last step enter this forward pass, which keeps
        their keys/values in `self.context` for the following steps. No correction yet: the plain backbone."""
        if self.context is None or self.versions.starts.shape[1] > self.placed_versions:  # a correction was written
            entering = self.versions.placed_in_context(self.placed_versions)
            self.placed_versions = self.versions.starts.shape[1]
            if self.context is None:
                entering.keep = True
                self.context = entering
            else:
                self.context = self.context.extend(entering)
        model_inputs["context_workspace"] = None if self.context.empty else self.context

    def _written_tokens(self, update: _PendingUpdate) -> list[int]:
        """The correction as text writes it (`config.inband_template`); raw token ids when there is no tokenizer."""
        return self.inband.tokens(update) if self.tokenizer is not None else update.token_ids

    def _splice_inband(self, due: list[tuple[int, _PendingUpdate]], model_inputs: dict) -> None:
        """`inband`: the due corrections' tokens follow their rows' chunks (`InbandSplice`)."""
        inserts: list[list[int]] = [[] for _ in range(self.batch_size)]
        for b, update in due:
            inserts[b] += self.inband.tokens(update)
            self._record(b, update, applied=True)
        self.inband.splice(inserts, model_inputs)

    def after_forward(self, model_kwargs: dict) -> list[tuple[int, UpdateLanding]]:
        """After each forward: time-stamp the updates it used (and tell the stream's `on_landing`); persist in-band
        insertions in mask and positions. Returns the (row, landing) pairs that took effect in it."""
        device = self.versions.starts.device
        if self.landed_this_step and device.type == "cuda":
            torch.cuda.synchronize(device)  # the time the conditioned token exists, not was queued
        now = time.perf_counter()
        landed, self.landed_this_step = self.landed_this_step, []
        for row, landing in landed:
            landing.landed_time = now
            if self.stream is not None and self.stream.on_landing is not None:
                self.stream.on_landing(row, landing)
        self.inband.persist(model_kwargs)
        return landed

    def take_landings(self, row: int) -> list[UpdateLanding]:
        """Row `row`'s landings, plus its updates that never landed (`at` None), when its generation ends."""
        never = [UpdateLanding(None, u.at, u.text, u.token_ids, False, u.arrived_time) for u in self.pending[row]]
        self.pending[row] = []
        return self.landings[row] + never

    # -- the end of generate -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """When `generate` returns or raises: a live stream stops checking `put`s against this call, and what it
        still held (arrived after its last poll) is kept to be reported as never landed."""
        if self.stream is not None:
            for payload, row, arrived in self.stream.close():
                token_ids, text = self._tokenize(payload)
                for b in range(self.batch_size) if row is None else [row]:
                    self.pending[b].append(_PendingUpdate(None, token_ids, text, arrived))

    def finish(self) -> list[list[UpdateLanding]]:
        """Report updates that never landed (their `at` lay past the end of generation, or they reached the stream
        after its last poll) instead of losing them."""
        for b, row in enumerate(self.pending):
            for update in row:
                late = UpdateLanding(None, update.at, update.text, update.token_ids, False, update.arrived_time)
                self.landings[b].append(late)
                warnings.warn(
                    f"update {update.text or update.token_ids!r} for row {b} (at={update.at}) never landed: "
                    "generation ended first",
                    stacklevel=3,
                )
            row.clear()
        return self.landings


_PendingUpdate = PendingUpdate  # the names the generation state uses


# ----------------------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------------------


class DuplexGenerationMixin(GenerationMixin):
    """`generate` with mid-stream corrections. It runs transformers' own decoding loop and hooks two private
    GenerationMixin methods: `prepare_inputs_for_generation` (land due updates, hand the model its workspace) and
    `_update_model_kwargs_for_generation` (time-stamp landings, keep in-band insertions in mask and positions)."""

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config=None,
        updates=None,
        update_mode: str = "workspace",
        tokenizer=None,
        **kwargs,
    ):
        """`GenerationMixin.generate` plus mid-stream corrections.

        updates: None; a list of `(at, text)`, `(at, token_ids)` or `DuplexUpdate` (one list per row for a batch);
            or an `UpdateStream` fed from another thread. An update at `at` conditions new token `at` onwards.
        update_mode: "workspace" (write into the workspace), "ignore" (drop updates: ablation), or "inband"
            (splice `config.inband_template` with the correction into the context, continuing from the same cache).
        With `return_dict_in_generate=True` the output's `update_landings[row]` tells where each update landed.
        """
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("Duplex's generate needs `input_ids` (the prompt is also written into the workspace)")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("Duplex's generate does not support `inputs_embeds`; pass `input_ids`")
        batch_size = input_ids.shape[0]
        if not has_updates(updates, batch_size, update_mode, tokenizer):  # the backbone's generate, every option
            output = super().generate(inputs, generation_config, tokenizer=tokenizer, **kwargs)
            if isinstance(output, GenerateDecoderOnlyOutput):
                output = DuplexGenerateOutput(**output, update_landings=[[] for _ in range(len(output.sequences))])
            return output
        refuse_options_with_updates(generation_config or self.generation_config, kwargs)
        state = DuplexGenerationState(self, batch_size, updates, update_mode, tokenizer)
        try:
            state.check_decoding_options(generation_config or self.generation_config, kwargs)
            if tokenizer is not None:
                kwargs["tokenizer"] = tokenizer
            output = super().generate(inputs, generation_config, duplex_state=state, **kwargs)
        finally:
            state.close()
        landings = state.finish()
        if isinstance(output, GenerateDecoderOnlyOutput):
            output = DuplexGenerateOutput(**output, update_landings=landings)
        return output

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, duplex_state=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, **kwargs
        )
        if duplex_state is not None:
            duplex_state.prepare_step(input_ids, model_inputs)
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        state = model_kwargs.get("duplex_state")
        if state is not None:
            state.after_forward(model_kwargs)
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)


__all__ = [
    "NO_UPDATE",
    "UPDATE_MODES",
    "ContextWorkspace",
    "DuplexGenerateOutput",
    "DuplexGenerationMixin",
    "DuplexGenerationState",
    "DuplexUpdate",
    "UpdateLanding",
    "UpdateStream",
    "WorkspaceVersions",
    "pack_updates",
    "update_position",
]
