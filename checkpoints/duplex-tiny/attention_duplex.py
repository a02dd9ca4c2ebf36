"""The duplex read inside the backbone's own attention.

`DuplexForCausalLM` runs the backbone's own `forward` (its decoder loop, masks, cache and attention kernels) and
registers one attention function, `duplex_attention_forward`, under a name derived from the backbone's chosen
implementation (`"duplex_sdpa"` wraps `"sdpa"`, and so on; `attach_attention`). transformers hands that function
every layer's rotated queries, the cache's keys/values and the keyword arguments of the model's `forward`; among
them `duplex_read`, a `ContextRead` that knows where each correction's slots sit. Without it the function is
exactly the backbone's implementation.

With it, each head mixes the backbone's attention (`o_ctx`, the chosen kernel) with the joint read of the context
and the slots in their in-band geometry (`o_joint`): out = o_ctx + tanh(g) (o_joint - o_ctx). The joint read is
partial attentions (one per *level* of keys, each read by the query rotated to its in-band distance, plus one over
the slots) merged by their log-sum-exp, as FlashInfer's `merge_state` and vLLM's `merge_attn_states` merge them.
The slots themselves travel through the backbone's layers beside the tokens, as extra positions of the same pass:
the backbone computes their queries, keys and values at their in-band positions, and they read the context up to
their landing and the slots before them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half

try:
    from .generation_duplex import NEVER, ContextWorkspace
except ImportError:  # imported as a plain module from a checkout
    from generation_duplex import NEVER, ContextWorkspace

PREFIX = "duplex_"
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")  # tested with corrections; others pass through when nothing is read


# ----------------------------------------------------------------------------------------------------------------------
# Partial attentions and their merge
# ----------------------------------------------------------------------------------------------------------------------


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the visible keys and its log-sum-exp: query (B, h, Q, hd), key/value
    (B, kv_heads, K, hd), bool visible broadcastable to (B, 1, Q, K) -> out (B, h, Q, hd) (zeros where nothing is
    visible), lse (B, h, Q, 1) (-inf there). Grouped heads read their key head without copying it. The portable
    reference; `fast_attention_with_lse` takes a fused kernel where torch has one."""
    batch, heads, length, head_dim = query.shape
    grouped = query.reshape(batch, key.shape[1], -1, head_dim)  # (B, kv_heads, groups * Q, hd)
    scores = (torch.matmul(grouped, key.transpose(-1, -2)) * scaling).view(batch, heads, length, -1)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    weights = torch.exp(scores - lse.clamp_min(torch.finfo(scores.dtype).min)).nan_to_num(0.0)
    out = torch.matmul(weights.view(batch, key.shape[1], -1, key.shape[2]), value).view(batch, heads, length, -1)
    return out, lse


def cpu_flash_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_lse` through torch's fused CPU flash kernel, which returns the log-sum-exp. Grouped query
    heads become extra query rows of their key head, so keys and values are never copied per head."""
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * length, head_dim)
    if visible is None:  # every key visible to every query: the unmasked kernel
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            grouped, key, value, 0.0, False, scale=scaling
        )
        return out.reshape(batch, heads, length, head_dim), lse.reshape(batch, heads, length, 1)
    visible = visible.expand(batch, 1, length, key.shape[2])
    bias = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill_(~visible, float("-inf"))
    bias = bias[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, 1, groups * length, -1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        grouped, key, value, 0.0, False, attn_mask=bias, scale=scaling
    )
    seen = visible.any(-1, keepdim=True)  # (B, 1, Q, 1): the kernel reports 0 where nothing is visible
    out = out.reshape(batch, heads, length, head_dim) * seen
    lse = lse.reshape(batch, heads, length, 1).masked_fill(~seen, float("-inf"))
    return out, lse


def fast_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel where one exists for this device and dtype (CPU flash, fp32/bf16, no gradient), else the
    reference."""
    fused = query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16)
    if fused and not torch.is_grad_enabled() and query.shape[1] % key.shape[1] == 0:
        return cpu_flash_attention_with_lse(query, key, value, visible, scaling)
    return attention_with_lse(query, key, value, visible, scaling)


def merge_attentions(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Partial attentions over disjoint keys, (out, lse) each, -> the attention over all of them: each part weighed
    by its share of the total exp-sum. Rows that see nothing anywhere stay zero."""
    lse = torch.stack([part_lse.float() for _, part_lse in parts])  # (P, B, h, Q, 1), in fp32 whatever the kernels
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total.clamp_min(torch.finfo(lse.dtype).min)).nan_to_num(0.0)
    dtype = parts[0][0].dtype
    return sum(w.to(dtype) * part_out.to(dtype) for w, (part_out, _) in zip(weights, parts, strict=True))


# ----------------------------------------------------------------------------------------------------------------------
# Where the slots sit: the in-band geometry of one pass
# ----------------------------------------------------------------------------------------------------------------------


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (..., hd) by cos/sin (..., rotary_dim); dimensions past rotary_dim (partial rotary,
    as Phi-3's) pass unrotated. Rotations compose: a query rotated at i, then by d, is the query at i + d."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    moved, kept = x[..., :rotary], x[..., rotary:]
    moved = moved * cos + rotate_half(moved) * sin
    return torch.cat([moved, kept.expand(*moved.shape[:-1], -1)], dim=-1)


def rotation(rotary_emb: torch.nn.Module, like: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """cos/sin (B, N, rotary_dim) of rotations by `offsets` (B, N), from the backbone's own rotary embedding,
    without its attention scaling (a rotation applied on top of one that carries it already)."""
    cos, sin = rotary_emb(like, offsets)
    scale = getattr(rotary_emb, "attention_scaling", 1.0) or 1.0
    return (cos, sin) if scale == 1.0 else (cos / scale, sin / scale)


@dataclass
class ContextGeometry:
    """Where an in-context workspace's slots sit among the keys of one forward pass: exactly where the same text
    would sit in-band. A correction landing at sequence index p follows token p; every later key moves behind it by
    the correction's length. Nothing cached moves: queries are rotated instead. Keys fall into *levels* (level l:
    the keys after the l-th landing point, c_l slots placed before each), and a query reads level l rotated by its
    own shift minus c_l."""

    key_level: torch.Tensor  # (B, K) long: each context key's level
    level_ranges: list[tuple[int, int]]  # the span of keys [lo, hi) that holds each level in some row
    token_shift: tuple[torch.Tensor, torch.Tensor]  # cos/sin (B, T, V, rd): token t's query moved for level l
    token_reads: torch.Tensor  # (B, 1, T, M) bool: the slots each token reads (landed before it)
    reads_any: torch.Tensor  # (B, 1, T, 1) bool
    key_valid: torch.Tensor  # (B, K) bool: real keys (not padding)
    slot_positions: torch.Tensor | None = None  # (B, M_new) long: RoPE positions of the entering slots
    slot_shift: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin (B, M_new, V, rd): slot query for level l
    slot_context: torch.Tensor | None = None  # (B, 1, M_new, K) bool: the context up to the slot's landing
    slot_reads: torch.Tensor | None = None  # (B, 1, M_new, M) bool: earlier slots and itself
    readout: torch.Tensor | None = None  # (B, T, M_new): token t's logits come from entering slot m (one-hot or 0)
    _visible: dict = field(default_factory=dict, repr=False)  # per prepared mask: its levels' visibility

    @classmethod
    def build(
        cls,
        rotary_emb: torch.nn.Module,
        like: torch.Tensor,
        workspace: ContextWorkspace,
        attention_mask: torch.Tensor | None,
        past_seen: int,
        length: int,
    ) -> ContextGeometry:
        """`like` (B, T, D) gives dtype and device; attention_mask the 2D (B, K) 0/1 mask over every context key
        (None: no padding); `past_seen` keys are cached, `length` tokens enter."""
        batch, device = like.shape[0], like.device
        num_keys = past_seen + length
        starts = workspace.starts  # (B, M) sequence index of each slot's landing (NEVER: unused column)
        keys = torch.arange(num_keys, device=device)
        placed_before = starts[:, None, :] < keys[None, :, None]  # (B, K, M): slot m lies before key j in-band
        shift = placed_before.sum(-1)  # (B, K): slots placed before each key (nondecreasing)
        level = torch.cat([shift.new_zeros(batch, 1), (shift[:, 1:] != shift[:, :-1]).long()], 1).cumsum(-1)
        num_levels = int(level[:, -1].max()) + 1
        level_shift = shift.new_zeros(batch, num_levels).scatter_reduce(1, level, shift, "amax")  # (B, V): c_l
        offsets = (shift[:, past_seen:, None] - level_shift[:, None, :]).flatten(1)  # (B, T * V)
        token_shift = tuple(t.unflatten(1, (length, num_levels)) for t in rotation(rotary_emb, like, offsets))
        token_reads = placed_before[:, past_seen:].unsqueeze(1)  # (B, 1, T, M)
        key_valid = torch.ones(batch, num_keys, dtype=torch.bool, device=device)
        if attention_mask is not None:
            key_valid = attention_mask[:, -num_keys:].bool()
        in_level = (level[:, None, :] == torch.arange(num_levels, device=device)[None, :, None]).any(0)  # (V, K)
        first = in_level.float().argmax(-1).tolist()
        last = (num_keys - in_level.flip(-1).float().argmax(-1)).tolist()
        ranges = list(zip(first, last, strict=True))
        geometry = cls(level, ranges, token_shift, token_reads, token_reads.any(-1, keepdim=True), key_valid)
        if workspace.num_new:
            geometry.place_entering_slots(rotary_emb, like, workspace, level_shift)
        return geometry

    def place_entering_slots(
        self, rotary_emb: torch.nn.Module, like: torch.Tensor, workspace: ContextWorkspace, level_shift: torch.Tensor
    ) -> None:
        """The entering slots' in-band positions, their query rotations per level, what they read, and which token
        each landing's last slot predicts for."""
        starts, device = workspace.starts, like.device
        valid = starts != NEVER
        num_keys = self.key_valid.shape[1]
        past_seen = num_keys - self.token_reads.shape[2]
        new = slice(starts.shape[1] - workspace.num_new, None)
        own_valid, own_start = valid[:, new], torch.where(valid, starts, 0)[:, new]  # (B, M_new)
        rank = (valid.long().cumsum(-1) - valid.long())[:, new]  # valid slots before each (landings in order)
        position = self.key_valid.long().cumsum(-1).gather(1, own_start) + rank  # right after its token
        self.slot_positions = torch.where(own_valid, position, 0)
        offsets = (-level_shift[:, None, :]).expand(-1, workspace.num_new, -1).flatten(1)  # (B, M_new * V)
        self.slot_shift = tuple(
            t.unflatten(1, (-1, len(self.level_ranges))) for t in rotation(rotary_emb, like, offsets)
        )
        keys = torch.arange(num_keys, device=device)
        context = (keys[None, None, :] <= own_start[:, :, None]) & self.key_valid[:, None, :]  # (B, M_new, K)
        self.slot_context = (context & own_valid[:, :, None]).unsqueeze(1)
        order = torch.arange(starts.shape[1], device=device)
        earlier = (order[None, :] <= order[new, None])[None] & valid[:, None, :]  # (B, M_new, M)
        self.slot_reads = (earlier & own_valid[:, :, None]).unsqueeze(1)
        # the last slot placed at a landing predicts what comes after it, in place of the token it follows
        same_landing_later = (own_start[:, None, :] == own_start[:, :, None]) & own_valid[:, None, :]
        same_landing_later &= order[None, new] > order[new, None]  # (B, M_new, M_new)
        last = own_valid & ~same_landing_later.any(-1)
        queries = torch.arange(past_seen, num_keys, device=device)
        self.readout = (own_start[:, None, :] == queries[None, :, None]) & last[:, None, :]  # (B, T, M_new)

    def level_visibility(self, mask: torch.Tensor | None, context: Callable[[], torch.Tensor]) -> list:
        """What each level's rotated query sees within its span of keys: (B, 1, Q, hi - lo) bool, or None where it
        sees every key of the span (the kernels then run unmasked). From the queries' context visibility
        (`context()`, (B|1, 1, Q, K)), computed once per prepared `mask` and shared by the layers that use it."""
        key = ("causal",) if mask is None else id(mask)
        cached = self._visible.get(key)
        if cached is None or cached[0] is not mask:
            visible = context()
            spans = []
            for level, (lo, hi) in enumerate(self.level_ranges):
                span = visible[..., lo:hi] & (self.key_level[:, None, None, lo:hi] == level)
                spans.append(None if bool(span.all()) else span)
            cached = (mask, spans)
            self._visible[key] = cached
        return cached[1]


def read_levels(
    query: torch.Tensor,
    shift: tuple[torch.Tensor, torch.Tensor],
    key: torch.Tensor,
    value: torch.Tensor,
    spans: list[torch.Tensor | None],
    ranges: list[tuple[int, int]],
    scaling: float,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The context read by a query rotated once per level: query (B, h, Q, hd), shift cos/sin (B, Q, V, rd), each
    level's keys within `ranges[l]`, seen as `spans[l]` says (`level_visibility`) -> one (out, lse) per level.
    Each level reads only its own span of keys, so the context is read about once whatever the number of levels."""
    cos, sin = (t.permute(0, 2, 1, 3)[:, None] for t in shift)  # (B, 1, V, Q, rd)
    copies = rotate(query[:, :, None], cos.to(query.dtype), sin.to(query.dtype))  # (B, h, V, Q, hd)
    return [
        fast_attention_with_lse(copies[:, :, level], key[:, :, lo:hi], value[:, :, lo:hi], spans[level], scaling)
        for level, (lo, hi) in enumerate(ranges)
    ]


# ----------------------------------------------------------------------------------------------------------------------
# One pass's read, and the registered attention function
# ----------------------------------------------------------------------------------------------------------------------


def context_visibility(mask: torch.Tensor | None, length: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """The backbone's prepared 4D mask (None: plain causal; bool; or additive float) -> bool (B|1, 1, T, K)."""
    if mask is None:
        keys = torch.arange(num_keys, device=device)
        rows = num_keys - length + torch.arange(length, device=device)
        return (keys[None, :] <= rows[:, None])[None, None]
    mask = mask[..., -length:, :num_keys]
    return mask if mask.dtype == torch.bool else mask == 0


@dataclass
class ContextRead:
    """What one forward pass needs to read an in-context workspace: the slots placed so far (`workspace`, whose
    keys/values it extends with the entering slots), their geometry, and each adapted layer's gate."""

    workspace: ContextWorkspace
    geometry: ContextGeometry
    gates: dict[int, torch.Tensor]  # layer -> per-head gate g (h,); layers without one read nothing
    num_tokens: int

    @property
    def num_entering(self) -> int:
        return self.workspace.num_new

    def attend(self, module, inner, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
        """One layer: the tokens' attention mixed with their joint read, and the entering slots' own read."""
        length, entering, layer = self.num_tokens, self.num_entering, module.layer_idx
        scaling = kwargs.get("scaling") or module.scaling
        num_context = key.shape[2] - entering
        slot_key, slot_value = self.workspace.keys.get(layer), self.workspace.values.get(layer)
        if entering:  # the entering slots' keys/values, at their in-band positions, join the workspace
            new_key, new_value = key[:, :, num_context:], value[:, :, num_context:]
            slot_key = new_key if slot_key is None else torch.cat([slot_key, new_key.to(slot_key.dtype)], 2)
            slot_value = new_value if slot_value is None else torch.cat([slot_value, new_value.to(slot_value.dtype)], 2)
            self.workspace.store(layer, slot_key, slot_value)
        key, value = key[:, :, :num_context], value[:, :, :num_context]
        slot_key, slot_value = slot_key.to(key.dtype), slot_value.to(value.dtype)
        tokens = query[:, :, :length]
        mask = attention_mask[..., :length, :num_context] if isinstance(attention_mask, torch.Tensor) else None
        out, _ = inner(module, tokens, key, value, mask, **kwargs)  # (B, T, h, hd): the backbone's own attention
        gate = self.gates.get(layer)
        if gate is not None:
            spans = self.geometry.level_visibility(
                mask, lambda: context_visibility(mask, length, num_context, query.device)
            )
            joint = self.joint_read(tokens, self.geometry.token_shift, key, value, spans, slot_key, slot_value,
                                    self.geometry.token_reads, scaling)  # fmt: skip
            share = torch.tanh(gate).to(out.dtype)[:, None] * self.geometry.reads_any.transpose(1, 2)  # (B, T, h, 1)
            out = out + share * (joint.transpose(1, 2) - out)
        if entering:
            slot_context = self.geometry.slot_context
            spans = self.geometry.level_visibility(slot_context, lambda: slot_context)
            slots = self.joint_read(query[:, :, length:], self.geometry.slot_shift, key, value, spans, slot_key,
                                    slot_value, self.geometry.slot_reads, scaling)  # fmt: skip
            out = torch.cat([out, slots.transpose(1, 2).to(out.dtype)], dim=1)
        return out, None

    def joint_read(self, query, shift, key, value, spans, slot_key, slot_value, slot_visible, scaling):
        """query (B, h, Q, hd) reading the context at in-band distances (each level by its rotated copy) and the
        slots it may see, as one attention: (B, h, Q, hd)."""
        parts = read_levels(query, shift, key, value, spans, self.geometry.level_ranges, scaling)
        own = rotate(query, *(t[:, None, :, 0].to(query.dtype) for t in shift))  # level 0: the in-band position
        parts.append(fast_attention_with_lse(own, slot_key, slot_value, slot_visible, scaling))
        return merge_attentions(parts)


def inner_implementation(name: str):
    """The attention function a wrapped implementation name stands for."""
    inner = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    return ALL_ATTENTION_FUNCTIONS.get_interface(inner, eager_attention_forward)


def duplex_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """Registered as `duplex_<implementation>`: the backbone's implementation, plus the duplex read when the pass
    carries one (`duplex_read`)."""
    read: ContextRead | None = kwargs.pop("duplex_read", None)
    inner = inner_implementation(module.config._attn_implementation)
    if read is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    return read.attend(module, inner, query, key, value, attention_mask, **kwargs)


def attach_attention(config) -> str:
    """Route the backbone's attention (its config's `_attn_implementation`) through `duplex_attention_forward`,
    keeping its kernel and its mask format. Idempotent; returns the backbone's own implementation name."""
    name = config._attn_implementation or "eager"
    inner = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    wrapped = PREFIX + inner
    if wrapped not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(wrapped, duplex_attention_forward)
        if inner in ALL_MASK_ATTENTION_FUNCTIONS:
            ALL_MASK_ATTENTION_FUNCTIONS.register(wrapped, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    config._attn_implementation = wrapped
    return inner


def check_implementation(config) -> None:
    """Refuse, by name, reading corrections under an attention implementation the read is not tested under."""
    implementation = config._attn_implementation.removeprefix(PREFIX)
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(
            f"corrections are read under the attention implementations {SUPPORTED_IMPLEMENTATIONS}; the backbone "
            f"uses {implementation!r}: load it with `attn_implementation='sdpa'` to pass `updates=`"
        )


def check_cache(cache) -> None:
    """Entering slots pass through the cache for one forward and are cropped after it: a cache whose layers cannot
    be cropped (static, sliding-window, quantized) cannot take corrections."""
    if cache is None:
        return
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])} | {type(cache).__name__})
        raise ValueError(
            f"corrections need a dynamic, unwindowed KV cache (`DynamicCache`); got {', '.join(kinds)}: "
            "use the default cache (no `cache_implementation`, no `sliding_window`) with `updates=`"
        )


@contextmanager
def readout_hook(norm: torch.nn.Module, workspace: torch.nn.Module, read: ContextRead | None):
    """While the backbone runs one pass with entering slots: before its final norm, the token a landing follows
    takes its prediction from the landing's last slot (`InContextWorkspace.read_out`)."""
    if read is None or read.geometry.readout is None:
        yield
        return
    length = read.num_tokens

    def mix(module, args):
        hidden = args[0]
        tokens = workspace.read_out(hidden[:, :length], hidden[:, length:], read.geometry.readout)
        return (torch.cat([tokens, hidden[:, length:]], dim=1), *args[1:])

    handle = norm.register_forward_pre_hook(mix)
    try:
        yield
    finally:
        handle.remove()
